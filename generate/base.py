"""Generate text with a pretrained (or merged) model.

    python generate/base.py --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --prompt "Hello, my name is"

The text streams to stdout as it is generated; timing and memory go to stderr. Every option: -h.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_llama.checkpoint import load
from lit_llama.cli import run_cli
from lit_llama.generation import SamplingArgs, generate_text, setup_runtime
from lit_llama.quantize import check_generation_mode, generation_speed_note, quantize_for_generation
from lit_llama.tokenizer import Tokenizer


@dataclass
class GenerateArgs(SamplingArgs):
    """Generate text from a prompt.

    Args:
        checkpoint_path: The model checkpoint (`lit-llama.pth`, with `model_config.json` beside it), or its directory.
        tokenizer_path: The tokenizer file or directory (default: the one beside the checkpoint).
        prompt: The text to continue.
        quantize: Quantize the weights for generation: int8 (per-row scales) or int4 (CPU only), from the bf16 or
            fp32 checkpoint as it loads.
    """

    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth")
    tokenizer_path: Optional[Path] = None
    prompt: str = "Hello, my name is"
    quantize: Optional[str] = None


def main(settings: GenerateArgs) -> None:
    runtime = setup_runtime(settings.precision, settings.seed)
    check_generation_mode(settings.quantize)
    model, tokenizer = load(settings.checkpoint_path, runtime.device, runtime.dtype)
    if settings.quantize:
        quantize_for_generation(model, settings.quantize)
        note = generation_speed_note(settings.quantize)
        if note:
            print(note, file=sys.stderr)
    if settings.tokenizer_path is not None:
        tokenizer = Tokenizer(settings.tokenizer_path)
    generate_text(model, tokenizer, tokenizer.encode(settings.prompt), runtime, settings, prefix=settings.prompt)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
