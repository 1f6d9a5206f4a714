"""GPU readiness check: the real user flow through the real scripts, one command, under 8 minutes on one H200.

    python benchmarks/gpu_check.py                  # on a CUDA machine; results in $OUT (default out/gpu_check)
    python benchmarks/gpu_check.py --cpu --tiny     # the same steps on a CPU with a tiny model (CI's smoke test)
    python benchmarks/gpu_check.py --only generate_7b_compiled --budget_scale 2   # rerun one step

Every step is one `python <script> ...` in its own process group with its own timeout, so a hang or a crash costs
that step only; steps that need a failed one are skipped. What runs, in order:

1. `environment`: GPU name and memory, CUDA/torch versions, bf16 support, device-to-device copy bandwidth (the CPU
   model on CPU), the packages the scripts need.
2. `base_checkpoint`: a random-weight model written with the project's API (TinyLlama-1.1B's shape; `--tiny`: the
   "tiny" config) and a byte-level BPE tokenizer trained on the built-in tasks' text; `data`: the built-in tasks
   prepared by scripts/prepare_builtin.py.
3. finetune/lora.py in two precisions, then the same run killed by SIGTERM after its first checkpoint and finished
   with `--resume auto` (its final weights must equal the uninterrupted run's); finetune/adapter.py, adapter_v2.py
   and full.py for a few steps; generate/finetuned.py on the LoRA run, scripts/merge_lora.py, generate/base.py on
   the merge, scripts/evaluate_tasks.py.
4. The 7B figures, by benchmarks/gpu_lora_7b.py (random 7B, the seed's LoRA settings: micro-batch 4 x 256, r=8 on
   q and v): peak memory and tokens/s with and without activation checkpointing, generation tokens/s eager and
   compiled, against the seed's 21 GB, 62,400 micro-steps in 192 min (A100) and 30.76 tokens/s, and against the
   memory-bandwidth bound (bytes of weights read per token / measured copy bandwidth).
5. QLoRA (`--quantize nf4`) and `--devices 1` through FSDP2: skipped, with the reason, while the scripts lack them.

For each step the summary records exit code, wall time (and its budget), peak memory and tokens/s. Peak memory is
the script's own `torch.cuda.max_memory_allocated` where it prints one (generation, gpu_lora_7b.py), else the most
device memory nvidia-smi saw in use during the step (CUDA context and allocator cache included), or on CPU the
process's peak RSS. Training tokens/s is the median of logs/metrics.csv's `tokens_per_sec` after the first step.

Under the output folder: summary.md and summary.json (rewritten after every step, so a killed run still leaves
them), environment.json and steps.log (every step's command and output). The checkpoints and data go to --work_dir,
which a later `--only` run reuses. This script uses argparse rather than jsonargparse: it must start, and report
what is missing, on a machine where the project's requirements are not all installed.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
LOG_CHARS_PER_STEP = 200_000

# the seed's figures (BENCHMARKS.md): 7B LoRA on an A100, and 7B generation
SEED_LORA_PEAK_GB = 21.0
SEED_MICRO_STEPS_PER_S = 62_400 / (192 * 60)
SEED_GENERATE_TOKENS_PER_S = 30.76

REQUIRED_PACKAGES = ("torch", "lightning", "jsonargparse", "docstring_parser", "typeshed_client", "tokenizers",
                     "sentencepiece", "safetensors", "tqdm", "numpy", "matplotlib")


# --------------------------------------------------------------------------------------------------- the sizes


@dataclass(frozen=True)
class Sizes:
    """What the flow runs at: a TinyLlama-1.1B shape on a GPU, the "tiny" config on a CPU."""

    device: str
    model: str
    block_size: Optional[int]  # None: the config's
    tokenizer_vocab: int
    checkpoint_dtype: str
    records: int
    test_records: int
    max_seq_length: int
    batch_size: int
    micro_batch_size: int
    max_steps: int
    save_interval: int
    eval_iters: int
    precisions: tuple[str, str]  # the first is also the kill/resume run's
    adapter_start_layer: int
    full_precision: str
    new_tokens: int
    eval_records: int
    big_model: str  # what the 7B steps run
    lora_7b: tuple[str, ...]  # gpu_lora_7b.py arguments shared by the 7B steps
    compile_7b: bool


GPU_SIZES = Sizes(
    device="cuda", model="TinyLlama-1.1B", block_size=None, tokenizer_vocab=1024, checkpoint_dtype="bfloat16",
    records=1200, test_records=64, max_seq_length=128, batch_size=16, micro_batch_size=4, max_steps=12,
    save_interval=4, eval_iters=4, precisions=("bf16-true", "bf16-mixed"), adapter_start_layer=2,
    # bf16-true: full finetuning's checkpoints (weights + AdamW state) are half the size of bf16-mixed's fp32 ones
    full_precision="bf16-true", new_tokens=64, eval_records=64,
    big_model="7B", lora_7b=("--warmup", "3", "--steps", "10"), compile_7b=True,
)
TINY_SIZES = Sizes(
    device="cpu", model="tiny", block_size=256, tokenizer_vocab=400, checkpoint_dtype="float32", records=120,
    test_records=16, max_seq_length=96, batch_size=8, micro_batch_size=2, max_steps=12, save_interval=4, eval_iters=2,
    precisions=("32-true", "bf16-true"), adapter_start_layer=1, full_precision="32-true", new_tokens=16, eval_records=8,
    big_model="tiny", lora_7b=("--config_name", "tiny", "--seq_length", "32", "--warmup", "1", "--steps", "2",
             "--new_tokens", "8", "--prompt_length", "4"),
    compile_7b=False,  # compiling on a CPU takes minutes: the tiny run skips that step
)


# ------------------------------------------------------------------------------------------- steps and results


@dataclass
class Context:
    sizes: Sizes
    work: Path
    out: Path
    env: dict
    budget_scale: float = 1.0
    results: dict = field(default_factory=dict)  # step name -> StepResult of this run
    help_texts: dict = field(default_factory=dict)  # script -> its `-h` output
    step_deadline: float = 0.0  # time.perf_counter() when the running step's budget is spent

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)


@dataclass
class StepResult:
    name: str
    status: str  # ok, FAILED, TIMEOUT, skipped
    budget_s: float
    exit_code: Optional[int] = None
    wall_s: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    memory_source: Optional[str] = None  # max_memory_allocated, nvidia-smi, rss
    tokens_per_s: Optional[float] = None
    notes: str = ""
    metrics: dict = field(default_factory=dict)
    command: Optional[str] = None


@dataclass
class Step:
    """`command` returns the arguments after `python`; `skip` a reason not to run, or None;
    `watch` is called while the process runs (the kill step sends its signal from there); `measure` reads the
    results after it ended and may fail the step by returning notes that start with "FAILED"."""

    name: str
    budget_s: float
    what: str
    command: Callable[[Context], list[str]]
    needs: tuple[str, ...] = ()
    skip: Optional[Callable[[Context], Optional[str]]] = None
    watch: Optional[Callable[[Context, subprocess.Popen], None]] = None
    measure: Optional[Callable[[Context, StepResult, str], Optional[str]]] = None
    ok_exit_codes: tuple[int, ...] = (0,)


class DeviceMemorySampler:
    """The most GPU memory in use while a step runs, as nvidia-smi reports it every 200 ms (one GPU: ours)."""

    def __init__(self) -> None:
        self.peak_mib: Optional[float] = None
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        for line in self.process.stdout:
            values = [float(v) for v in line.split(",") if v.strip().replace(".", "", 1).isdigit()]
            if values:
                self.peak_mib = max(self.peak_mib or 0.0, max(values))

    def stop(self) -> Optional[float]:
        self.process.terminate()
        self.process.wait()
        self.reader.join(timeout=2)
        return None if self.peak_mib is None else self.peak_mib * 2**20 / GiB


def run_step(step: Step, ctx: Context, log) -> StepResult:
    """Run one step in its own process group; kill the group when the budget is spent."""
    budget = step.budget_s * ctx.budget_scale
    result = StepResult(step.name, "ok", budget)
    failed_needs = [n for n in step.needs if n in ctx.results and ctx.results[n].status != "ok"]
    if failed_needs:
        result.status, result.notes = "skipped", f"needs {', '.join(failed_needs)}, which did not succeed"
        return result
    start = time.perf_counter()
    ctx.step_deadline = start + budget
    reason = step.skip(ctx) if step.skip else None
    if reason:
        result.status, result.notes, result.wall_s = "skipped", reason, time.perf_counter() - start
        return result
    try:
        command = [sys.executable, *step.command(ctx)]
    except Exception as error:  # a bug in one step's command must not end the run
        result.status, result.notes = "FAILED", f"building the command: {type(error).__name__}: {error}"
        return result
    result.command = " ".join(map(str, command[1:]))
    log.write(f"\n{'=' * 100}\n== {step.name}: {step.what}\n$ python {result.command}\n")
    log.flush()
    sampler = DeviceMemorySampler() if gpu_mode(ctx) and shutil.which("nvidia-smi") else None
    with open(ctx.path("logs", f"{step.name}.log"), "w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=ctx.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        status, rusage = None, None
        while status is None:
            pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status, rusage = wait_status, usage
                break
            if time.perf_counter() - start > budget:
                os.killpg(process.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(process.pid, 0)
                result.status = "TIMEOUT"
                break
            if step.watch:
                step.watch(ctx, process)
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)  # we reaped it: tell Popen
    result.wall_s = time.perf_counter() - start
    result.exit_code = process.returncode
    output_text = ctx.path("logs", f"{step.name}.log").read_text(errors="replace")
    if len(output_text) > LOG_CHARS_PER_STEP:  # the results folder must stay small enough to send back
        log.write(f"[... {len(output_text) - LOG_CHARS_PER_STEP:,} characters left out ...]\n")
    log.write(output_text[-LOG_CHARS_PER_STEP:])
    log.write(f"\n== {step.name}: exit code {result.exit_code}, {result.wall_s:.1f} s (budget {budget:.0f} s)\n")
    log.flush()
    if sampler:
        result.peak_memory_gib, result.memory_source = sampler.stop(), "nvidia-smi"
    elif not gpu_mode(ctx):
        result.peak_memory_gib, result.memory_source = rusage.ru_maxrss * 1024 / GiB, "rss"  # Linux: kilobytes
    allocated = printed_peak_memory_gib(output_text)
    if allocated is not None and gpu_mode(ctx):
        result.peak_memory_gib, result.memory_source = allocated, "max_memory_allocated"
    if result.status == "TIMEOUT":
        result.notes = f"killed after {budget:.0f} s"
    elif result.exit_code not in step.ok_exit_codes:
        result.status = "FAILED"
        result.notes = last_line(output_text)
    if step.measure and result.status != "FAILED":
        try:
            verdict = step.measure(ctx, result, output_text)
        except Exception as error:  # a broken measurement must not end the run
            verdict = f"FAILED: measuring: {type(error).__name__}: {error}"
        if verdict:
            if verdict.startswith("FAILED"):
                result.status, verdict = "FAILED", verdict[len("FAILED: ") :]
            result.notes = "; ".join(n for n in (result.notes, verdict) if n)
    return result


def gpu_mode(ctx: Context) -> bool:
    return ctx.sizes.device == "cuda"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def printed_peak_memory_gib(text: str) -> Optional[float]:
    """generation's `Peak GPU memory allocated: X GB` (1e9 bytes), gpu_lora_7b.py's `peak memory X GiB`."""
    found = [float(v) * 1e9 / GiB for v in re.findall(r"Peak GPU memory allocated: ([\d.]+) GB", text)]
    found += [float(v) for v in re.findall(r"peak memory ([\d.]+) GiB", text)]
    return max(found) if found else None


def printed_tokens_per_s(text: str) -> Optional[float]:
    found = re.findall(r"Time for inference: [\d.]+ sec total, ([\d.]+) tokens/sec", text)
    return statistics.median(float(v) for v in found) if found else None


def run_all(steps: list[Step], ctx: Context) -> list[StepResult]:
    ctx.path("logs").mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(ctx.out / "steps.log", "w") as log:
        for step in steps:
            print(f"[{time.perf_counter() - started:6.1f} s] {step.name}: {step.what}", flush=True)
            ctx.results[step.name] = result = run_step(step, ctx, log)
            print(f"           {result.status} {format_seconds(result.wall_s)} {result.notes}".rstrip(), flush=True)
            write_summary(ctx, list(ctx.results.values()), time.perf_counter() - started)
    results = list(ctx.results.values())
    print(markdown_summary(ctx, results, time.perf_counter() - started))
    return results


# ----------------------------------------------------------------------------------------------------- summary


def format_seconds(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds:.1f} s"


def number(value: Optional[float], digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def figures(ctx: Context) -> dict:
    """The 7B numbers BENCHMARKS.md needs, beside the seed's, and the bandwidth bound of generation."""
    environment = read_json(ctx.out / "environment.json")
    r = {name: ctx.results[name].metrics for name in ("lora_7b", "lora_7b_checkpointing", "generate_7b_compiled")
         if name in ctx.results}
    lines = {}
    big = ctx.sizes.big_model
    for name, label in (("lora_7b", f"{big} LoRA"), ("lora_7b_checkpointing", f"{big} LoRA, activation checkpointing")):
        m = r.get(name, {})
        if "tokens_per_s" in m:
            lines[label] = (
                f"peak {number(m.get('peak_memory_gib'), 2)} GiB (seed: {SEED_LORA_PEAK_GB:.0f} GB on an A100); "
                f"{number(m.get('micro_steps_per_s'), 2)} micro-steps/s = {number(m.get('speedup_vs_seed'), 2)}x the "
                f"seed's {SEED_MICRO_STEPS_PER_S:.2f}; {number(m.get('tokens_per_s'), 0)} tokens/s; "
                f"MFU {number(100 * m.get('mfu', 0), 1)}%"
            )
    bound = None
    if environment.get("copy_bandwidth_gb_s") and environment.get("decode_bytes_per_token_7b") and big == "7B":
        bound = environment["copy_bandwidth_gb_s"] * 1e9 / environment["decode_bytes_per_token_7b"]
    for name, key, label in (("lora_7b", "generate_eager_tokens_per_s", f"{big} generation, eager"),
                             ("generate_7b_compiled", "generate_compiled_tokens_per_s", f"{big} generation, compiled")):
        value = r.get(name, {}).get(key)
        if value is not None:
            versus = f"; bandwidth bound {bound:.0f} tokens/s ({value / bound:.0%} of it)" if bound else ""
            lines[label] = (f"{value:.1f} tokens/s ({value / SEED_GENERATE_TOKENS_PER_S:.2f}x the seed's "
                            f"{SEED_GENERATE_TOKENS_PER_S}){versus}")
    return lines


def markdown_summary(ctx: Context, results: list[StepResult], total_s: float) -> str:
    memory_label = "peak memory GiB" if gpu_mode(ctx) else "peak RSS GiB"
    rows = [f"| step | status | exit | wall s | budget s | {memory_label} | tokens/s | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        source = {"nvidia-smi": " (smi)", "max_memory_allocated": ""}.get(r.memory_source, "")
        memory = f"{r.peak_memory_gib:.2f}{source}" if r.peak_memory_gib is not None else ""
        notes = r.notes.replace("|", "/").replace("\n", " ")
        rows.append(f"| {r.name} | {r.status} | {'' if r.exit_code is None else r.exit_code} | "
                    f"{number(r.wall_s)} | {r.budget_s:.0f} | {memory} | {number(r.tokens_per_s)} | {notes} |")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "FAILED", "TIMEOUT", "skipped")}
    environment = read_json(ctx.out / "environment.json")
    machine = environment.get("gpu") or environment.get("cpu") or "?"
    text = [f"# GPU check: {machine}, torch {environment.get('torch', '?')}, {ctx.sizes.model} flow", "",
            f"{total_s:.0f} s in all (budgets sum to {sum(r.budget_s for r in results):.0f} s); "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n), "",
            *(["(smi): the most device memory nvidia-smi saw in use (the script prints no max_memory_allocated)", ""]
              if gpu_mode(ctx) else []),
            *rows]
    lines = figures(ctx)
    if lines:
        text += ["", f"## {ctx.sizes.big_model} figures", "", *[f"- {label}: {line}" for label, line in lines.items()]]
    return "\n".join(text) + "\n"


def write_summary(ctx: Context, results: list[StepResult], total_s: float) -> None:
    summary = dict(total_s=total_s, sizes=asdict(ctx.sizes), environment=read_json(ctx.out / "environment.json"),
                   figures=figures(ctx), steps=[asdict(r) for r in results])
    atomic_write(ctx.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(ctx.out / "summary.md", markdown_summary(ctx, results, total_s))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------- the commands: every script's flags in one place


def finetune_args(ctx: Context, method: str, out_dir: Path, precision: str, *extra: str) -> list[str]:
    s = ctx.sizes
    # full finetuning saves the whole model and its optimizer state: once, at the end
    save_interval = s.max_steps if method == "full" else s.save_interval
    args = [
        f"finetune/{method}.py", "--data_dir", ctx.path("data"), "--checkpoint_path", base_path(ctx),
        "--out_dir", out_dir, "--precision", precision, "--devices", "1",
        "--train.batch_size", s.batch_size, "--train.micro_batch_size", s.micro_batch_size,
        "--train.max_steps", s.max_steps, "--train.warmup_steps", "2", "--train.save_interval", save_interval,
        "--train.log_interval", "1", "--eval.interval", "1000", "--eval.iters", s.eval_iters,
    ]
    adapter = ["--adapter.prompt_length", "10", "--adapter.start_layer", s.adapter_start_layer]
    method_group = {"lora": ["--lora.r", "8", "--lora.alpha", "16"], "adapter": adapter, "adapter_v2": adapter}
    return [str(a) for a in [*args, *method_group.get(method, []), *extra]]


def generate_finetuned_args(ctx: Context) -> list[str]:
    return [str(a) for a in [
        "generate/finetuned.py", "--finetuned_path", lora_weights(straight_lora(ctx)),
        "--checkpoint_path", base_path(ctx), "--prompt", "Reverse the order of these words.",
        "--input", "red blue green", "--precision", ctx.sizes.precisions[0],
        "--max_new_tokens", ctx.sizes.new_tokens, "--temperature", "0.8",
    ]]


def merge_args(ctx: Context) -> list[str]:
    return [str(a) for a in ["scripts/merge_lora.py", "--finetuned_path", lora_weights(straight_lora(ctx)),
                             "--checkpoint_path", base_path(ctx), "--output_dir", ctx.path("merged")]]


def generate_base_args(ctx: Context) -> list[str]:
    return [str(a) for a in [
        "generate/base.py", "--checkpoint_path", ctx.path("merged", "lit-llama.pth"), "--prompt", "Hello, my name is",
        "--precision", ctx.sizes.precisions[0], "--compile", "false",
        "--max_new_tokens", ctx.sizes.new_tokens, "--temperature", "0.8",
    ]]


def evaluate_args(ctx: Context) -> list[str]:
    return [str(a) for a in [
        "scripts/evaluate_tasks.py", "--checkpoint_path", base_path(ctx),
        "--finetuned_path", lora_weights(straight_lora(ctx)), "--data_dir", ctx.path("data"),
        "--max_records", ctx.sizes.eval_records, "--batch_size", "16", "--max_new_tokens", "16",
        "--precision", ctx.sizes.precisions[0], "--output_json", ctx.path("evaluation.json"),
    ]]


def prepare_args(ctx: Context) -> list[str]:
    s = ctx.sizes
    return [str(a) for a in [
        "scripts/prepare_builtin.py", "--destination_path", ctx.path("data"), "--checkpoint_dir", ctx.path("base"),
        "--num_records", s.records, "--test_split_size", s.test_records, "--max_seq_length", s.max_seq_length,
    ]]


def lora_7b_args(ctx: Context, *extra: str) -> list[str]:
    return ["benchmarks/gpu_lora_7b.py", "--device", ctx.sizes.device, *ctx.sizes.lora_7b, *extra]


# --------------------------------------------------------------------------------------------- the steps' parts


def base_path(ctx: Context) -> Path:
    return ctx.path("base", "lit-llama.pth")


def straight_lora(ctx: Context) -> Path:
    return ctx.path(f"lora_{ctx.sizes.precisions[0]}")


def lora_weights(out_dir: Path) -> Path:
    return out_dir / "lit-llama-lora-finetuned.pth"


def training_metrics(out_dir: Path) -> dict:
    """tokens/s: the median of the logged rates after the first step (which includes the warm-up)."""
    path = out_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["tokens_per_sec"]) for row in rows if row.get("tokens_per_sec")]
    losses = [float(row["train_loss"]) for row in rows if row.get("train_loss")]
    metrics = {"steps_logged": len(rates)}
    peaks = [float(row["peak_memory_gib"]) for row in rows if row.get("peak_memory_gib")]
    if peaks:  # not logged yet by lit_llama's training loop: read when it is
        metrics["peak_memory_gib"] = max(peaks)
    if rates:
        metrics["tokens_per_s"] = statistics.median(rates[1:] or rates)
    if losses:
        metrics["first_loss"], metrics["last_loss"] = losses[0], losses[-1]
    return metrics


def measure_training(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    out_dir = ctx.path(result.name)
    result.metrics = training_metrics(out_dir)
    result.tokens_per_s = result.metrics.get("tokens_per_s")
    if "peak_memory_gib" in result.metrics and gpu_mode(ctx):
        result.peak_memory_gib, result.memory_source = result.metrics["peak_memory_gib"], "max_memory_allocated"
    if not any(out_dir.glob("lit-llama-*-finetuned.pth")):
        return f"FAILED: no lit-llama-*-finetuned.pth in {out_dir}"
    if "last_loss" in result.metrics:
        return f"loss {result.metrics['first_loss']:.3f} -> {result.metrics['last_loss']:.3f}"
    return None


def measure_generation(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    result.tokens_per_s = printed_tokens_per_s(output)
    if result.tokens_per_s is None:
        return "FAILED: no 'Time for inference' line"
    if gpu_mode(ctx) and " on cuda" not in output:  # the scripts say where they loaded the model
        return "FAILED: the model was not loaded on cuda"
    return None


def measure_evaluation(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    scores = read_json(ctx.path("evaluation.json"))
    if "exact_match" not in scores:
        return "FAILED: no evaluation.json with an exact_match"
    result.metrics = {"exact_match": scores["exact_match"], "records": scores["records"], "seconds": scores["seconds"]}
    return f"{scores['records']} records, exact match {scores['exact_match']:.1f}% (random weights, few steps)"


def measure_merge(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    if not ctx.path("merged", "lit-llama.pth").is_file():
        return "FAILED: no merged lit-llama.pth"
    return None


def measure_7b(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    """gpu_lora_7b.py's RESULT line; without it (a timeout), the lines it printed before."""
    found = [line[len("RESULT "):] for line in output.splitlines() if line.startswith("RESULT ")]
    metrics = json.loads(found[-1]) if found else {}
    if not found:
        pattern = r"training: ([\d.]+) micro-steps/s \(([\d.]+)x.*?([\d,]+) tokens/s.*?MFU ([\d.]+)%"
        training = re.search(pattern, output)
        if training:
            metrics.update(micro_steps_per_s=float(training[1]), speedup_vs_seed=float(training[2]),
                           tokens_per_s=float(training[3].replace(",", "")), mfu=float(training[4]) / 100)
        for kind in ("eager", "compiled"):
            generated = re.search(rf"generation, {kind}: ([\d.]+) tokens/s", output)
            if generated:
                metrics[f"generate_{kind}_tokens_per_s"] = float(generated[1])
        peak = printed_peak_memory_gib(output)
        if peak is not None:
            metrics["peak_memory_gib"] = peak
    result.metrics = metrics
    if result.name == "generate_7b_compiled":
        result.tokens_per_s = metrics.get("generate_compiled_tokens_per_s")
        if result.status == "ok" and result.tokens_per_s is None:
            return "FAILED: no compiled generation figure"
        return None if result.tokens_per_s is None else f"eager {number(metrics.get('generate_eager_tokens_per_s'))}"
    result.tokens_per_s = metrics.get("tokens_per_s")
    if "peak_memory_gib" in metrics and gpu_mode(ctx):  # training's peak, not the larger of training and generation
        result.peak_memory_gib, result.memory_source = metrics["peak_memory_gib"], "max_memory_allocated"
    if result.status == "ok" and result.tokens_per_s is None:
        return "FAILED: no RESULT line"
    if result.tokens_per_s is None:
        return None
    return (f"{number(metrics.get('micro_steps_per_s'), 2)} micro-steps/s "
            f"({number(metrics.get('speedup_vs_seed'), 2)}x seed), "
            f"generation eager {number(metrics.get('generate_eager_tokens_per_s'))} tokens/s")


def send_sigterm_after_first_checkpoint(ctx: Context, process: subprocess.Popen) -> None:
    out_dir = ctx.path("lora_killed")
    if not getattr(process, "signalled", False) and any(out_dir.glob("iter-*-ckpt.pth")):
        os.killpg(process.pid, signal.SIGTERM)  # as a scheduler's preemption: every process of the run gets it
        process.signalled = True


def measure_killed(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    resumable = sorted(ctx.path("lora_killed").glob("iter-*-resume.pth"))
    if result.exit_code == 0:
        return "FAILED: the run finished before the first checkpoint was seen: nothing was interrupted"
    if not resumable:
        return "FAILED: no iter-*-resume.pth after SIGTERM"
    return f"SIGTERM after the first checkpoint; stopped with {resumable[-1].name}"


def measure_resumed(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    """The resumed run's final weights against the uninterrupted run's; and, as the yardstick of how deterministic
    the kernels are, the two runs' checkpoints at the first save, both taken before any interruption."""
    import torch

    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def max_difference(a: dict, b: dict) -> Optional[float]:
        if a.keys() != b.keys():
            return None
        return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)

    straight, resumed = straight_lora(ctx), ctx.path("lora_killed")
    result.metrics = training_metrics(resumed)
    result.tokens_per_s = result.metrics.get("tokens_per_s")
    if "resumed from" not in output:
        return "FAILED: the run did not resume"
    final = max_difference(load(lora_weights(straight)), load(lora_weights(resumed)))
    first_save = f"iter-{ctx.sizes.save_interval:06d}-ckpt.pth"
    noise = max_difference(load(straight / first_save), load(resumed / first_save))
    result.metrics.update(final_max_abs_difference=final, first_save_max_abs_difference=noise)
    if final is None:
        return "FAILED: the resumed run saved other tensors than the uninterrupted one"
    if final == 0:
        return "final weights bit-identical to the uninterrupted run"
    if noise == 0:
        return f"FAILED: final weights differ from the uninterrupted run by up to {final:.3g} (deterministic before)"
    return (f"final weights differ by up to {final:.3g}; two uninterrupted runs already differ by {noise:.3g} at step "
            f"{ctx.sizes.save_interval} (nondeterministic kernels)")


def script_help(ctx: Context, script: str) -> Optional[str]:
    """`python <script> -h`, within what is left of the step's budget (None when it did not answer in time)."""
    if script not in ctx.help_texts:
        try:
            done = subprocess.run([sys.executable, script, "-h"], cwd=REPO, env=ctx.env, capture_output=True,
                                  text=True, timeout=max(1.0, ctx.step_deadline - time.perf_counter()))
            ctx.help_texts[script] = done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            return None
    return ctx.help_texts[script]


def needs_flag(script: str, flag: str) -> Callable[[Context], Optional[str]]:
    def skip(ctx: Context) -> Optional[str]:
        text = script_help(ctx, script)
        if text is None:
            return f"skipped: `{script} -h` did not answer within the budget"
        return None if flag in text else f"skipped: no {flag} in {script}"

    return skip


def skip_compile_on_cpu(ctx: Context) -> Optional[str]:
    return None if ctx.sizes.compile_7b else "skipped: --tiny does not compile (minutes on a CPU)"


def helper(*args) -> list[str]:
    """This script's own worker modes (below), run as steps like any other script."""
    return [str(a) for a in ["benchmarks/gpu_check.py", *args]]


def make_steps(sizes: Sizes) -> list[Step]:
    """The flow, in order; budgets in seconds sum to 450 on a GPU. --tiny uses other budgets (a busy CPU)."""
    p0, p1 = sizes.precisions
    lora_straight, lora_other = f"lora_{p0}", f"lora_{p1}"
    steps = [
        Step("environment", 10, "GPU, CUDA, torch, bf16, copy bandwidth, packages",
             lambda ctx: helper("--worker", "environment", "--device", ctx.sizes.device,
                                "--output", ctx.out / "environment.json")),
        Step("base_checkpoint", 25, f"random {sizes.model} checkpoint and tokenizer via lit_llama's API",
             lambda ctx: helper("--worker", "base", "--device", ctx.sizes.device, "--output", ctx.path("base"),
                                "--model", ctx.sizes.model, "--block_size", ctx.sizes.block_size or 0,
                                "--tokenizer_vocab", ctx.sizes.tokenizer_vocab,
                                "--dtype", ctx.sizes.checkpoint_dtype),
             needs=("environment",)),
        Step("data", 10, "scripts/prepare_builtin.py", prepare_args, needs=("base_checkpoint",)),
        Step(lora_straight, 25, f"finetune/lora.py {p0}",
             lambda ctx: finetune_args(ctx, "lora", straight_lora(ctx), p0),
             needs=("data",), measure=measure_training),
        Step(lora_other, 20, f"finetune/lora.py {p1}", lambda ctx: finetune_args(ctx, "lora", ctx.path(lora_other), p1),
             needs=("data",), measure=measure_training),
        Step("lora_killed", 20, f"finetune/lora.py {p0}, SIGTERM after the first checkpoint",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("lora_killed"), p0),
             needs=("data",), watch=send_sigterm_after_first_checkpoint, measure=measure_killed,
             ok_exit_codes=(0, 128 + signal.SIGTERM)),
        Step("lora_resumed", 20, "finetune/lora.py --resume auto: weights equal to the uninterrupted run's",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("lora_killed"), p0, "--resume", "auto"),
             needs=(lora_straight, "lora_killed"), measure=measure_resumed),
        Step("adapter", 20, "finetune/adapter.py", lambda ctx: finetune_args(ctx, "adapter", ctx.path("adapter"), p0),
             needs=("data",), measure=measure_training),
        Step("adapter_v2", 20, "finetune/adapter_v2.py",
             lambda ctx: finetune_args(ctx, "adapter_v2", ctx.path("adapter_v2"), p0),
             needs=("data",), measure=measure_training),
        Step("full", 30, f"finetune/full.py {sizes.full_precision}",
             lambda ctx: finetune_args(ctx, "full", ctx.path("full"), ctx.sizes.full_precision),
             needs=("data",), measure=measure_training),
        Step("generate_lora", 15, "generate/finetuned.py on the LoRA run", generate_finetuned_args,
             needs=(lora_straight,), measure=measure_generation),
        Step("merge_lora", 20, "scripts/merge_lora.py", merge_args, needs=(lora_straight,), measure=measure_merge),
        Step("generate_merged", 15, "generate/base.py on the merged checkpoint", generate_base_args,
             needs=("merge_lora",), measure=measure_generation),
        Step("evaluate", 20, "scripts/evaluate_tasks.py on the LoRA run", evaluate_args, needs=(lora_straight,),
             measure=measure_evaluation),
        Step("qlora", 20, "finetune/lora.py --quantize nf4",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("qlora"), p0, "--quantize", "nf4"),
             needs=("data",), skip=needs_flag("finetune/lora.py", "--quantize"),
             measure=measure_training),
        Step("lora_7b", 35, "gpu_lora_7b.py: 7B LoRA micro-batch 4 x 256, r=8 q,v; eager generation",
             lambda ctx: lora_7b_args(ctx, "--compile", "false"), needs=("environment",), measure=measure_7b),
        Step("lora_7b_checkpointing", 30, "gpu_lora_7b.py --activation_checkpointing true",
             lambda ctx: lora_7b_args(ctx, "--activation_checkpointing", "true", "--compile", "false",
                                      "--new_tokens", "16"),
             needs=("environment",), measure=measure_7b),
        Step("generate_7b_compiled", 75, "gpu_lora_7b.py: 7B generation torch.compile'd (most of it compiling)",
             lambda ctx: lora_7b_args(ctx, "--warmup", "0", "--steps", "1", "--new_tokens", "64", "--compile", "true"),
             needs=("environment",), skip=skip_compile_on_cpu, measure=measure_7b),
        Step("fsdp2_one_device", 20, "finetune/lora.py --devices 1 through FSDP2",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("fsdp2_one_device"), p0, "--strategy", "fsdp"),
             needs=("data",), skip=needs_flag("finetune/lora.py", "--strategy"),
             measure=measure_training),
    ]
    if sizes.device == "cpu":  # a shared CPU is slower and steadier budgets matter more than the total
        steps = [replace(step, budget_s=max(60, 2 * step.budget_s)) for step in steps]
    return steps


# --------------------------------------------------------------------------- worker modes (run as steps above)


def worker_environment(device: str, output: Path) -> None:
    """Facts about the machine; on a GPU the device-to-device copy bandwidth (read + write bytes per second)."""
    import importlib.metadata
    import platform

    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
             "cpu_count": os.cpu_count()}
    packages, missing = {}, []
    for name in REQUIRED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    facts["packages"] = packages
    if missing:
        facts["missing_packages"] = missing
        save(facts, output)
        sys.exit(f"error: missing packages the scripts need: {', '.join(missing)} (pip install -e . installs them)")
    import torch

    from lit_llama.model import LLaMA, Config

    facts.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    with torch.device("meta"):
        model = LLaMA(Config.from_name("7B"))
    # a decode step reads every weight once, except the embedding table (one row of it) when the head is separate
    read = sum(p.numel() for n, p in model.named_parameters() if model.lm_head is None or "wte" not in n)
    facts["decode_bytes_per_token_7b"] = 2 * read  # bf16
    if device == "cuda":
        if not torch.cuda.is_available():
            save(facts, output)
            sys.exit("error: no CUDA device: run on a GPU machine, or the CPU smoke test with --cpu --tiny")
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / GiB,
                     capability=f"{properties.major}.{properties.minor}",
                     multiprocessors=properties.multi_processor_count,
                     bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count(),
                     flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                     mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
                     driver=nvidia_smi_driver(), copy_bandwidth_gb_s=copy_bandwidth_gb_s())
    else:
        from lit_llama.precision import bf16_supported

        facts.update(bf16_supported=bf16_supported(), torch_threads=torch.get_num_threads())
    save(facts, output)
    print(json.dumps(facts, indent=2))


def copy_bandwidth_gb_s() -> float:
    import torch

    source = torch.empty(GiB // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() / (start.elapsed_time(end) / 1000) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def nvidia_smi_driver() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def worker_base(device: str, output: Path, model: str, block_size: int, tokenizer_vocab: int, dtype: str) -> None:
    """A random-weight checkpoint directory as users have one: lit-llama.pth, model_config.json, tokenizer files.
    The tokenizer is a byte-level BPE (SmolLM2-like: ChatML, no BOS) trained on the built-in tasks' own text, so the
    prepared data tokenizes compactly; the model's vocabulary is the tokenizer's (the shape is otherwise the
    config's)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from lit_llama.builtin_tasks import generate
    from lit_llama.checkpoint import CHECKPOINT_NAME, save_config
    from lit_llama.model import LLaMA, Config
    from lit_llama.prompts import prompt_styles
    from lit_llama.tokenizer import Tokenizer

    from lit_llama.files import save_torch

    records = generate(600, seed=7)
    styles = prompt_styles.values()
    text = [style.apply(r["instruction"], r["input"]) + r["output"] for r in records for style in styles]
    tokenizer = ByteLevelBPETokenizer()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(text, vocab_size=tokenizer_vocab, min_frequency=1, special_tokens=special,
                                  show_progress=False)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    save({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False},
         output / "tokenizer_config.json")

    overrides = dict(vocab_size=Tokenizer(output).vocab_size)
    if block_size:
        overrides["block_size"] = block_size
    config = Config.from_name(model, **overrides)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        weights = LLaMA(config).to(getattr(torch, dtype)).state_dict()
    save_torch({k: v.cpu() for k, v in weights.items()}, output / CHECKPOINT_NAME)
    save_config(config, output)
    parameters = sum(v.numel() for v in weights.values())
    print(f"{model}: {parameters:,} parameters ({dtype}), vocabulary {config.vocab_size}, "
          f"made and saved in {time.perf_counter() - start:.1f} s -> {output / CHECKPOINT_NAME}")


def save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (CUDA hidden from every step)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the smoke test (use with --cpu)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else out/gpu_check)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "out" / "gpu_check_work",
                        help="checkpoints and data (kept, so --only can rerun a step against them)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run (against --work_dir)")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiply every step's time budget")
    parser.add_argument("--list", action="store_true", help="list the steps and their budgets, then exit")
    parser.add_argument("--worker", choices=("environment", "base"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--block_size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer_vocab", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.worker == "environment":
        worker_environment(args.device, args.output)
        return 0
    if args.worker == "base":
        worker_base(args.device, args.output, args.model, args.block_size, args.tokenizer_vocab, args.dtype)
        return 0

    sizes = replace(TINY_SIZES if args.tiny else GPU_SIZES, device="cpu" if args.cpu else "cuda")
    steps = make_steps(sizes)
    if args.list:
        for step in steps:
            print(f"{step.name:>24} {step.budget_s:4.0f} s  {step.what}")
        print(f"{'total':>24} {sum(s.budget_s for s in steps):4.0f} s")
        return 0
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {s.name for s in steps}
        if unknown:
            print(f"error: --only: unknown steps {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in wanted]
    elif args.work_dir.exists():
        shutil.rmtree(args.work_dir)  # a full run starts from nothing
    out = args.out or Path(os.environ.get("OUT") or REPO / "out" / "gpu_check")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if sizes.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    ctx = Context(sizes=sizes, work=args.work_dir.resolve(), out=out.resolve(), env=env, budget_scale=args.budget_scale)
    results = run_all(steps, ctx)
    print(f"results: {ctx.out / 'summary.md'}, {ctx.out / 'summary.json'}; logs: {ctx.out / 'steps.log'}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
