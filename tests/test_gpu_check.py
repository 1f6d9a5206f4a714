"""benchmarks/gpu_check.py: its step runner (gpu_check_runner.py) and summary on stand-in steps; the whole flow on a
CPU (--cpu --tiny)."""
import json
import os
import re
import sys

import pytest

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_runner as runner  # noqa: E402


def stand_in(name: str, code: str, budget_s: float = 30, **options) -> runner.Step:
    return runner.Step(name, budget_s, f"stand-in {name}", lambda ctx: ["-c", code], **options)


def test_a_failing_and_a_hanging_step_cost_only_themselves_and_the_summary_shows_each(tmp_path):
    ctx = runner.Context(sizes=gpu_check.TINY_SIZES, work=tmp_path / "work", out=tmp_path / "out",
                         env=dict(os.environ))
    steps = [
        stand_in("succeeds", "print('Time for inference: 2.00 sec total, 25.00 tokens/sec')",
                 measure=gpu_check.measure_generation),
        stand_in("fails", "import sys; print('error: no such checkpoint'); sys.exit(2)"),
        # the child starts a grandchild in its process group: the timeout must end both
        stand_in("hangs", "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)", budget_s=2),
        stand_in("needs_the_failed_one", "print('never runs')", needs=("fails",)),
        stand_in("skips_itself", "print('never runs')", skip=lambda ctx: "skipped: no --quantize in finetune/lora.py"),
        stand_in("runs_after_them", "print('still running')"),
    ]
    results = {r.name: r for r in runner.run_all(steps, ctx)}

    assert [r.status for r in results.values()] == ["ok", "FAILED", "TIMEOUT", "skipped", "skipped", "ok"]
    assert results["succeeds"].tokens_per_s == 25.0 and results["succeeds"].exit_code == 0
    assert results["succeeds"].peak_memory_gib > 0 and results["succeeds"].memory_source == "rss"
    assert results["fails"].exit_code == 2 and results["fails"].notes == "error: no such checkpoint"
    assert results["hangs"].exit_code == -9 and 2 <= results["hangs"].wall_s < 10
    assert results["needs_the_failed_one"].notes == "needs fails, which did not succeed"
    assert results["needs_the_failed_one"].exit_code is None
    assert results["skips_itself"].notes == "skipped: no --quantize in finetune/lora.py"

    summary = json.loads((ctx.out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "FAILED", "TIMEOUT", "skipped", "skipped", "ok"]
    table = (ctx.out / "summary.md").read_text()
    for name, status in [("succeeds", "ok"), ("fails", "FAILED"), ("hangs", "TIMEOUT"), ("runs_after_them", "ok")]:
        assert f"| {name} | {status} |" in table
    assert re.search(r"\| hangs \| TIMEOUT \| -9 \| [\d.]+ \| 2 \|", table)  # wall time, then the budget
    log = (ctx.out / "steps.log").read_text()
    assert "still running" in log and "error: no such checkpoint" in log


def test_the_gpu_budgets_fit_in_seven_and_a_half_minutes():
    steps = gpu_check.make_steps(gpu_check.GPU_SIZES)
    assert sum(step.budget_s for step in steps) <= 450
    assert len({step.name for step in steps}) == len(steps)


def test_the_seven_b_results_are_read_from_what_gpu_lora_7b_printed_before_a_timeout(tmp_path):
    ctx = runner.Context(sizes=gpu_check.GPU_SIZES, work=tmp_path, out=tmp_path, env={})
    result = runner.StepResult("lora_7b", "TIMEOUT", 40)
    printed = ("training: 4.10 micro-steps/s (0.76x the seed's 5.42), 4,198 tokens/s, 250 TFLOP/s = MFU 25.3% of "
               "989 TFLOP/s, peak memory 16.52 GiB\ngeneration, eager: 41.5 tokens/s\n")
    gpu_check.measure_7b(ctx, result, printed)
    assert result.metrics == dict(micro_steps_per_s=4.10, speedup_vs_seed=0.76, tokens_per_s=4198, mfu=0.253,
                                  generate_eager_tokens_per_s=41.5, peak_memory_gib=16.52)
    assert result.tokens_per_s == 4198 and result.peak_memory_gib == 16.52 and result.status == "TIMEOUT"


def test_the_cpu_smoke_run_goes_through_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # the step budgets are sized for a GPU machine: a shared 2-core CPU gets four times as long
    result = run_script("benchmarks/gpu_check.py", "--cpu", "--tiny", "--out", out, "--work_dir", work,
                        "--budget_scale", 4, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    statuses = {step["name"]: (step["status"], step["notes"]) for step in summary["steps"]}
    assert result.returncode == 0, f"{statuses}\n{result.stdout[-3000:]}"
    skipped = {name for name, (status, _) in statuses.items() if status == "skipped"}
    assert skipped <= {"qlora", "generate_7b_compiled", "fsdp2_one_device"}
    assert all(notes.startswith("skipped: ") for name, (_, notes) in statuses.items() if name in skipped)
    assert statuses["lora_resumed"][1] == "final weights bit-identical to the uninterrupted run"
    steps = {step["name"]: step for step in summary["steps"]}
    for name in ("lora_32-true", "lora_bf16-true", "adapter", "full", "generate_lora", "generate_merged", "lora_7b"):
        assert steps[name]["tokens_per_s"] > 0, name
    assert summary["environment"]["cpu"] and "tiny LoRA" in summary["figures"]
    assert (out / "summary.md").read_text().count("| ok |") == len(statuses) - len(skipped)


def test_on_a_gpu_peak_memory_is_what_the_script_printed_else_what_nvidia_smi_saw(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"  # reports 1 GiB, then 3 GiB in use, then nothing more until stopped
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 1024\necho 3072\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    ctx = runner.Context(sizes=gpu_check.GPU_SIZES, work=tmp_path / "work", out=tmp_path / "out",
                         env=dict(os.environ))
    steps = [
        stand_in("prints_its_peak", "print('Peak GPU memory allocated: 2.15 GB'); import time; time.sleep(0.5)"),
        stand_in("prints_nothing", "import time; time.sleep(0.5)"),
    ]
    results = {r.name: r for r in runner.run_all(steps, ctx)}
    assert results["prints_its_peak"].memory_source == "max_memory_allocated"
    assert results["prints_its_peak"].peak_memory_gib == pytest.approx(2.15e9 / 2**30)
    assert (results["prints_nothing"].memory_source, results["prints_nothing"].peak_memory_gib) == ("nvidia-smi", 3.0)
    assert "| prints_nothing | ok | 0 |" in (ctx.out / "summary.md").read_text()
    assert "3.00 (smi)" in (ctx.out / "summary.md").read_text()
