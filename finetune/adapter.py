"""Finetune a LLaMA checkpoint with LLaMA-Adapter (Zhang et al. 2023) on a prepared instruction dataset.

    python finetune/adapter.py --data_dir data/alpaca --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth

The base weights stay frozen (in bf16 by default); layers from --adapter_start_layer on learn a prompt of
--adapter_prompt_length vectors that their queries attend to through a zero-initialised gate.
Saves `lit-llama-adapter-finetuned.pth` (the adapter weights only) and `finetune_config.json` in --out_dir; use them
with generate/adapter.py. See howto/finetune_adapter.md.
"""
from pathlib import Path
from typing import Optional

from lit_llama.cli import run_cli
from lit_llama.precision import resolve_precision
from lit_llama.training import Hyperparameters, fit, load_data, load_model, setup_fabric


def main(
    data_dir: Path = Path("data/alpaca"),
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth"),
    out_dir: Path = Path("out/adapter/alpaca"),
    learning_rate: float = 9e-3,
    batch_size: int = 64,
    micro_batch_size: int = 4,
    epochs: int = 5,
    max_steps: Optional[int] = None,
    warmup_epochs: float = 2.0,
    weight_decay: float = 0.02,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
    eval_interval: int = 600,
    eval_iters: int = 100,
    save_interval: int = 1000,
    log_interval: int = 1,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    activation_checkpointing: bool = False,
    group_by_length: bool = False,
    seed: int = 1337,
    resume: Optional[str] = None,
) -> None:
    """Finetune with LLaMA-Adapter.

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
        warmup_epochs: Linear learning-rate warmup over this many epochs' worth of optimizer steps.
        weight_decay: AdamW weight decay.
        adapter_prompt_length: Learned prompt vectors per adapted layer.
        adapter_start_layer: The first layer that gets an adapter (earlier layers stay unchanged).
        eval_interval: Optimizer steps between validation-loss measurements (and sample generations).
        eval_iters: Validation micro-batches per measurement.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Optimizer steps between metric logs.
        devices: Devices (GPUs) per node; more than one shards the model with FSDP.
        num_nodes: Machines to train on (see howto/multi_gpu.md).
        precision: bf16-true (default where supported: bf16 base, fp32 adapter weights), bf16-mixed, 32-true, ...
        activation_checkpointing: Recompute activations in the backward pass: less memory, about a third slower.
        group_by_length: Batch samples of similar length together to cut padding (order stays random).
        seed: Seed for the adapter initialisation, data order and dropout.
        resume: "auto" to continue from the newest checkpoint in out_dir, or a checkpoint path.
    """
    hparams = Hyperparameters(
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
        max_steps=max_steps, warmup_epochs=warmup_epochs, weight_decay=weight_decay, eval_interval=eval_interval,
        eval_iters=eval_iters, save_interval=save_interval, log_interval=log_interval, seed=seed,
        group_by_length=group_by_length,
    )
    hparams.check(devices * num_nodes)
    adapter = dict(prompt_length=adapter_prompt_length, start_layer=adapter_start_layer)
    precision = resolve_precision(precision)
    train, val, meta, tokenizer = load_data(data_dir, checkpoint_path)

    fabric = setup_fabric(devices, num_nodes, precision, out_dir)
    model, record = load_model(
        fabric, checkpoint_path, "adapter", adapter, precision, meta, tokenizer, seed, activation_checkpointing
    )
    fit(fabric, model, hparams, train, val, tokenizer, record, out_dir, "lit-llama-adapter-finetuned.pth", resume)


if __name__ == "__main__":
    run_cli(main)
