"""Prepare the cleaned Alpaca instruction dataset (52k records) for finetuning."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import (
    PrepareArgs, check_destination, load_records, load_tokenizer, local_or_downloaded, prepare_with,
)

DATA_URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json"


@dataclass
class PrepareAlpaca(PrepareArgs):
    """Download (unless --data_file is given), split and tokenize Alpaca into train.pt, test.pt, test.json, meta.json.

    Args:
        destination_path: Directory for the prepared files (and the downloaded JSON).
        data_file: A local copy of the Alpaca JSON; skips the download.
    """

    destination_path: OutputPath = OutputPath("data/alpaca")
    data_file: Optional[Path] = None
    test_split_size: int = 2000


def main(settings: PrepareAlpaca) -> None:
    check_destination(settings, settings.data_file)
    tokenizer = load_tokenizer(settings.checkpoint_dir, settings.tokenizer_path)
    data_file = local_or_downloaded(settings.data_file, DATA_URL, settings.destination_path)
    prepare_with(settings, load_records(data_file), tokenizer, source=str(data_file))


if __name__ == "__main__":
    run_cli(main)
