"""Generate text with a pretrained (or fully finetuned) model.

    python generate/base.py --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --prompt "Hello, my name is"

The text streams to stdout as it is generated; timing and memory go to stderr.
"""
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# so `python generate/base.py` works from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.checkpoint import checkpoint_dir, load
from lit_llama.cli import run_cli
from lit_llama.generation import generate_samples, setup_runtime
from lit_llama.tokenizer import Tokenizer


def main(
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth"),
    tokenizer_path: Optional[Path] = None,
    prompt: str = "Hello, my name is",
    num_samples: int = 1,
    max_new_tokens: int = 50,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    temperature: float = 0.8,
    seed: int = 1234,
    precision: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Generate text from a prompt.

    Args:
        checkpoint_path: The model checkpoint (`lit-llama.pth`, with `model_config.json` beside it), or its directory.
        tokenizer_path: The tokenizer file or directory (default: the one beside the checkpoint).
        prompt: The text to continue.
        num_samples: How many continuations to generate.
        max_new_tokens: The most tokens to generate per sample (fewer if EOS comes first).
        top_k: Sample only among the k most likely tokens (1 is greedy; null: no limit).
        top_p: Sample only among the most likely tokens holding this much probability (1.0: no limit).
        temperature: Sharpen (<1) or flatten (>1) the distribution; 0 is greedy.
        seed: Random seed, so a run can be repeated.
        precision: Fabric's precision names: bf16-true, 32-true, bf16-mixed (fp32 weights, bf16 autocast), 16-true.
            Default: bf16-true where supported, else 32-true.
        compile: torch.compile the one-token decode step (slow first call, faster after).
    """
    runtime = setup_runtime(precision, seed)
    start = time.perf_counter()
    model, tokenizer = load(checkpoint_path, runtime.device, runtime.dtype)
    if tokenizer_path is not None:
        tokenizer = Tokenizer(tokenizer_path)
    print(f"Loaded {checkpoint_dir(checkpoint_path)} in {time.perf_counter() - start:.2f} sec "
          f"({runtime.precision} on {runtime.device})", file=sys.stderr)
    if compile:
        model = torch.compile(model, dynamic=True)

    prompt_ids = tokenizer.encode(prompt)
    generate_samples(
        model, tokenizer, prompt_ids, runtime, num_samples, max_new_tokens, temperature, top_k, top_p, prefix=prompt
    )


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
