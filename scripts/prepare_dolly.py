"""Prepare databricks-dolly-15k (15k human-written instruction records) for finetuning."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import (
    PrepareArgs, check_destination, load_records, load_tokenizer, local_or_downloaded, prepare_with,
)

DATA_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


@dataclass
class PrepareDolly(PrepareArgs):
    """Download (unless --data_file is given), split and tokenize Dolly into train.pt, test.pt, test.json, meta.json.
    Dolly's "context" becomes the input, "response" the output and "category" the task.

    Args:
        destination_path: Directory for the prepared files (and the downloaded JSONL).
        data_file: A local copy of databricks-dolly-15k.jsonl; skips the download.
    """

    destination_path: OutputPath = OutputPath("data/dolly")
    data_file: Optional[Path] = None
    test_split_size: int = 2000
    max_seq_length: int = 1024


def main(settings: PrepareDolly) -> None:
    check_destination(settings, settings.data_file)
    tokenizer = load_tokenizer(settings.checkpoint_dir, settings.tokenizer_path)
    data_file = local_or_downloaded(settings.data_file, DATA_URL, settings.destination_path)
    records = load_records(data_file, input_field="context", output_field="response", task_field="category")
    prepare_with(settings, records, tokenizer, source=str(data_file))


if __name__ == "__main__":
    run_cli(main)
