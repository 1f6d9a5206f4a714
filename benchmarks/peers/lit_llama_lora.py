"""LoRA training throughput of lit-llama, with the very pieces finetune/lora.py trains with: `setup_fabric` and
`load_model` (frozen weights in bf16 or fp32 as `--precision` says, or quantized with `--quantize nf4`: QLoRA; LoRA A/B in fp32, on q_proj/v_proj)
and `loss_sum` (the output head only at positions whose label counts), AdamW. Runs with the project's own Python; benchmarks/lora_training.py calls it, with
`--model_dir` the lit-llama checkpoint directory (weights, model_config.json, tokenizer files).
"""
import sys
import tempfile
from pathlib import Path

import torch

from lit_llama.data import IGNORE_INDEX
from lit_llama.lora import LORA, LoRAArgs
from lit_llama.tokenizer import Tokenizer
from lit_llama.prompts import resolve_prompt_style
from lit_llama.training.args import TrainArgs
from lit_llama.training.loop import loss_sum
from lit_llama.training.setup import PreparedData, load_model, setup_fabric

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, runner_arguments  # noqa: E402


def main() -> None:
    args = runner_arguments(__doc__)
    precision = args.precision
    fabric = setup_fabric(1, 1, precision, Path(tempfile.mkdtemp(prefix="lit-llama-bench-")))
    lora = LoRAArgs(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=["query", "value"])
    # the prompt style is only recorded in finetune_config, which the benchmark does not save
    tokenizer = Tokenizer(args.model_dir)
    data = PreparedData(train=[], val=[], meta={"prompt_style": "alpaca"}, tokenizer=tokenizer,
                        style=resolve_prompt_style("alpaca", args.model_dir))
    model, _ = load_model(fabric, args.model_dir, LORA, lora, precision, data, TrainArgs(seed=1337), args.quantize)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    optimizer = fabric.setup_optimizers(optimizer)
    model.train()

    def train_step(batch: dict) -> float:
        # lit-llama's collate gives whole samples; loss_sum shifts them and sums over the counted positions
        label_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss = loss_sum(model, batch["input_ids"], batch["labels"]) / label_tokens
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measure("lit-llama", train_step, args, trainable_parameters=trainable)


if __name__ == "__main__":
    main()
