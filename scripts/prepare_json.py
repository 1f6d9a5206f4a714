"""Prepare your own instruction dataset: a JSON list of records, JSON Lines or CSV, with configurable field names."""
from dataclasses import dataclass, field
from pathlib import Path

from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import PrepareArgs, check_destination, load_records, load_tokenizer, prepare_with


@dataclass
class PrepareJson(PrepareArgs):
    """Split and tokenize a .json, .jsonl or .csv file into train.pt, test.pt, test.json and meta.json.

    Args:
        data_file: The records: a JSON list of objects, one JSON object per line, or a CSV with a header row.
        instruction_field: Name of the field holding the instruction.
        input_field: Name of the optional field holding extra input (missing means none).
        output_field: Name of the field holding the expected response.
        task_field: Name of an optional field naming each record's task (kept in test.json for per-task scores).
    """

    data_file: Path = field(kw_only=True)
    destination_path: OutputPath = OutputPath("data/custom")
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    task_field: str = "task"


def main(settings: PrepareJson) -> None:
    check_destination(settings, settings.data_file)
    tokenizer = load_tokenizer(settings.checkpoint_dir, settings.tokenizer_path)
    records = load_records(
        settings.data_file, settings.instruction_field, settings.input_field, settings.output_field,
        settings.task_field,
    )
    prepare_with(settings, records, tokenizer, source=str(settings.data_file))


if __name__ == "__main__":
    run_cli(main)
