"""Generate a response with a LoRA-finetuned model.

    python generate/lora.py --lora_path out/lora/alpaca/lit-llama-lora-finetuned.pth --prompt "What do llamas eat?"

The LoRA update is merged into the base weights before generating, so this runs as fast and in as little memory as
the base model. The prompt is wrapped in the template the model was finetuned with; only the response is printed
(streamed to stdout); timing and memory go to stderr.
"""
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# so `python generate/lora.py` works from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.cli import run_cli
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import generate_samples, setup_runtime
from lit_llama.prompts import PromptStyle


def main(
    lora_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    pretrained_path: Optional[Path] = None,
    prompt: str = "What food do llamas eat?",
    input: str = "",
    num_samples: int = 1,
    max_new_tokens: int = 50,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    temperature: float = 0.8,
    seed: int = 1234,
    precision: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Generate a response to an instruction with a LoRA finetune.

    Args:
        lora_path: The LoRA weights saved by finetune/lora.py (with finetune_config.json beside them).
        pretrained_path: The base checkpoint, e.g. checkpoints/lit-llama/7B/lit-llama.pth
            (default: the one recorded in finetune_config.json at finetuning time).
        prompt: The instruction.
        input: Optional context for the instruction (the "input" field of Alpaca-style data).
        num_samples: How many responses to generate.
        max_new_tokens: The most tokens to generate per response (fewer if EOS comes first).
        top_k: Sample only among the k most likely tokens (1 is greedy; null: no limit).
        top_p: Sample only among the most likely tokens holding this much probability (1.0: no limit).
        temperature: Sharpen (<1) or flatten (>1) the distribution; 0 is greedy.
        seed: Random seed, so a run can be repeated.
        precision: bf16-true, 32-true, bf16-mixed or 16-true (default: bf16-true where supported, else 32-true).
        compile: torch.compile the model (slow first call, faster after).
    """
    runtime = setup_runtime(precision, seed)
    start = time.perf_counter()
    model, tokenizer, record = load_finetuned(lora_path, pretrained_path, runtime.device, runtime.dtype, method="lora")
    print(f"Loaded and merged {lora_path} in {time.perf_counter() - start:.2f} sec "
          f"({runtime.precision} on {runtime.device})", file=sys.stderr)
    if compile:
        model = torch.compile(model, dynamic=True)

    prompt_ids = tokenizer.encode(PromptStyle.from_name(record["prompt_style"]).apply(prompt, input))
    generate_samples(model, tokenizer, prompt_ids, runtime, num_samples, max_new_tokens, temperature, top_k, top_p)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
