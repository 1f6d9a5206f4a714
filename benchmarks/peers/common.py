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
    parser.add_argument("--quantize", choices=["nf4"], help="QLoRA: the frozen base in NF4 (compute in bf16)")
    parser.add_argument("--precision", choices=["bf16-true", "32-true"], default="bf16-true",
                        help="the frozen weights' dtype and the compute dtype, the same for every tool")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    return args


def load_workload(path: Path) -> list[dict]:
    """Pre-tokenized samples, each {"input_ids": [...], "labels": [...]} (labels -100 where no loss is taken)."""
    return json.loads(Path(path).read_text())["samples"]


def batches(samples: list[dict], micro_batch: int) -> Iterator[dict]:
    """Micro-batches padded only to their longest sample (dynamic padding), with padding on the right, where causal
    attention keeps it invisible to real tokens, so no attention mask is needed anywhere.

    Each holds `input_ids`/`labels` (whole samples; lit-llama's loop shifts them itself) and the same shifted by
    one, `inputs`/`targets`, for tools whose loss compares logits[t] to targets[t]; every tool learns the same
    next-token predictions. `useful_tokens` counts the real (non-padding) input positions.
    """
    for start in range(0, len(samples) - micro_batch + 1, micro_batch):
        chunk = samples[start : start + micro_batch]
        longest = max(len(s["input_ids"]) for s in chunk)
        input_ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        labels = torch.full((len(chunk), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(chunk):
            input_ids[row, : len(sample["input_ids"])] = torch.tensor(sample["input_ids"])
            labels[row, : len(sample["labels"])] = torch.tensor(sample["labels"])
        yield dict(
            input_ids=input_ids, labels=labels, inputs=input_ids[:, :-1], targets=labels[:, 1:],
            useful_tokens=sum(len(s["input_ids"]) - 1 for s in chunk),
        )


def peak_rss_mb() -> float:
    """The process's high-water mark, loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def measure(tool: str, train_step: Callable[[dict], float], args: argparse.Namespace, **details) -> None:
    """Run `warmup` untimed then `steps` timed calls of train_step(batch) -> loss; print one RESULT JSON line."""
    samples = load_workload(args.workload)
    needed = (args.warmup + args.steps) * args.micro_batch
    if len(samples) < needed:
        sys.exit(f"error: workload has {len(samples)} samples, {needed} needed")
    all_batches = list(batches(samples[:needed], args.micro_batch))
    rss_before = current_rss_mb()  # the model is loaded and set up
    losses, rss = [], []
    for batch in all_batches[: args.warmup]:
        losses.append(train_step(batch))
        rss.append(current_rss_mb())
    timed = all_batches[args.warmup :]
    start = time.perf_counter()
    for batch in timed:
        losses.append(train_step(batch))
        rss.append(current_rss_mb())  # microseconds: no effect on the timing
    seconds = time.perf_counter() - start
    useful = sum(batch["useful_tokens"] for batch in timed)
    result = dict(
        tool=tool, quantize=args.quantize, tokens_per_s=useful / seconds, seconds=seconds, useful_tokens=useful,
        padded_tokens=sum(batch["inputs"].numel() for batch in timed), steps=args.steps, first_loss=losses[0],
        last_loss=losses[-1], peak_rss_mb=peak_rss_mb(), rss_before_training_mb=rss_before,
        rss_between_steps_mb=max(rss),
        torch=torch.__version__, threads=torch.get_num_threads(),
        **details,
    )
    print("RESULT " + json.dumps(result), flush=True)
