"""Finetune every weight of a LLaMA checkpoint on a prepared instruction dataset.

    python finetune/full.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --devices 4

Needs far more memory than LoRA or the adapters: weights, gradients and two AdamW moments for every parameter
(about 16 bytes per parameter with bf16-mixed, the default), which --devices > 1 shards across GPUs with FSDP.
Saves `lit-llama-full-finetuned.pth` (a whole state dict) and `finetune_config.json` in --out_dir; use them with
generate/full.py. Every option and its default: -h. See howto/finetune_full.md.
"""
from dataclasses import dataclass, field

from lit_llama.cli import OutputPath, run_cli
from lit_llama.method import FULL
from lit_llama.training import EvalArgs, FinetuneArgs, TrainArgs, finetune


@dataclass
class FullFinetune(FinetuneArgs):
    """Finetune all weights."""

    out_dir: OutputPath = OutputPath("out/full/alpaca")
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(learning_rate=3e-5, epochs=4, save_interval=1000, log_interval=100)
    )
    eval: EvalArgs = field(default_factory=lambda: EvalArgs(interval=1000))


def main(settings: FullFinetune) -> None:
    finetune(FULL, None, settings)


if __name__ == "__main__":
    run_cli(main)
