"""LoRA training throughput of litgpt, the way its `finetune/lora.py` trains: Fabric with precision bf16-true,
`litgpt.lora.GPT` with LoRA on query and value, `mark_only_lora_as_trainable`, the model called with
`lm_head_chunk_size=128` and `chunked_cross_entropy`, AdamW. Run with the peers' venv; benchmarks/lora_training.py
calls it, with `--model_dir` holding litgpt's `lit_model.pth` + `model_config.yaml` (from `litgpt convert_to_litgpt`).
"""
import sys
from pathlib import Path

import lightning as L
import torch
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.utils import chunked_cross_entropy, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, runner_arguments  # noqa: E402


def main() -> None:
    args = runner_arguments(__doc__)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=args.precision)
    config = Config.from_file(
        args.model_dir / "model_config.yaml", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_query=True, lora_value=True,
    )
    with fabric.init_module(empty_init=False):  # as litgpt does on one device: LoRA B starts at zero
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    optimizer = fabric.setup_optimizers(optimizer)
    load_checkpoint(fabric, model, args.model_dir / "lit_model.pth", strict=False)
    model.train()

    def train_step(batch: dict) -> float:
        logits = model(batch["inputs"], lm_head_chunk_size=128)
        loss = chunked_cross_entropy(logits, batch["targets"])
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measure("litgpt", train_step, args, trainable_parameters=trainable)


if __name__ == "__main__":
    main()
