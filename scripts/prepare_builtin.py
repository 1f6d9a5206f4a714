"""Prepare the built-in task dataset (lit_llama/builtin_tasks.py): offline, deterministic, exactly checkable answers."""
from dataclasses import dataclass

from lit_llama.builtin_tasks import SOURCE, generate
from lit_llama.files import save_json
from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import PrepareArgs, check_destination, load_tokenizer, prepare_with


@dataclass
class PrepareBuiltin(PrepareArgs):
    """Generate the built-in tasks into builtin.json (Alpaca format plus "task"), then split and tokenize them into
    train.pt, test.pt, test.json and meta.json.

    Args:
        destination_path: Directory for builtin.json and the prepared files.
        num_records: Number of distinct records to generate, spread evenly over the tasks (at most 1,000,000).
        seed: Seed of the generator and of the train/test split.
    """

    destination_path: OutputPath = OutputPath("data/builtin")
    num_records: int = 6000
    test_split_size: int = 300
    max_seq_length: int = 128


def main(settings: PrepareBuiltin) -> None:
    check_destination(settings, also=("builtin.json",))
    tokenizer = load_tokenizer(settings.checkpoint_dir, settings.tokenizer_path)
    records = generate(settings.num_records, settings.seed)
    prepare_with(settings, records, tokenizer, source=f"{SOURCE} (seed {settings.seed})")
    # once the dataset is there: a failure leaves nothing
    save_json(records, settings.destination_path / "builtin.json")


if __name__ == "__main__":
    run_cli(main)
