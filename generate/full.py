"""Generate a response with a fully finetuned model: the same as generate/finetuned.py, which reads the method from
finetune_config.json (every option: -h).

    python generate/full.py --finetuned_path out/full/alpaca/lit-llama-full-finetuned.pth --prompt "What do llamas eat?"
"""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("finetuned.py")), run_name="__main__")
