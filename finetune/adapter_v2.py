"""Finetune a LLaMA checkpoint with LLaMA-Adapter v2 (Gao et al. 2023) on a prepared instruction dataset.

    python finetune/adapter_v2.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth

The v1 adapter (a gated prompt in the layers from --adapter.start_layer on), plus a learned scale and bias for
every linear layer and trained RMSNorm weights; the rest stays frozen (in bf16 by default). Saves
`lit-llama-adapter-v2-finetuned.pth` (the trained weights only) and `finetune_config.json` in --out_dir; use them
with generate/adapter_v2.py. Every option and its default: -h. See howto/finetune_adapter.md.
"""
from dataclasses import dataclass

from lit_llama.adapter_v2 import ADAPTER_V2
from lit_llama.cli import OutputPath, run_cli
from lit_llama.training import AdapterFinetuneArgs, finetune


@dataclass
class AdapterV2Finetune(AdapterFinetuneArgs):
    """Finetune with LLaMA-Adapter v2, with the v1 recipe (finetune/adapter.py).

    Args:
        adapter: Prompt length and first adapted layer of the v1 prompts.
    """

    out_dir: OutputPath = OutputPath("out/adapter_v2/alpaca")


def main(settings: AdapterV2Finetune) -> None:
    finetune(ADAPTER_V2, settings.adapter, settings)


if __name__ == "__main__":
    run_cli(main)
