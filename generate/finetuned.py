"""Generate a response with a finetuned model: LoRA, LLaMA-Adapter (v1, v2) or full finetuning, whichever
finetune_config.json beside the weights names.

    python generate/finetuned.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth \
        --prompt "What do llamas eat?"

The base checkpoint recorded at finetuning time is loaded (or --checkpoint_path), the finetuned weights are added
and, where the method allows (LoRA, adapter v2), merged into plain layers: generation then runs at the base model's
speed. The prompt is wrapped in the template the model was finetuned with; only the response is printed (streamed
to stdout); timing and memory go to stderr. generate/lora.py, adapter.py, adapter_v2.py and full.py run this script.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_llama.chat_data import load_conversation
from lit_llama.cli import run_cli
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import SamplingArgs, generate_text, setup_runtime
from lit_llama.prompts import resolve_prompt_style


@dataclass
class GenerateFinetunedArgs(SamplingArgs):
    """Generate a response to an instruction with a finetune.

    Args:
        finetuned_path: The weights a finetune/*.py script saved (finetune_config.json beside them).
        checkpoint_path: The base checkpoint (default: the one recorded in finetune_config.json).
        prompt: The instruction.
        input: Optional context for the instruction (the "input" field of Alpaca-style data).
        messages: Instead of --prompt, a JSON file holding a conversation ([{"role": ..., "content": ...}, ...] or a
            record with "messages"): the model answers the next assistant turn.
    """

    finetuned_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth")
    checkpoint_path: Optional[Path] = None
    prompt: str = "What food do llamas eat?"
    input: str = ""
    messages: Optional[Path] = None


def main(settings: GenerateFinetunedArgs) -> None:
    runtime = setup_runtime(settings.precision, settings.seed)
    model, tokenizer, record = load_finetuned(
        settings.finetuned_path, settings.checkpoint_path, runtime.device, runtime.dtype
    )
    style = resolve_prompt_style(record["prompt_style"], tokenizer.path.parent)
    if settings.messages is None:
        prompt_ids = style.prompt_ids(tokenizer, settings.prompt, settings.input)
    else:
        prompt_ids = style.conversation_ids(tokenizer, load_conversation(settings.messages))
    generate_text(model, tokenizer, prompt_ids, runtime, settings)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
