"""The training loop: whole epochs in a seeded order, gradients accumulated over micro-batches, the loss as the
mean cross-entropy over every label token of an optimizer step (across micro-batches and devices), computed only at
the positions whose label counts; validation with a sample response; checkpoints; stop on a signal."""
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric import Fabric
from tqdm import tqdm

from lit_llama.batching import collate, epoch_steps
from lit_llama.data import IGNORE_INDEX
from lit_llama.errors import UserError
from lit_llama.files import save_json, save_torch
from lit_llama.finetuned import FINETUNE_CONFIG_NAME
from lit_llama.generation import generate
from lit_llama.method import Method
from lit_llama.training.args import EvalArgs, TrainArgs
from lit_llama.training.metrics import finalize_loggers, plot_losses, restore_metrics
from lit_llama.training.resume import (
    find_resume, last_good_checkpoint, load_resume, save_checkpoint, trainable_state_dict,
)
from lit_llama.training.setup import PreparedData

SAMPLE_TOKENS = 100


@dataclass
class Run:
    """Where a run writes and what it records: its out_dir, the finetuning method, the finetune_config.json record
    and the --resume choice (None: a fresh run)."""

    out_dir: Path
    method: Method
    record: dict
    resume: Optional[str] = None


def fit(fabric: Fabric, model, data: PreparedData, run: Run, train: TrainArgs, eval: EvalArgs) -> None:
    """Train for `train.epochs` (or `train.max_steps` optimizer steps), then save the trained weights."""
    world, rank = fabric.world_size, fabric.global_rank
    micro_per_step = train.accumulation(world) * world
    lengths = [len(sample["input_ids"]) for sample in data.train]
    label_tokens = [int((sample["labels"][1:] != IGNORE_INDEX).sum()) for sample in data.train]
    steps_per_epoch = len(data.train) // train.micro_batch_size // micro_per_step
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set ({len(data.train)} samples) is smaller than --train.batch_size {train.batch_size}"
        )
    total_steps = min(train.max_steps or math.inf, train.epochs * steps_per_epoch)
    # gradients of LoRA/adapter weights are tiny: sync them once per step. Full finetuning syncs every micro-batch so
    # that FSDP never holds unsharded gradients of the whole model
    skip_sync = not run.method.trains_base_weights

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=train.learning_rate, weight_decay=train.weight_decay
    )
    optimizer = fabric.setup_optimizers(optimizer)
    progress = {"step": 0, "epoch": 0, "epoch_step": 0}
    resume_path = find_resume(run.resume, run.out_dir)
    if resume_path is not None:
        progress = load_resume(fabric, model, optimizer, resume_path, train)
        fabric.print(f"resumed from {resume_path} at step {progress['step']}", file=sys.stderr)
    else:
        torch.manual_seed(train.seed + rank)  # dropout masks differ across ranks, as their data does
    restore_metrics(fabric, run.out_dir, progress["step"])
    if rank == 0:
        save_json(run.record, run.out_dir / FINETUNE_CONFIG_NAME)

    fabric.print(
        f"{model.num_parameters(trainable_only=True):,} trainable of {model.num_parameters():,} parameters; "
        f"{steps_per_epoch} steps per epoch of {train.batch_size} samples ({train.accumulation(world)} micro-batches "
        f"of {train.micro_batch_size} on each of {world} devices); {total_steps} steps, warmup {train.warmup_steps}",
        file=sys.stderr,
    )
    if train.warmup_steps > total_steps:
        fabric.print(
            f"warning: --train.warmup_steps {train.warmup_steps} is longer than the run's {total_steps} steps: the "
            f"learning rate never passes {lr_at(total_steps - 1, train.learning_rate, train.warmup_steps):.2e} of "
            f"--train.learning_rate {train.learning_rate:.2e}; set warmup_steps below the run's length", file=sys.stderr,
        )
    step, epoch, start = progress["step"], progress["epoch"], progress["epoch_step"]
    last_saved = resume_path and resume_path.with_name(resume_path.name.replace("-resume.pth", "-ckpt.pth"))
    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=rank != 0, dynamic_ncols=True)
    losses, tokens, clock = [], 0, time.perf_counter()
    model.train()
    try:
        while step < total_steps:
            schedule = epoch_steps(lengths, train.micro_batch_size, micro_per_step, train.seed, epoch,
                                   train.group_by_length)
            for epoch_step in range(start, len(schedule)):
                if step >= total_steps:
                    break
                lr = lr_at(step, train.learning_rate, train.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                everyone = schedule[epoch_step]  # this step's micro-batches, all ranks'
                step_label_tokens = max(1, sum(label_tokens[i] for batch in everyone for i in batch))
                loss_total = accumulate_gradients(
                    fabric, model, [[data.train[i] for i in batch] for batch in everyone[rank::world]],
                    step_label_tokens, skip_sync,
                )
                # the one sync per step: the step's mean loss over all ranks, and whether any rank was signalled
                flag = torch.tensor(float(stop.signum is not None), device=fabric.device)
                loss_total, stopping = fabric.all_reduce(torch.stack((loss_total, flag)), reduce_op="sum").tolist()
                step_loss = loss_total / step_label_tokens
                if not math.isfinite(step_loss):
                    raise UserError(f"the loss became {step_loss} at step {step + 1}: stopping "
                                    f"({last_good_checkpoint(run.out_dir, step)})")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                tokens += sum(lengths[i] for batch in everyone for i in batch)
                progress = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1}
                if epoch_step + 1 == len(schedule):
                    progress = {"step": step, "epoch": epoch + 1, "epoch_step": 0}
                bar.update(1)

                if step % train.log_interval == 0:
                    tokens_per_sec = tokens / (time.perf_counter() - clock)
                    metrics = {"train_loss": sum(losses) / len(losses), "learning_rate": lr}
                    metrics |= {"tokens_per_sec": tokens_per_sec, "epoch": step / steps_per_epoch}
                    fabric.log_dict(metrics, step)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                    losses, tokens, clock = [], 0, time.perf_counter()
                pause = time.perf_counter()
                if step % eval.interval == 0 or (step == total_steps and eval.final):
                    evaluate(fabric, model, data, eval, train.micro_batch_size, step)
                if step % train.save_interval == 0 or step == total_steps or stopping:
                    last_saved = save_checkpoint(fabric, model, optimizer, train, progress, run.out_dir, last_saved)
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                    message = f"stopped by {name} after step {step}; saved {last_saved}: continue with --resume auto"
                    fabric.print(message, file=sys.stderr)
                    finalize_loggers(fabric, "interrupted")
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
                clock += time.perf_counter() - pause  # evaluation and saving do not count against tokens/s
            epoch, start = epoch + 1, 0
    finally:
        bar.close()
        stop.restore()

    weights = trainable_state_dict(model)
    final = run.out_dir / run.method.weights_name
    if rank == 0:
        save_torch(weights, final)
        plot_losses(run.out_dir)
        print(f"saved {final} (loss curve: {run.out_dir / 'loss.png'})", file=sys.stderr)
    finalize_loggers(fabric, "success")
    fabric.barrier()


def accumulate_gradients(
    fabric: Fabric, model, micro_batches: list[list[dict]], step_label_tokens: int, skip_sync: bool
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one optimizer step; returns their summed loss.

    Each micro-batch's summed loss is scaled so that the accumulated gradient, after FSDP averages it over the
    ranks, is the gradient of the mean loss over every label token of the step.
    """
    loss_total = torch.zeros((), device=fabric.device)
    for micro, samples in enumerate(micro_batches):
        input_ids, labels = fabric.to_device(collate(samples))
        with fabric.no_backward_sync(model, enabled=skip_sync and micro < len(micro_batches) - 1):
            loss = loss_sum(model, input_ids, labels)
            fabric.backward(loss * (fabric.world_size / step_label_tokens))
        loss_total += loss.detach()
    return loss_total


def lr_at(step: int, peak: float, warmup: int) -> float:
    """The learning rate of optimizer step `step`: linear warmup over `warmup` steps, then constant."""
    return peak * min(1.0, (step + 1) / warmup) if warmup > 0 else peak


def loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label counts. Only those positions' hidden states
    reach the output head: with prompts masked and padding, most logits are never computed."""
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    # position t predicts token t + 1: the last position predicts nothing
    logits_at = torch.cat((counted, torch.zeros_like(counted[:, :1])), dim=1)
    return model(input_ids, logits_at=logits_at, targets=targets[counted])


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


@torch.no_grad()
def evaluate(
    fabric: Fabric, model, data: PreparedData, eval: EvalArgs, micro_batch_size: int, step: int
) -> float:
    """Validation loss over `eval.iters` micro-batches (split over the ranks), and one greedy sample response."""
    model.eval()
    batches = [data.val[i : i + micro_batch_size] for i in range(0, len(data.val), micro_batch_size)]
    per_rank = max(1, min(eval.iters, len(batches)) // fabric.world_size)
    totals = torch.zeros(2, device=fabric.device)
    for i in range(per_rank):
        batch = batches[(fabric.global_rank + i * fabric.world_size) % len(batches)]
        input_ids, labels = fabric.to_device(collate(batch))
        totals[0] += loss_sum(model, input_ids, labels)
        totals[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    loss_total, count = fabric.all_reduce(totals, reduce_op="sum").tolist()
    val_loss = loss_total / max(count, 1)
    response = sample_response(model, data)
    model.train()
    fabric.log_dict({"val_loss": val_loss}, step)
    if fabric.global_rank == 0:
        message = f"step {step}: validation loss {val_loss:.4f}\n{data.sample_prompt}\n> {response}\n"
        tqdm.write(message, file=sys.stderr)
    return val_loss


def sample_response(model, data: PreparedData) -> str:
    """Greedy, so every rank generates the same tokens (under FSDP all ranks must run the same forwards)."""
    tokenizer = data.tokenizer
    prompt = data.sample_ids if data.sample_ids is not None else data.style.prompt_ids(tokenizer, data.sample_prompt)
    room = min(SAMPLE_TOKENS, model.config.block_size - len(prompt))
    if room < 1:
        return ""
    ids = generate(model, prompt, room, temperature=0, eos_id=tokenizer.eos_id, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(list(ids))
