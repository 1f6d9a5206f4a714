"""What every LoRA-throughput runner shares: the workload, the batches, the timing and the result line.

Runners for other libraries execute in their own virtual environment (`.venv-peers`), where lit_llama is not
installed, so this module needs only torch and the standard library, and runners take plain argparse options.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

IGNORE_INDEX = -100  # target value every library's cross-entropy skips: padding and prompt tokens


def runner_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", type=Path, required=True, help="JSON from benchmarks/lora_training.py")
    parser.add_argument("--model_dir", type=Path, required=True, help="this tool's copy of the same weights")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel choice)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, the same for every tool")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    return args


def load_workload(path: Path) -> list[dict]:
    """Pre-tokenized samples, each {"input_ids": [...], "labels": [...]} (labels -100 where no loss is taken)."""
    return json.loads(Path(path).read_text())["samples"]


def batches(samples: list[dict], micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, useful_tokens) per micro-batch, padded only to the longest sample in it (dynamic padding).

    Targets are the labels shifted by one, so every tool computes exactly the same next-token loss. Padding goes on
    the right, where causal attention keeps it invisible to real tokens, so no attention mask is needed anywhere.
    """
    for start in range(0, len(samples) - micro_batch + 1, micro_batch):
        chunk = samples[start : start + micro_batch]
        length = max(len(s["input_ids"]) for s in chunk) - 1
        inputs = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids, labels = sample["input_ids"], sample["labels"]
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            targets[row, : len(ids) - 1] = torch.tensor(labels[1:])
        yield inputs, targets, sum(len(s["input_ids"]) - 1 for s in chunk)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(tool: str, train_step: Callable, args: argparse.Namespace, **details) -> None:
    """Run `warmup` untimed then `steps` timed calls of train_step(inputs, targets) -> loss; print one JSON line."""
    samples = load_workload(args.workload)
    needed = (args.warmup + args.steps) * args.micro_batch
    if len(samples) < needed:
        sys.exit(f"error: workload has {len(samples)} samples, {needed} needed")
    all_batches = list(batches(samples[:needed], args.micro_batch))
    losses = [train_step(inputs, targets) for inputs, targets, _ in all_batches[: args.warmup]]
    timed = all_batches[args.warmup :]
    start = time.perf_counter()
    losses += [train_step(inputs, targets) for inputs, targets, _ in timed]
    seconds = time.perf_counter() - start
    useful = sum(n for _, _, n in timed)
    padded = sum(inputs.numel() for inputs, _, _ in timed)
    result = dict(
        tool=tool, tokens_per_s=useful / seconds, seconds=seconds, useful_tokens=useful, padded_tokens=padded,
        steps=args.steps, first_loss=losses[0], last_loss=losses[-1], peak_rss_mb=peak_rss_mb(),
        torch=torch.__version__, threads=torch.get_num_threads(), **details,
    )
    print("RESULT " + json.dumps(result), flush=True)
