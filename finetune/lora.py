"""Finetune a LLaMA checkpoint with LoRA (Hu et al. 2021) on a prepared instruction dataset.

    python finetune/lora.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth

The base weights stay frozen (in bf16 by default); only the low-rank A and B matrices of the chosen layers train.
Saves `lit-llama-lora-finetuned.pth` (the LoRA weights only) and `finetune_config.json` in --out_dir; use them
with generate/lora.py. See howto/finetune_lora.md.
"""
from pathlib import Path
from typing import Optional

from lit_llama.cli import run_cli
from lit_llama.lora import LORA_TARGETS
from lit_llama.precision import resolve_precision
from lit_llama.training import Hyperparameters, fit, load_data, load_model, setup_fabric


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth"),
    out_dir: Path = Path("out/lora/alpaca"),
    learning_rate: float = 3e-4,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    epochs: int = 5,
    max_steps: Optional[int] = None,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 100,
    log_interval: int = 1,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    activation_checkpointing: bool = False,
    group_by_length: bool = False,
    seed: int = 1337,
    resume: Optional[str] = None,
) -> None:
    """Finetune with LoRA.

    Args:
        data_dir: A prepared dataset (scripts/prepare_*.py) made with this checkpoint's tokenizer.
        checkpoint_path: The base model's lit-llama.pth (model_config.json and the tokenizer beside it).
        out_dir: Where checkpoints, finetune_config.json, logs/metrics.csv and loss.png go.
        learning_rate: Peak AdamW learning rate, reached after the warmup and then kept.
        batch_size: Samples per optimizer step, over all devices.
        micro_batch_size: Samples per forward/backward pass on one device; gradients accumulate over
            batch_size / micro_batch_size / devices of them. Lower it when out of memory.
        epochs: Passes over the training set.
        max_steps: Stop after this many optimizer steps (a quick run) instead of after all epochs.
        warmup_steps: Optimizer steps of linear learning-rate warmup.
        weight_decay: AdamW weight decay.
        lora_r: Rank of the LoRA update.
        lora_alpha: LoRA scaling numerator: the update is scaled by alpha / r.
        lora_dropout: Dropout on the LoRA branch's input.
        lora_query: Adapt the attention query projection.
        lora_key: Adapt the attention key projection.
        lora_value: Adapt the attention value projection.
        lora_projection: Adapt the attention output projection.
        lora_mlp: Adapt the three MLP projections.
        lora_head: Adapt the output head (not possible for models with tied embeddings).
        eval_interval: Optimizer steps between validation-loss measurements (and sample generations).
        eval_iters: Validation micro-batches per measurement.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Optimizer steps between metric logs.
        devices: Devices (GPUs) per node; more than one shards the model with FSDP.
        num_nodes: Machines to train on (see howto/multi_gpu.md).
        precision: bf16-true (default where supported: bf16 base, fp32 LoRA weights), bf16-mixed, 32-true, ...
        activation_checkpointing: Recompute activations in the backward pass: less memory, about a third slower.
        group_by_length: Batch samples of similar length together to cut padding (order stays random).
        seed: Seed for the LoRA initialisation, data order and dropout.
        resume: "auto" to continue from the newest checkpoint in out_dir, or a checkpoint path.
    """
    hparams = Hyperparameters(
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
        max_steps=max_steps, warmup_steps=warmup_steps, weight_decay=weight_decay, eval_interval=eval_interval,
        eval_iters=eval_iters, save_interval=save_interval, log_interval=log_interval, seed=seed,
        group_by_length=group_by_length,
    )
    hparams.check(devices * num_nodes)
    flags = dict(
        query=lora_query, key=lora_key, value=lora_value, projection=lora_projection, mlp=lora_mlp, head=lora_head
    )
    lora = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=[t for t in LORA_TARGETS if flags[t]])
    precision = resolve_precision(precision)
    train, val, meta, tokenizer = load_data(data_dir, checkpoint_path)

    fabric = setup_fabric(devices, num_nodes, precision, out_dir)
    model, record = load_model(
        fabric, checkpoint_path, "lora", lora, precision, meta, tokenizer, seed, activation_checkpointing
    )
    fit(fabric, model, hparams, train, val, tokenizer, record, out_dir, "lit-llama-lora-finetuned.pth", resume)


if __name__ == "__main__":
    run_cli(main)
