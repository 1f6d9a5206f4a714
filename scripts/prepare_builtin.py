"""Prepare the built-in task dataset (lit_llama/builtin_tasks.py): offline, deterministic, exactly checkable answers."""
from pathlib import Path
from typing import Optional

from lit_llama.builtin_tasks import generate
from lit_llama.files import save_json
from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import load_tokenizer, prepare
from lit_llama.prompts import resolve_prompt_style


def main(
    destination_path: OutputPath = OutputPath("data/builtin"),
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    tokenizer_path: Optional[Path] = None,
    num_records: int = 6000,
    test_split_size: int = 300,
    max_seq_length: int = 128,
    seed: int = 42,
    mask_inputs: bool = True,
    prompt_style: Optional[str] = None,
    skip_long: bool = False,
) -> None:
    """Generate the built-in tasks into builtin.json (Alpaca format plus "task"), then split and tokenize them into
    train.pt, test.pt, test.json and meta.json.

    Args:
        destination_path: Directory for builtin.json and the prepared files.
        checkpoint_dir: Checkpoint whose tokenizer to use.
        tokenizer_path: A tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        num_records: Number of distinct records to generate, spread evenly over the tasks (at most 1,000,000).
        test_split_size: Number of records held out for evaluation.
        max_seq_length: Samples longer than this (in tokens) are truncated, keeping their EOS.
        seed: Seed of the generator and of the train/test split.
        mask_inputs: Compute the loss on the response only (prompt labels set to -100).
        prompt_style: Prompt template: "alpaca", "chatml", "chat_template" (the checkpoint's own) or one you
            registered in lit_llama/prompts.py; default: the checkpoint's chat template if it has one, else alpaca.
        skip_long: Drop samples longer than max_seq_length instead of truncating them.
    """
    tokenizer = load_tokenizer(checkpoint_dir, tokenizer_path)
    style = resolve_prompt_style(prompt_style, tokenizer.path.parent)
    records = generate(num_records, seed)
    prepare(
        records, destination_path, tokenizer, source=f"builtin tasks (seed {seed})", test_split_size=test_split_size,
        max_seq_length=max_seq_length, seed=seed, mask_inputs=mask_inputs, prompt_style=style, skip_long=skip_long,
    )
    save_json(records, destination_path / "builtin.json")  # once the dataset is there: a failure leaves nothing


if __name__ == "__main__":
    run_cli(main)
