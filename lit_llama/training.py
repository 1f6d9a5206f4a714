"""The training mechanics the four finetune scripts share, written once.

    fabric = setup_fabric(devices, num_nodes, precision, out_dir)        # one process per device, FSDP2 when > 1
    train, val, meta, tokenizer = load_data(data_dir, checkpoint_path)
    model, record = load_model(fabric, checkpoint_path, "lora", options, precision, meta, tokenizer, seed)
    fit(fabric, model, hparams, train, val, tokenizer, record, out_dir, "lit-llama-lora-finetuned.pth", resume)

`fit` runs whole epochs in a seeded order, accumulates gradients over micro-batches, evaluates, saves atomic
checkpoints (`iter-000200-ckpt.pth`: the trained weights; `iter-000200-resume.pth`: optimizer, step, RNG and data
position) and resumes from them bit-exactly. The loss is the mean cross-entropy over every label token of the
optimizer step (across micro-batches and devices), computed only at positions whose label counts.
"""
import csv
import math
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from lit_llama.batching import collate, epoch_steps
from lit_llama.checkpoint import atomic_path, checkpoint_dir, load_config, load_torch, load_weights, save_json
from lit_llama.checkpoint import save_torch, weights_path
from lit_llama.data import IGNORE_INDEX, check_tokenizer, load_prepared
from lit_llama.errors import UserError
from lit_llama.finetuned import FINETUNE_CONFIG_NAME, apply_method, finetune_config, mark_trainable
from lit_llama.generation import generate
from lit_llama.model import LLaMA
from lit_llama.precision import autocast_dtype, weights_dtype
from lit_llama.prompts import PromptStyle
from lit_llama.tokenizer import Tokenizer

SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."
SAMPLE_TOKENS = 100


@dataclass
class Hyperparameters:
    learning_rate: float
    batch_size: int  # samples per optimizer step, over all devices
    micro_batch_size: int  # samples per forward/backward on one device
    epochs: int
    weight_decay: float
    warmup_steps: int = 0  # optimizer steps of linear warmup
    warmup_epochs: float = 0.0  # or warmup for this many epochs (counted in optimizer steps too)
    max_steps: Optional[int] = None  # stop early after this many optimizer steps
    eval_interval: int = 100
    eval_iters: int = 100
    save_interval: int = 100
    log_interval: int = 1
    seed: int = 1337
    group_by_length: bool = False

    def check(self, world_size: int) -> None:
        if self.micro_batch_size < 1 or self.micro_batch_size > self.batch_size:
            raise UserError(
                f"--micro_batch_size {self.micro_batch_size} must be between 1 and --batch_size {self.batch_size}"
            )
        if self.batch_size % (self.micro_batch_size * world_size):
            raise UserError(
                f"--batch_size {self.batch_size} must be a multiple of --micro_batch_size {self.micro_batch_size} "
                f"times the number of devices ({world_size})"
            )
        for name in ("epochs", "eval_interval", "eval_iters", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max_steps must be at least 1, got {self.max_steps}")

    def accumulation(self, world_size: int) -> int:
        return self.batch_size // self.micro_batch_size // world_size


# ---------------------------------------------------------------------------------------------------------- setup


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as error:
        raise UserError(f"cannot write to --out_dir {out_dir}: {error.strerror}") from None


def shard_blocks(model: LLaMA, device_mesh) -> LLaMA:
    """FSDP2: each transformer block is one unit that is gathered for its forward and backward, then freed; the
    root (embedding, final norm, head) stays gathered between forward and backward since it is used twice."""
    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def setup_fabric(devices: int, num_nodes: int, precision: str, out_dir: Path) -> Fabric:
    """Launch one process per device. `precision` is resolved: for `-true` precisions we cast the weights
    ourselves (so trainable weights can stay fp32), for `-mixed` ones Fabric runs the forward under autocast."""
    check_writable(out_dir)
    world_size = devices * num_nodes
    strategy = "auto"
    if world_size > 1:
        strategy = ModelParallelStrategy(shard_blocks, data_parallel_size=world_size, tensor_parallel_size=1)
    fabric = Fabric(
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision if autocast_dtype(precision) else "32-true",
        loggers=CSVLogger(out_dir, name="logs", version="", flush_logs_every_n_steps=1),
    )
    fabric.launch()
    return fabric


def load_data(data_dir: Path, checkpoint_path: Path) -> tuple[list, list, dict, Tokenizer]:
    train, val, meta = load_prepared(data_dir)
    tokenizer = Tokenizer(checkpoint_dir(weights_path(checkpoint_path)))
    check_tokenizer(meta, tokenizer, data_dir)
    if not val:
        raise UserError(f"{data_dir} has no test samples to measure validation loss on: prepare it with a test split")
    return train, val, meta, tokenizer


def load_model(
    fabric: Fabric,
    checkpoint_path: Path,
    method: str,
    method_options: dict,
    precision: str,
    meta: dict,
    tokenizer: Tokenizer,
    seed: int,
    activation_checkpointing: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """The base model with the method's layers added, only the method's weights trainable, set up on the device(s).

    Frozen weights are held in the precision's dtype (bf16 by default); trainable weights of LoRA and the adapters
    stay fp32 so small updates are not rounded away. Also returns the finetune_config record.
    """
    path = weights_path(checkpoint_path)
    state_dict = load_torch(path)
    config = load_config(path, state_dict)
    record = finetune_config(method, config, meta["prompt_style"], tokenizer.identity, path, **method_options)
    dtype = weights_dtype(precision)
    torch.manual_seed(seed)  # the same initial LoRA/adapter weights on every rank
    with torch.device("meta"):
        model = LLaMA(config)
    load_weights(model, state_dict, path, dtype)
    apply_method(model, record)  # the new tensors are created and initialised beside the loaded weights
    mark_trainable(model, method)
    trainable_dtype = torch.float32 if method != "full" and dtype in (torch.bfloat16, torch.float16) else dtype
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(trainable_dtype)
    model.activation_checkpointing = activation_checkpointing
    return fabric.setup_module(model), record


# ------------------------------------------------------------------------------------------------------- the loop


def fit(
    fabric: Fabric,
    model: torch.nn.Module,
    hp: Hyperparameters,
    train: list,
    val: list,
    tokenizer: Tokenizer,
    record: dict,
    out_dir: Path,
    final_name: str,
    resume: Optional[str] = None,
) -> None:
    """Train for `hp.epochs` (or `hp.max_steps` optimizer steps), then save the trained weights as `final_name`."""
    world, rank = fabric.world_size, fabric.global_rank
    micro_per_step = hp.accumulation(world) * world
    lengths = [len(sample["input_ids"]) for sample in train]
    label_tokens = [int((sample["labels"][1:] != IGNORE_INDEX).sum()) for sample in train]
    steps_per_epoch = len(train) // hp.micro_batch_size // micro_per_step
    if steps_per_epoch == 0:
        raise UserError(f"the training set ({len(train)} samples) is smaller than --batch_size {hp.batch_size}")
    total_steps = min(hp.max_steps or math.inf, hp.epochs * steps_per_epoch)
    warmup = round(hp.warmup_epochs * steps_per_epoch) if hp.warmup_epochs else hp.warmup_steps
    vocab_size = model.config.vocab_size
    # gradients of LoRA/adapter weights are tiny: sync them once per step. Full finetuning syncs every micro-batch so
    # that FSDP never holds unsharded gradients of the whole model
    skip_sync = record["method"] != "full"

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    optimizer = fabric.setup_optimizers(optimizer)
    progress = {"step": 0, "epoch": 0, "epoch_step": 0}
    resume_path = find_resume(resume, out_dir)
    if resume_path is not None:
        progress = load_resume(fabric, model, optimizer, resume_path, hp)
        fabric.print(f"resumed from {resume_path} at step {progress['step']}", file=sys.stderr)
    else:
        torch.manual_seed(hp.seed + rank)  # dropout masks differ across ranks, as their data does
    restore_metrics(fabric, out_dir, progress["step"])
    if rank == 0:
        save_json(record, out_dir / FINETUNE_CONFIG_NAME)

    fabric.print(
        f"{model.num_parameters(trainable_only=True):,} trainable of {model.num_parameters():,} parameters; "
        f"{steps_per_epoch} steps per epoch of {hp.batch_size} samples ({hp.accumulation(world)} micro-batches of "
        f"{hp.micro_batch_size} on each of {world} devices); {total_steps} steps, warmup {warmup}",
        file=sys.stderr,
    )
    step, epoch, start = progress["step"], progress["epoch"], progress["epoch_step"]
    last_saved = resume_path
    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=rank != 0, dynamic_ncols=True)
    losses, tokens, clock = [], 0, time.perf_counter()
    model.train()
    try:
        while step < total_steps:
            schedule = epoch_steps(lengths, hp.micro_batch_size, micro_per_step, hp.seed, epoch, hp.group_by_length)
            for epoch_step in range(start, len(schedule)):
                if step >= total_steps:
                    break
                lr = learning_rate(step, hp.learning_rate, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                everyone = schedule[epoch_step]  # this step's micro-batches, all ranks'
                step_label_tokens = max(1, sum(label_tokens[i] for batch in everyone for i in batch))
                loss_total = accumulate_gradients(
                    fabric, model, [[train[i] for i in batch] for batch in everyone[rank::world]],
                    step_label_tokens, skip_sync, vocab_size,
                )
                # the one sync per step: the step's mean loss over all ranks, and whether any rank was signalled
                flag = torch.tensor(float(stop.signum is not None), device=fabric.device)
                loss_total, stopping = fabric.all_reduce(torch.stack((loss_total, flag)), reduce_op="sum").tolist()
                step_loss = loss_total / step_label_tokens
                if not math.isfinite(step_loss):
                    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
                    raise UserError(f"the loss became {step_loss} at step {step + 1}: stopping ({where})")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                tokens += sum(lengths[i] for batch in everyone for i in batch)
                progress = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1}
                if epoch_step + 1 == len(schedule):
                    progress = {"step": step, "epoch": epoch + 1, "epoch_step": 0}
                bar.update(1)

                if step % hp.log_interval == 0:
                    tokens_per_sec = tokens / (time.perf_counter() - clock)
                    metrics = {"train_loss": sum(losses) / len(losses), "learning_rate": lr}
                    metrics |= {"tokens_per_sec": tokens_per_sec, "epoch": step / steps_per_epoch}
                    fabric.log_dict(metrics, step)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                    losses, tokens, clock = [], 0, time.perf_counter()
                pause = time.perf_counter()
                if step % hp.eval_interval == 0 or step == total_steps:
                    evaluate(fabric, model, val, hp, tokenizer, record["prompt_style"], step, vocab_size)
                if step % hp.save_interval == 0 or step == total_steps or stopping:
                    last_saved = save_checkpoint(fabric, model, optimizer, hp, progress, out_dir)
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                    message = f"stopped by {name} after step {step}; saved {last_saved}: continue with --resume auto"
                    fabric.print(message, file=sys.stderr)
                    fabric.logger.finalize("interrupted")
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
                clock += time.perf_counter() - pause  # evaluation and saving do not count against tokens/s
            epoch, start = epoch + 1, 0
    finally:
        bar.close()
        stop.restore()

    weights = trainable_state_dict(model)
    if rank == 0:
        save_torch(weights, out_dir / final_name)
        plot_losses(out_dir)
        print(f"saved {out_dir / final_name} (loss curve: {out_dir / 'loss.png'})", file=sys.stderr)
    fabric.logger.finalize("success")
    fabric.barrier()


def accumulate_gradients(
    fabric: Fabric, model, micro_batches: list[list[dict]], step_label_tokens: int, skip_sync: bool, vocab_size: int
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one optimizer step; returns their summed loss.

    Each micro-batch's summed loss is scaled so that the accumulated gradient, after FSDP averages it over the
    ranks, is the gradient of the mean loss over every label token of the step.
    """
    loss_total = torch.zeros((), device=fabric.device)
    for micro, samples in enumerate(micro_batches):
        input_ids, labels = fabric.to_device(collate(samples))
        with fabric.no_backward_sync(model, enabled=skip_sync and micro < len(micro_batches) - 1):
            loss = loss_sum(model, input_ids, labels, vocab_size)
            fabric.backward(loss * (fabric.world_size / step_label_tokens))
        loss_total += loss.detach()
    return loss_total


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` optimizer steps, then constant."""
    return peak * min(1.0, (step + 1) / warmup) if warmup > 0 else peak


def loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label counts. Only those positions reach the output
    head: with prompts masked and padding, most logits are never computed."""
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    logits_at = F.pad(counted, (0, 1), value=False)  # the last position predicts no label
    logits = model(input_ids, logits_at=logits_at)[:, :vocab_size]  # the padded vocabulary columns are not tokens
    return F.cross_entropy(logits.float(), targets[counted], reduction="sum")


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, save a resumable checkpoint and exit; a second one stops now."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    fabric: Fabric, model, val: list, hp: Hyperparameters, tokenizer: Tokenizer, prompt_style: str, step: int,
    vocab_size: int,
) -> float:
    """Validation loss over `eval_iters` micro-batches (split over the ranks), and one greedy sample response."""
    model.eval()
    batches = [val[i : i + hp.micro_batch_size] for i in range(0, len(val), hp.micro_batch_size)]
    per_rank = max(1, min(hp.eval_iters, len(batches)) // fabric.world_size)
    totals = torch.zeros(2, device=fabric.device)
    for i in range(per_rank):
        batch = batches[(fabric.global_rank + i * fabric.world_size) % len(batches)]
        input_ids, labels = fabric.to_device(collate(batch))
        totals[0] += loss_sum(model, input_ids, labels, vocab_size)
        totals[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    loss_total, count = fabric.all_reduce(totals, reduce_op="sum").tolist()
    val_loss = loss_total / max(count, 1)
    response = sample_response(model, tokenizer, prompt_style)
    model.train()
    fabric.log_dict({"val_loss": val_loss}, step)
    if fabric.global_rank == 0:
        message = f"step {step}: validation loss {val_loss:.4f}\n{SAMPLE_INSTRUCTION}\n> {response}\n"
        tqdm.write(message, file=sys.stderr)
    return val_loss


def sample_response(model, tokenizer: Tokenizer, prompt_style: str) -> str:
    """Greedy, so every rank generates the same tokens (under FSDP all ranks must run the same forwards)."""
    prompt = tokenizer.encode(PromptStyle.from_name(prompt_style).apply(SAMPLE_INSTRUCTION))
    room = min(SAMPLE_TOKENS, model.config.block_size - len(prompt))
    if room < 1:
        return ""
    ids = generate(model, prompt, room, temperature=0, eos_id=tokenizer.eos_id, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(list(ids))


def metrics_path(out_dir: Path) -> Path:
    return out_dir / "logs" / "metrics.csv"


def read_metrics(out_dir: Path) -> list[dict]:
    path = metrics_path(out_dir)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def restore_metrics(fabric: Fabric, out_dir: Path, step: int) -> None:
    """A resumed run keeps the metrics up to its checkpoint (a fresh run starts a new file)."""
    kept = [row for row in read_metrics(out_dir) if row["step"] <= step]
    if fabric.global_rank == 0:
        metrics_path(out_dir).unlink(missing_ok=True)
    fabric.barrier()
    for row in kept:
        fabric.log_dict({k: v for k, v in row.items() if k != "step"}, int(row["step"]))


def plot_losses(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o-")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss", title=out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- checkpoints

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state_dict(model) -> dict:
    """The trained weights as whole CPU tensors (gathered from the FSDP shards onto rank 0; other ranks get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model.module, options=options)


def rng_states(fabric: Fabric) -> dict:
    """Every rank's RNG state (dropout), as uint8 tensors of shape (world_size, n)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if fabric.world_size == 1:
        return {k: v[None] for k, v in states.items()}
    return {k: fabric.all_gather(v.to(fabric.device)).cpu() for k, v in states.items()}


def save_checkpoint(fabric: Fabric, model, optimizer, hp: Hyperparameters, progress: dict, out_dir: Path) -> Path:
    """`iter-<step>-ckpt.pth`: the trained weights (what generate/*.py loads), then `iter-<step>-resume.pth`: what
    --resume needs besides them. Only the newest resume file is kept: for full finetuning it is twice the model."""
    weights = trainable_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model.module, optimizer.optimizer, options=FULL_STATE)
    rng = rng_states(fabric)
    name = f"iter-{progress['step']:06d}"
    if fabric.global_rank == 0:
        save_torch(weights, out_dir / f"{name}-ckpt.pth")
        state = {
            **progress, "weights": f"{name}-ckpt.pth", "optimizer": optimizer_state, "rng": rng,
            "world_size": fabric.world_size, "hyperparameters": asdict(hp),
        }
        save_torch(state, out_dir / f"{name}-resume.pth")
        for older in out_dir.glob("iter-*-resume.pth"):
            if older.name != f"{name}-resume.pth":
                older.unlink()
    fabric.barrier()
    return out_dir / f"{name}-ckpt.pth"


def find_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """`auto`: the newest resume file in out_dir, if any. A path may name the resume file or its -ckpt.pth."""
    if resume is None:
        return None
    if resume == "auto":
        found = sorted(out_dir.glob("iter-*-resume.pth"))
        if not found:
            print(f"--resume auto: no checkpoint in {out_dir} yet, starting from the beginning", file=sys.stderr)
        return found[-1] if found else None
    path = Path(resume)
    if path.name.endswith("-ckpt.pth"):
        path = path.with_name(path.name.replace("-ckpt.pth", "-resume.pth"))
    if not path.is_file():
        raise UserError(f"--resume {resume}: no resume checkpoint {path} (use --resume auto for the newest)")
    return path


def load_resume(fabric: Fabric, model, optimizer, path: Path, hp: Hyperparameters) -> dict:
    state = load_torch(path)
    before = state.get("hyperparameters", {})
    for key in ("batch_size", "seed", "group_by_length"):  # they decide the data order the position refers to
        if key in before and before[key] != getattr(hp, key):
            raise UserError(f"{path} was trained with --{key} {before[key]}: resume with the same value")
    weights = load_torch(path.parent / state["weights"])
    trainable = {name for name, p in model.module.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise UserError(f"{path.parent / state['weights']} holds other weights than this run trains (another method?)")
    set_model_state_dict(model.module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(
        model.module, optimizer.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    row = fabric.global_rank if state["world_size"] == fabric.world_size else 0
    torch.set_rng_state(state["rng"]["cpu"][row].clone())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"][row].clone())
    return {key: state[key] for key in ("step", "epoch", "epoch_step")}
