"""Prepare databricks-dolly-15k (15k human-written instruction records) for finetuning."""
from pathlib import Path
from typing import Optional

from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import download, load_records, load_tokenizer, prepare
from lit_llama.prompts import resolve_prompt_style

DATA_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


def main(
    destination_path: OutputPath = OutputPath("data/dolly"),
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    tokenizer_path: Optional[Path] = None,
    data_file: Optional[Path] = None,
    test_split_size: int = 2000,
    max_seq_length: int = 1024,
    seed: int = 42,
    mask_inputs: bool = True,
    prompt_style: Optional[str] = None,
    skip_long: bool = False,
) -> None:
    """Download (unless --data_file is given), split and tokenize Dolly into train.pt, test.pt, test.json, meta.json.
    Dolly's "context" becomes the input, "response" the output and "category" the task.

    Args:
        destination_path: Directory for the prepared files (and the downloaded JSONL).
        checkpoint_dir: Checkpoint whose tokenizer to use.
        tokenizer_path: A tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        data_file: A local copy of databricks-dolly-15k.jsonl; skips the download.
        test_split_size: Number of records held out for evaluation.
        max_seq_length: Samples longer than this (in tokens) are truncated, keeping their EOS.
        seed: Seed of the train/test split.
        mask_inputs: Compute the loss on the response only (prompt labels set to -100).
        prompt_style: Prompt template: "alpaca", "chatml", "chat_template" (the checkpoint's own) or one you
            registered in lit_llama/prompts.py; default: the checkpoint's chat template if it has one, else alpaca.
        skip_long: Drop samples longer than max_seq_length instead of truncating them.
    """
    tokenizer = load_tokenizer(checkpoint_dir, tokenizer_path)
    if data_file is None:
        data_file = destination_path / DATA_URL.rsplit("/", 1)[-1]
        download(DATA_URL, data_file)
    records = load_records(data_file, input_field="context", output_field="response", task_field="category")
    prepare(
        records, destination_path, tokenizer, source=str(data_file), test_split_size=test_split_size,
        max_seq_length=max_seq_length, seed=seed, mask_inputs=mask_inputs,
        prompt_style=resolve_prompt_style(prompt_style, tokenizer.path.parent),
        skip_long=skip_long,
    )


if __name__ == "__main__":
    run_cli(main)
