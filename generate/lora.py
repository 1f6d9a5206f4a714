"""Generate a response with a LoRA finetune: the same as generate/finetuned.py, which reads the method from
finetune_config.json (every option: -h).

    python generate/lora.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth --prompt "What do llamas eat?"
"""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("finetuned.py")), run_name="__main__")
