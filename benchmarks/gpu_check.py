"""GPU readiness check: the real user flow through the real scripts, one command, under 8 minutes on one H200.

    python benchmarks/gpu_check.py                  # on a CUDA machine; results in $OUT (default out/gpu_check)
    python benchmarks/gpu_check.py --cpu --tiny     # the same steps on a CPU with a tiny model (CI's smoke test)
    python benchmarks/gpu_check.py --only generate_7b_compiled --budget_scale 2   # rerun one step

What each step does and how its numbers are taken: benchmarks/README.md. This file holds the steps (sizes, commands,
budgets, what a step's success means) and the options; gpu_check_runner.py runs the steps and writes the summary;
gpu_check_setup.py is the first two steps (the machine's facts, the random checkpoint). argparse rather than
jsonargparse: the check must start, and report what is missing, where the project's requirements are not installed.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from gpu_check_runner import (REPO, Context, Sizes, Step, StepResult, number, printed_peak_memory_gib,
                              printed_tokens_per_s, read_json, run_all, training_metrics)

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


# ------------------------------------------------------------------------------------------------ the steps


def make_steps(sizes: Sizes) -> list[Step]:
    """The flow, in order; budgets in seconds sum to 450 on a GPU. --tiny uses other budgets (a busy CPU)."""
    p0, p1 = sizes.precisions
    lora_straight, lora_other = f"lora_{p0}", f"lora_{p1}"
    steps = [
        Step("environment", 10, "GPU, CUDA, torch, bf16, copy bandwidth, packages",
             lambda ctx: setup_args(ctx, "environment", ctx.out / "environment.json")),
        Step("base_checkpoint", 25, f"random {sizes.model} checkpoint and tokenizer via lit_llama's API",
             lambda ctx: setup_args(ctx, "base", ctx.path("base"), "--model", ctx.sizes.model,
                                    "--block_size", ctx.sizes.block_size or 0,
                                    "--tokenizer_vocab", ctx.sizes.tokenizer_vocab,
                                    "--dtype", ctx.sizes.checkpoint_dtype),
             needs=("environment",)),
        Step("data", 10, "scripts/prepare_builtin.py", prepare_args, needs=("base_checkpoint",)),
        Step(lora_straight, 25, f"finetune/lora.py {p0}",
             lambda ctx: finetune_args(ctx, "lora", straight_lora(ctx), p0),
             needs=("data",), measure=measure_training),
        Step(lora_other, 15, f"finetune/lora.py {p1}", lambda ctx: finetune_args(ctx, "lora", ctx.path(lora_other), p1),
             needs=("data",), measure=measure_training),
        Step("lora_killed", 20, f"finetune/lora.py {p0}, SIGTERM after the first checkpoint",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("lora_killed"), p0),
             needs=("data",), watch=send_sigterm_after_first_checkpoint, measure=measure_killed,
             ok_exit_codes=(0, 128 + signal.SIGTERM)),
        Step("lora_resumed", 20, "finetune/lora.py --resume auto: weights equal to the uninterrupted run's",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("lora_killed"), p0, "--resume", "auto"),
             needs=(lora_straight, "lora_killed"), measure=measure_resumed),
        Step("adapter", 15, "finetune/adapter.py", lambda ctx: finetune_args(ctx, "adapter", ctx.path("adapter"), p0),
             needs=("data",), measure=measure_training),
        Step("adapter_v2", 15, "finetune/adapter_v2.py",
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
        Step("evaluate", 15, "scripts/evaluate_tasks.py on the LoRA run", evaluate_args, needs=(lora_straight,),
             measure=measure_evaluation),
        Step("qlora", 20, "finetune/lora.py --quantize nf4",
             lambda ctx: finetune_args(ctx, "lora", ctx.path("qlora"), p0, "--quantize", "nf4"),
             needs=("data",), skip=needs_flag("finetune/lora.py", "--quantize"),
             measure=measure_training),
        Step("lora_7b", 30, "gpu_lora_7b.py: 7B LoRA micro-batch 4 x 256, r=8 q,v; eager generation",
             lambda ctx: lora_7b_args(ctx, "--compile", "false"), needs=("environment",), measure=measure_7b),
        Step("lora_7b_checkpointing", 30, "gpu_lora_7b.py --activation_checkpointing true",
             lambda ctx: lora_7b_args(ctx, "--activation_checkpointing", "true", "--compile", "false",
                                      "--new_tokens", "16"),
             needs=("environment",), measure=measure_7b),
        Step("qlora_7b", 25, "gpu_lora_7b.py --quantize nf4: the same 7B workload over an NF4 base",
             lambda ctx: lora_7b_args(ctx, "--quantize", "nf4", "--compile", "false", "--warmup", "2", "--steps", "10",
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


# --------------------------------------------------------------- the commands: every script's flags in one place


def setup_args(ctx: Context, what: str, output: Path, *extra) -> list:
    return ["benchmarks/gpu_check_setup.py", what, "--device", ctx.sizes.device, "--output", output, *extra]


def prepare_args(ctx: Context) -> list:
    s = ctx.sizes
    return [
        "scripts/prepare_builtin.py", "--destination_path", ctx.path("data"), "--checkpoint_dir", ctx.path("base"),
        "--num_records", s.records, "--test_split_size", s.test_records, "--max_seq_length", s.max_seq_length,
    ]


def finetune_args(ctx: Context, method: str, out_dir: Path, precision: str, *extra: str) -> list:
    s = ctx.sizes
    # full finetuning saves the whole model and its optimizer state: once, at the end
    save_interval = s.max_steps if method == "full" else s.save_interval
    adapter = ["--adapter.prompt_length", "10", "--adapter.start_layer", s.adapter_start_layer]
    method_group = {"lora": ["--lora.r", "8", "--lora.alpha", "16"], "adapter": adapter, "adapter_v2": adapter}
    return [
        f"finetune/{method}.py", "--data_dir", ctx.path("data"), "--checkpoint_path", base_path(ctx),
        "--out_dir", out_dir, "--precision", precision, "--devices", "1",
        "--train.batch_size", s.batch_size, "--train.micro_batch_size", s.micro_batch_size,
        "--train.max_steps", s.max_steps, "--train.warmup_steps", "2", "--train.save_interval", save_interval,
        "--train.log_interval", "1", "--eval.interval", "1000", "--eval.iters", s.eval_iters,
        *method_group.get(method, []), *extra,
    ]


def generate_finetuned_args(ctx: Context) -> list:
    return [
        "generate/finetuned.py", "--finetuned_path", lora_weights(straight_lora(ctx)),
        "--checkpoint_path", base_path(ctx), "--prompt", "Reverse the order of these words.",
        "--input", "red blue green", "--precision", ctx.sizes.precisions[0],
        "--max_new_tokens", ctx.sizes.new_tokens, "--temperature", "0.8",
    ]


def merge_args(ctx: Context) -> list:
    return ["scripts/merge_lora.py", "--finetuned_path", lora_weights(straight_lora(ctx)),
            "--checkpoint_path", base_path(ctx), "--output_dir", ctx.path("merged")]


def generate_base_args(ctx: Context) -> list:
    return [
        "generate/base.py", "--checkpoint_path", ctx.path("merged", "lit-llama.pth"), "--prompt", "Hello, my name is",
        "--precision", ctx.sizes.precisions[0], "--compile", "false",
        "--max_new_tokens", ctx.sizes.new_tokens, "--temperature", "0.8",
    ]


def evaluate_args(ctx: Context) -> list:
    return [
        "scripts/evaluate_tasks.py", "--checkpoint_path", base_path(ctx),
        "--finetuned_path", lora_weights(straight_lora(ctx)), "--data_dir", ctx.path("data"),
        "--max_records", ctx.sizes.eval_records, "--batch_size", "16", "--max_new_tokens", "16",
        "--precision", ctx.sizes.precisions[0], "--output_json", ctx.path("evaluation.json"),
    ]


def lora_7b_args(ctx: Context, *extra: str) -> list:
    return ["benchmarks/gpu_lora_7b.py", "--device", ctx.sizes.device, *ctx.sizes.lora_7b, *extra]


def base_path(ctx: Context) -> Path:
    return ctx.path("base", "lit-llama.pth")


def straight_lora(ctx: Context) -> Path:
    return ctx.path(f"lora_{ctx.sizes.precisions[0]}")


def lora_weights(out_dir: Path) -> Path:
    return out_dir / "lit-llama-lora-finetuned.pth"


# ------------------------------------------------------------------------------- when a step skips itself


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


# ----------------------------------------------------------------------------- what a step's success means


def measure_training(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    out_dir = ctx.path(result.name)
    result.metrics = training_metrics(out_dir)
    result.tokens_per_s = result.metrics.get("tokens_per_s")
    if not any(out_dir.glob("lit-llama-*-finetuned.pth")):
        return f"FAILED: no lit-llama-*-finetuned.pth in {out_dir}"
    if "last_loss" in result.metrics:
        return f"loss {result.metrics['first_loss']:.3f} -> {result.metrics['last_loss']:.3f}"
    return None


def measure_generation(ctx: Context, result: StepResult, output: str) -> Optional[str]:
    result.tokens_per_s = printed_tokens_per_s(output)
    if result.tokens_per_s is None:
        return "FAILED: no 'Time for inference' line"
    if ctx.gpu and " on cuda" not in output:  # the scripts say where they loaded the model
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
    if "peak_memory_gib" in metrics and ctx.gpu:  # training's peak, not the larger of training and generation
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
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
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
