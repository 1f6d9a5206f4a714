"""How benchmarks/gpu_check.py runs its steps and reports them.

A step is one `python <script> ...` in its own process group, killed with its group when its time budget is spent;
steps that need a step which did not succeed are skipped. After each step its exit code, wall time, peak memory and
tokens/s are recorded, and summary.json and summary.md are rewritten (so a killed run still leaves them).
Standard library only: the check must start, and report what is missing, where the requirements are not installed.
"""
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
LOG_CHARS_PER_STEP = 200_000  # of each step's output in steps.log: the results folder must stay small to send back

# the seed's figures (BENCHMARKS.md): 7B LoRA on an A100, and 7B generation
SEED_LORA_PEAK_GB = 21.0
SEED_MICRO_STEPS_PER_S = 62_400 / (192 * 60)
SEED_GENERATE_TOKENS_PER_S = 30.76


# ------------------------------------------------------------------------------------- what a run is made of


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

    @property
    def gpu(self) -> bool:
        return self.sizes.device == "cuda"

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
    """`command` returns the arguments after `python` (paths and numbers too: each is str()'d); `skip` a reason not
    to run, or None; `watch` is called while the process runs (the kill step sends its signal from there); `measure`
    reads the results after it ended and may fail the step by returning notes that start with "FAILED"."""

    name: str
    budget_s: float
    what: str
    command: Callable[[Context], list]
    needs: tuple[str, ...] = ()
    skip: Optional[Callable[[Context], Optional[str]]] = None
    watch: Optional[Callable[[Context, subprocess.Popen], None]] = None
    measure: Optional[Callable[[Context, StepResult, str], Optional[str]]] = None
    ok_exit_codes: tuple[int, ...] = (0,)


# ------------------------------------------------------------------------------------------ running the steps


def run_all(steps: list[Step], ctx: Context) -> list[StepResult]:
    ctx.path("logs").mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(ctx.out / "steps.log", "w") as log:
        for step in steps:
            print(f"[{time.perf_counter() - started:6.1f} s] {step.name}: {step.what}", flush=True)
            ctx.results[step.name] = result = run_step(step, ctx, log)
            wall = "" if result.wall_s is None else f"{result.wall_s:.1f} s"
            print(f"           {result.status} {wall} {result.notes}".rstrip(), flush=True)
            write_summary(ctx, time.perf_counter() - started)
    print(markdown_summary(ctx, time.perf_counter() - started))
    return list(ctx.results.values())


def run_step(step: Step, ctx: Context, log: TextIO) -> StepResult:
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
        command = [sys.executable, *map(str, step.command(ctx))]
    except Exception as error:  # a bug in one step's command must not end the run
        result.status, result.notes = "FAILED", f"building the command: {type(error).__name__}: {error}"
        return result
    result.command = " ".join(command[1:])
    log.write(f"\n{'=' * 100}\n== {step.name}: {step.what}\n$ python {result.command}\n")
    log.flush()

    sampler = DeviceMemorySampler() if ctx.gpu and shutil.which("nvidia-smi") else None
    output_path = ctx.path("logs", f"{step.name}.log")
    with open(output_path, "w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=ctx.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > budget:
                os.killpg(process.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(process.pid, 0)
                result.status = "TIMEOUT"
                break
            if step.watch:
                step.watch(ctx, process)
            time.sleep(0.05)
        process.returncode = result.exit_code = os.waitstatus_to_exitcode(status)  # we reaped it: tell Popen
    result.wall_s = time.perf_counter() - start
    output_text = output_path.read_text(errors="replace")
    if len(output_text) > LOG_CHARS_PER_STEP:
        log.write(f"[... {len(output_text) - LOG_CHARS_PER_STEP:,} characters left out ...]\n")
    log.write(output_text[-LOG_CHARS_PER_STEP:])
    log.write(f"\n== {step.name}: exit code {result.exit_code}, {result.wall_s:.1f} s (budget {budget:.0f} s)\n")
    log.flush()

    if sampler:
        result.peak_memory_gib, result.memory_source = sampler.stop(), "nvidia-smi"
    elif not ctx.gpu:
        result.peak_memory_gib, result.memory_source = rusage.ru_maxrss * 1024 / GiB, "rss"  # Linux: kilobytes
    allocated = printed_peak_memory_gib(output_text)
    if allocated is not None and ctx.gpu:
        result.peak_memory_gib, result.memory_source = allocated, "max_memory_allocated"
    if result.status == "TIMEOUT":
        result.notes = f"killed after {budget:.0f} s"
    elif result.exit_code not in step.ok_exit_codes:
        result.status, result.notes = "FAILED", last_error_line(output_text)
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


class DeviceMemorySampler:
    """The most GPU memory in use while a step runs, as nvidia-smi reports it every 200 ms (one GPU: ours), so the
    CUDA context and the allocator's cache included."""

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


# ------------------------------------------------------------------------------- reading what the scripts left


def last_error_line(text: str) -> str:
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


def training_metrics(out_dir: Path) -> dict:
    """From a finetune's logs/metrics.csv. tokens/s: the median of the logged rates after the first step (which
    includes the warm-up)."""
    path = out_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["tokens_per_sec"]) for row in rows if row.get("tokens_per_sec")]
    losses = [float(row["train_loss"]) for row in rows if row.get("train_loss")]
    metrics = {"steps_logged": len(rates)}
    if rates:
        metrics["tokens_per_s"] = statistics.median(rates[1:] or rates)
    if losses:
        metrics["first_loss"], metrics["last_loss"] = losses[0], losses[-1]
    return metrics


# ------------------------------------------------------------------------------------------------ the summary


def write_summary(ctx: Context, total_s: float) -> None:
    summary = dict(total_s=total_s, sizes=asdict(ctx.sizes), environment=read_json(ctx.out / "environment.json"),
                   figures=figures(ctx), steps=[asdict(r) for r in ctx.results.values()])
    write_json(ctx.out / "summary.json", summary)
    atomic_write(ctx.out / "summary.md", markdown_summary(ctx, total_s))


def markdown_summary(ctx: Context, total_s: float) -> str:
    results = list(ctx.results.values())
    memory_label = "peak memory GiB" if ctx.gpu else "peak RSS GiB"
    rows = [f"| step | status | exit | wall s | budget s | {memory_label} | tokens/s | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        source = " (smi)" if r.memory_source == "nvidia-smi" else ""
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
              if ctx.gpu else []),
            *rows]
    lines = figures(ctx)
    if lines:
        text += ["", f"## {ctx.sizes.big_model} figures", "", *[f"- {label}: {line}" for label, line in lines.items()]]
    return "\n".join(text) + "\n"


def figures(ctx: Context) -> dict:
    """The 7B numbers BENCHMARKS.md needs, beside the seed's, and the bandwidth bound of generation."""
    environment = read_json(ctx.out / "environment.json")
    metrics = {name: result.metrics for name, result in ctx.results.items()}
    lines = {}
    big = ctx.sizes.big_model
    for name, label in (("lora_7b", f"{big} LoRA"), ("lora_7b_checkpointing", f"{big} LoRA, activation checkpointing")):
        m = metrics.get(name, {})
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
        value = metrics.get(name, {}).get(key)
        if value is not None:
            versus = f"; bandwidth bound {bound:.0f} tokens/s ({value / bound:.0%} of it)" if bound else ""
            lines[label] = (f"{value:.1f} tokens/s ({value / SEED_GENERATE_TOKENS_PER_S:.2f}x the seed's "
                            f"{SEED_GENERATE_TOKENS_PER_S}){versus}")
    return lines


def number(value: Optional[float], digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
