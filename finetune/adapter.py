"""Finetune a LLaMA checkpoint with LLaMA-Adapter (Zhang et al. 2023) on a prepared instruction dataset.

    python finetune/adapter.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth

The base weights stay frozen (in bf16 by default); layers from --adapter.start_layer on learn a prompt of
--adapter.prompt_length vectors that their queries attend to through a zero-initialised gate.
Saves `lit-llama-adapter-finetuned.pth` (the adapter weights only) and `finetune_config.json` in --out_dir; use them
with generate/adapter.py. Every option and its default: -h. See howto/finetune_adapter.md.
"""
from dataclasses import dataclass

from lit_llama.adapter import ADAPTER
from lit_llama.cli import OutputPath, run_cli
from lit_llama.training import AdapterFinetuneArgs, finetune


@dataclass
class AdapterFinetune(AdapterFinetuneArgs):
    """Finetune with LLaMA-Adapter (the paper's recipe for the training settings)."""

    out_dir: OutputPath = OutputPath("out/adapter/alpaca")


def main(settings: AdapterFinetune) -> None:
    finetune(ADAPTER, settings.adapter, settings)


if __name__ == "__main__":
    run_cli(main)
