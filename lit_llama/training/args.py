"""The training and evaluation settings every finetune script takes (`--train.*`, `--eval.*`)."""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lit_llama.adapter import AdapterArgs
from lit_llama.cli import OutputPath
from lit_llama.errors import UserError


@dataclass
class TrainArgs:
    """Training settings.

    Args:
        learning_rate: Peak AdamW learning rate, reached after the warmup and then kept.
        batch_size: Samples per optimizer step, over all devices.
        micro_batch_size: Samples per forward/backward pass on one device; gradients accumulate over
            batch_size / micro_batch_size / devices of them. Lower it when out of memory.
        epochs: Passes over the training set.
        max_steps: Stop after this many optimizer steps (a quick run) instead of after all epochs.
        warmup_steps: Optimizer steps of linear learning-rate warmup.
        weight_decay: AdamW weight decay.
        save_interval: Optimizer steps between checkpoints.
        log_interval: Optimizer steps between metric logs.
        seed: Seed for the method's initialisation, the data order and dropout.
        group_by_length: Batch samples of similar length together to cut padding (the order stays random).
        activation_checkpointing: Recompute activations in the backward pass: less memory, about a third slower.
    """

    learning_rate: float = 3e-4
    batch_size: int = 128
    micro_batch_size: int = 4
    epochs: int = 5
    max_steps: Optional[int] = None
    warmup_steps: int = 100
    weight_decay: float = 0.0
    save_interval: int = 100
    log_interval: int = 1
    seed: int = 1337
    group_by_length: bool = False
    activation_checkpointing: bool = False

    def check(self, world_size: int) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--train.learning_rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--train.weight_decay must be 0 or more, got {self.weight_decay}")
        if self.micro_batch_size < 1 or self.micro_batch_size > self.batch_size:
            raise UserError(
                f"--train.micro_batch_size {self.micro_batch_size} must be between 1 and "
                f"--train.batch_size {self.batch_size}"
            )
        if self.batch_size % (self.micro_batch_size * world_size):
            raise UserError(
                f"--train.batch_size {self.batch_size} must be a multiple of --train.micro_batch_size "
                f"{self.micro_batch_size} times the number of devices ({world_size})"
            )
        for name in ("epochs", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--train.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--train.max_steps must be at least 1, got {self.max_steps}")
        if self.warmup_steps < 0:
            raise UserError(f"--train.warmup_steps must be 0 or more, got {self.warmup_steps}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device."""
        return self.batch_size // self.micro_batch_size // world_size


@dataclass
class EvalArgs:
    """Evaluation settings.

    Args:
        interval: Optimizer steps between validation-loss measurements (each with one greedy answer to the first
            held-out prompt).
        iters: Validation micro-batches per measurement.
        final: Measure once more when the run ends, whatever the interval (false: only every `interval` steps).
    """

    interval: int = 100
    iters: int = 100
    final: bool = True

    def check(self) -> None:
        for name in ("interval", "iters"):
            if getattr(self, name) < 1:
                raise UserError(f"--eval.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class FinetuneArgs:
    """The settings every finetune script takes; each script's dataclass adds its method's and its own defaults.

    Args:
        data_dir: A prepared dataset (scripts/prepare_*.py) made with this checkpoint's tokenizer.
        checkpoint_path: The base model's lit-llama.pth (model_config.json and the tokenizer beside it).
        out_dir: Where checkpoints, finetune_config.json, logs/metrics.csv and loss.png go.
        train: Optimizer, batch sizes, duration and checkpoints.
        eval: Validation during training.
        devices: Devices (GPUs) per node; more than one shards the model with FSDP.
        num_nodes: Machines to train on (see howto/multi_gpu.md).
        precision: bf16-true (default where bf16 is native, a bf16 GPU or a CPU with AVX512-BF16/AMX, for LoRA and
            the adapters: bf16 base, fp32 trained weights), bf16-mixed (likewise for full finetuning: fp32 weights,
            bf16 compute), 32-true (the default elsewhere, e.g. on CPUs with AVX2 only), ...
        quantize: Hold the frozen base weights of the transformer blocks as nf4, nf4-dq (NF4 with quantized scales,
            QLoRA's double quantization) or int8, dequantized layer by layer in each product (LoRA and the adapters
            only; see howto/finetune_lora.md).
        resume: "auto" to continue from the newest checkpoint in out_dir, or a checkpoint path.
        logger: Where the metrics and settings also go, beside logs/metrics.csv (always written: loss.png and
            --resume read it): csv (nowhere else), tensorboard (out_dir/tensorboard/) or wandb (Weights & Biases;
            WANDB_MODE=offline keeps the run in out_dir/wandb/ for a later `wandb sync`).
    """

    data_dir: Path = Path("data/alpaca")
    checkpoint_path: Path = Path("checkpoints/lit-llama/7B/lit-llama.pth")
    out_dir: OutputPath = OutputPath("out/finetune")
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    devices: int = 1
    num_nodes: int = 1
    precision: Optional[str] = None
    quantize: Optional[str] = None
    resume: Optional[str] = None
    logger: str = "csv"


def adapter_recipe() -> TrainArgs:
    """LLaMA-Adapter's recipe (v1 and v2): a high learning rate warmed up over about two epochs of Alpaca (52k
    samples), less often evaluated and saved than LoRA."""
    return TrainArgs(learning_rate=9e-3, batch_size=64, weight_decay=0.02, warmup_steps=1600, save_interval=1000)


@dataclass
class AdapterFinetuneArgs(FinetuneArgs):
    """The settings of the LLaMA-Adapter finetunes (v1 and v2), with the adapter recipe for the training settings.

    Args:
        adapter: Prompt length and first adapted layer.
    """

    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    train: TrainArgs = field(default_factory=adapter_recipe)
