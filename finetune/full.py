"""Finetune every weight of a LLaMA checkpoint on a prepared instruction dataset.

    python finetune/full.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --devices 4

Needs far more memory than LoRA or the adapters: weights, gradients and two AdamW moments for every parameter
(about 16 bytes per parameter with bf16-mixed), which --devices > 1 shards across GPUs with FSDP.
Saves `lit-llama-full-finetuned.pth` (a whole state dict) and `finetune_config.json` in --out_dir; use them with
generate/full.py. See howto/finetune_full.md.
"""
from pathlib import Path
from typing import Optional

from lit_llama.cli import run_cli
from lit_llama.precision import resolve_precision
from lit_llama.training import Hyperparameters, fit, load_data, load_model, setup_fabric


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth"),
    out_dir: Path = Path("out/full/alpaca"),
    learning_rate: float = 3e-5,
    batch_size: int = 128,
    micro_batch_size: int = 4,
    epochs: int = 4,
    max_steps: Optional[int] = None,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    eval_interval: int = 1000,
    eval_iters: int = 100,
    save_interval: int = 1000,
    log_interval: int = 100,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    activation_checkpointing: bool = False,
    group_by_length: bool = False,
    seed: int = 1337,
    resume: Optional[str] = None,
) -> None:
    """Finetune all weights.

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
        eval_interval: Optimizer steps between validation-loss measurements (and sample generations).
        eval_iters: Validation micro-batches per measurement.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Optimizer steps between metric logs.
        devices: Devices (GPUs) per node; more than one shards weights, gradients and optimizer state with FSDP.
        num_nodes: Machines to train on (see howto/multi_gpu.md).
        precision: bf16-mixed (default where supported: fp32 weights, bf16 compute), bf16-true, 32-true, ...
        activation_checkpointing: Recompute activations in the backward pass: less memory, about a third slower.
        group_by_length: Batch samples of similar length together to cut padding (order stays random).
        seed: Seed for the data order.
        resume: "auto" to continue from the newest checkpoint in out_dir, or a checkpoint path.
    """
    hparams = Hyperparameters(
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
        max_steps=max_steps, warmup_steps=warmup_steps, weight_decay=weight_decay, eval_interval=eval_interval,
        eval_iters=eval_iters, save_interval=save_interval, log_interval=log_interval, seed=seed,
        group_by_length=group_by_length,
    )
    hparams.check(devices * num_nodes)
    precision = resolve_precision(precision, mixed=True)
    train, val, meta, tokenizer = load_data(data_dir, checkpoint_path)

    fabric = setup_fabric(devices, num_nodes, precision, out_dir)
    model, record = load_model(
        fabric, checkpoint_path, "full", {}, precision, meta, tokenizer, seed, activation_checkpointing
    )
    fit(fabric, model, hparams, train, val, tokenizer, record, out_dir, "lit-llama-full-finetuned.pth", resume)


if __name__ == "__main__":
    run_cli(main)
