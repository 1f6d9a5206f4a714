"""Prepare your own instruction dataset: a JSON list of records, JSON Lines or CSV, with configurable field names."""
from pathlib import Path
from typing import Optional

from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import load_records, load_tokenizer, prepare
from lit_llama.prompts import resolve_prompt_style


def main(
    data_file: Path,
    destination_path: OutputPath = OutputPath("data/custom"),
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    tokenizer_path: Optional[Path] = None,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    task_field: str = "task",
    test_split_size: int = 100,
    max_seq_length: int = 256,
    seed: int = 42,
    mask_inputs: bool = True,
    prompt_style: Optional[str] = None,
    skip_long: bool = False,
) -> None:
    """Split and tokenize a .json, .jsonl or .csv file into train.pt, test.pt, test.json and meta.json.

    Args:
        data_file: The records: a JSON list of objects, one JSON object per line, or a CSV with a header row.
        destination_path: Directory for the prepared files.
        checkpoint_dir: Checkpoint whose tokenizer to use.
        tokenizer_path: A tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        instruction_field: Name of the field holding the instruction.
        input_field: Name of the optional field holding extra input (missing means none).
        output_field: Name of the field holding the expected response.
        task_field: Name of an optional field naming each record's task (kept in test.json for per-task scores).
        test_split_size: Number of records held out for evaluation.
        max_seq_length: Samples longer than this (in tokens) are truncated, keeping their EOS.
        seed: Seed of the train/test split.
        mask_inputs: Compute the loss on the response only (prompt labels set to -100).
        prompt_style: Prompt template: "alpaca", "chatml", "chat_template" (the checkpoint's own) or one you
            registered in lit_llama/prompts.py; default: the checkpoint's chat template if it has one, else alpaca.
        skip_long: Drop samples longer than max_seq_length instead of truncating them.
    """
    tokenizer = load_tokenizer(checkpoint_dir, tokenizer_path)
    records = load_records(data_file, instruction_field, input_field, output_field, task_field)
    prepare(
        records, destination_path, tokenizer, source=str(data_file), test_split_size=test_split_size,
        max_seq_length=max_seq_length, seed=seed, mask_inputs=mask_inputs,
        prompt_style=resolve_prompt_style(prompt_style, tokenizer.path.parent),
        skip_long=skip_long,
    )


if __name__ == "__main__":
    run_cli(main)
