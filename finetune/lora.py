"""Finetune a LLaMA checkpoint with LoRA (Hu et al. 2021) on a prepared instruction dataset.

    python finetune/lora.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth

The base weights stay frozen (in bf16 by default); only the low-rank A and B matrices of the --lora.targets layers
train. Saves `lit-llama-lora-finetuned.pth` (the LoRA weights only) and `finetune_config.json` in --out_dir; use them
with generate/lora.py. Every option and its default: -h. See howto/finetune_lora.md.
"""
from dataclasses import dataclass, field

from lit_llama.cli import OutputPath, run_cli
from lit_llama.lora import LORA, LoRAArgs
from lit_llama.training import FinetuneArgs, TrainArgs, finetune


@dataclass
class LoRAFinetune(FinetuneArgs):
    """Finetune with LoRA.

    Args:
        lora: Rank, alpha, dropout and target layers of the LoRA update.
    """

    out_dir: OutputPath = OutputPath("out/lora/alpaca")
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    train: TrainArgs = field(default_factory=lambda: TrainArgs(learning_rate=3e-4, batch_size=128, warmup_steps=100))


def main(settings: LoRAFinetune) -> None:
    finetune(LORA, settings.lora, settings)


if __name__ == "__main__":
    run_cli(main)
