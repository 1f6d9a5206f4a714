"""LoRA training throughput of lit-llama, the way finetune/lora.py trains: the model in bf16 (bf16-true), LoRA on
q_proj/v_proj via `add_lora` + `mark_only_lora_as_trainable`, AdamW. Runs with the project's own Python;
benchmarks/lora_training.py calls it, with `--model_dir` the lit-llama checkpoint directory.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_llama.checkpoint import load_config, load_torch, load_weights, weights_path
from lit_llama.lora import add_lora, mark_only_lora_as_trainable
from lit_llama.model import LLaMA

sys.path.insert(0, str(Path(__file__).parent))
from common import IGNORE_INDEX, measure, runner_arguments  # noqa: E402


def main() -> None:
    args = runner_arguments(__doc__)
    path = weights_path(args.model_dir)
    state_dict = load_torch(path)
    with torch.device("meta"):
        model = LLaMA(load_config(path, state_dict))
    load_weights(model, state_dict, path, dtype=torch.bfloat16)
    add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=["query", "value"])
    mark_only_lora_as_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    def train_step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measure("lit-llama", train_step, args, trainable_parameters=trainable)


if __name__ == "__main__":
    main()
