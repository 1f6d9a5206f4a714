r"""Merge LoRA weights into their base model: a standalone checkpoint that runs as fast as the base.

    python scripts/merge_lora.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth \
        --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --output_dir checkpoints/lit-llama/7B-alpaca-lora

The output directory is an ordinary checkpoint (lit-llama.pth, model_config.json, tokenizer files): use it with
generate/base.py, finetune it again, or export it with scripts/convert_lit_checkpoint.py.
"""
from pathlib import Path
from typing import Optional

from lit_llama.checkpoint import checkpoint_dir
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import check_checkpoint_outputs, copy_tokenizer_files, write_checkpoint
from lit_llama.finetuned import load_finetuned, read_finetune_config


def main(
    finetuned_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    checkpoint_path: Optional[Path] = None,
    output_dir: OutputPath = OutputPath("out/lora/alpaca/merged"),
    overwrite: bool = False,
) -> None:
    """Fold the LoRA update B A * alpha / r into the base weights and save the result as a checkpoint directory.

    Args:
        finetuned_path: The LoRA weights saved by finetune/lora.py (finetune_config.json beside them).
        checkpoint_path: The base lit-llama.pth (default: the one recorded in finetune_config.json).
        output_dir: Where lit-llama.pth, model_config.json and the tokenizer files are written.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    base = checkpoint_path or read_finetune_config(finetuned_path).get("base_checkpoint")
    inputs = [Path(finetuned_path).parent, None if base is None else checkpoint_dir(base)]
    check_checkpoint_outputs(output_dir, inputs, overwrite)
    # the stored dtype is kept (each merge is computed in fp32 and rounded once)
    model, tokenizer, record = load_finetuned(finetuned_path, checkpoint_path, method="lora")
    path = write_checkpoint(model.state_dict(), model.config, output_dir, source=str(finetuned_path))
    copied = copy_tokenizer_files(tokenizer.path.parent, output_dir)
    print(f"wrote {path}, model_config.json and {', '.join(copied)}; prompt style: {record['prompt_style']}")


if __name__ == "__main__":
    run_cli(main)
