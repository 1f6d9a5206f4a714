"""LoRA training throughput and peak RAM: lit-llama vs Hugging Face transformers + PEFT vs litgpt, on the same work.

Same weights (our checkpoint, converted to HF with scripts/convert_lit_checkpoint.py, and from HF to litgpt by
what `litgpt convert_to_litgpt` runs), the same pre-tokenized samples in the same order (no tokenizer differences),
LoRA r=8 alpha=16 dropout=0.05 on q and v, micro-batch 4 with dynamic padding, AdamW, the same frozen-weight dtype
(`--precision`: by default what finetune/lora.py picks on this CPU, bf16 where bf16 is native, else fp32), the same
number of torch threads.
Each measurement is a fresh subprocess (so peak RSS is that tool's alone), and the tools are interleaved
A B C A B C ... so drifting load on a shared machine hits all of them alike. The runners are in benchmarks/peers/;
the peers run in their own venv (see benchmarks/README.md).

    python benchmarks/lora_training.py --checkpoint_dir checkpoints/smollm2-135m-instruct --rounds 5
    python benchmarks/lora_training.py --quantize nf4 --tools '[lit-llama,hf+peft]'   # QLoRA: PEFT over bitsandbytes

With --quantize nf4 both tools train over a frozen NF4 base (lit-llama through torchao, transformers through
bitsandbytes, the peers' venv needs `pip install torch==2.13.0 bitsandbytes`); litgpt's NF4 path is Lightning's
bitsandbytes precision plugin, which needs CUDA.
"""
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_llama.checkpoint import load_config, weights_path
from lit_llama.files import load_torch, save_json
from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.precision import describe, resolve_precision

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNERS = {"lit-llama": "lit_llama_lora.py", "hf+peft": "hf_peft_lora.py", "litgpt": "litgpt_lora.py"}


def alpaca_like_samples(count: int, vocab_size: int, max_seq_length: int, seed: int) -> list[dict]:
    """Random token ids with Alpaca's shape: lengths log-normal around ~110 tokens (prompt template + instruction +
    response, cut at max_seq_length as the seed's prepare_alpaca did), the first ~40% a prompt with no loss."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        length = min(max_seq_length, max(24, round(rng.lognormvariate(math.log(110), 0.6))))
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        prompt = round(length * rng.uniform(0.25, 0.55))
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def prepared_samples(data_file: Path, count: int, seed: int) -> list[dict]:
    """Samples from a prepared train.pt (scripts/prepare_*.py), shuffled with a fixed seed."""
    samples = [{k: s[k].tolist() for k in ("input_ids", "labels")} for s in load_torch(data_file, mmap=False)]
    random.Random(seed).shuffle(samples)
    if len(samples) < count:
        raise UserError(f"{data_file} has {len(samples)} samples, the benchmark needs {count}")
    return samples[:count]


def prepare_weights(checkpoint_dir: Path, work_dir: Path, peers_python: Path, litgpt_model_name: str,
                    tools: list[str]) -> dict:
    """Each tool's copy of the same weights: lit-llama's checkpoint, its HF conversion, HF -> litgpt (only for the
    `tools` compared: a peers' venv without litgpt serves hf+peft)."""
    hf_dir, litgpt_dir = work_dir / "hf", work_dir / "litgpt"
    source, hf_weights = weights_path(checkpoint_dir), hf_dir / "model.safetensors"
    if not hf_weights.is_file() or source.stat().st_mtime > hf_weights.stat().st_mtime:  # new or stale
        converter = REPO / "scripts" / "convert_lit_checkpoint.py"
        run([sys.executable, converter, "--checkpoint_path", source, "--output_dir", hf_dir])
        shutil.rmtree(litgpt_dir, ignore_errors=True)
    if "litgpt" in tools and not (litgpt_dir / "lit_model.pth").is_file():
        litgpt_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(hf_dir / name, litgpt_dir / name)
        # what `litgpt convert_to_litgpt` runs (its CLI wants the `requests` package, which litgpt does not install)
        convert = "import sys; from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint as c; " \
            "c(__import__('pathlib').Path(sys.argv[1]), model_name=sys.argv[2])"
        run([peers_python, "-c", convert, litgpt_dir, litgpt_model_name])
        (litgpt_dir / "model.safetensors").unlink()  # lit_model.pth holds the weights now
    return {"lit-llama": checkpoint_dir, "hf+peft": hf_dir, "litgpt": litgpt_dir}


def run(command: list, capture: bool = False) -> str:
    """Run a command; on failure a UserError naming it, with the end of its stderr when captured."""
    result = subprocess.run([str(c) for c in command], text=True, capture_output=capture)
    if result.returncode != 0:
        tail = "".join("\n  " + line for line in (result.stderr or "").strip().splitlines()[-20:])
        raise UserError(f"{' '.join(map(str, command))[:120]} failed (exit {result.returncode}){tail}")
    return result.stdout


def summarize(results: list[dict], tools: list[str]) -> dict:
    """Medians and ranges per tool, and lit-llama's speed and RAM relative to each peer (per-round ratios too)."""
    summary = {}
    for tool in tools:
        rows = [r for r in results if r["tool"] == tool]
        speeds, rss = [r["tokens_per_s"] for r in rows], [r["peak_rss_mb"] for r in rows]
        between_steps_rss = [r["rss_between_steps_mb"] for r in rows]
        summary[tool] = dict(
            tokens_per_s_median=statistics.median(speeds), tokens_per_s_min=min(speeds), tokens_per_s_max=max(speeds),
            peak_rss_mb_median=statistics.median(rss), peak_rss_mb_min=min(rss), peak_rss_mb_max=max(rss),
            rss_between_steps_mb_median=statistics.median(between_steps_rss),
            first_loss=rows[0]["first_loss"], rounds=len(rows),
        )
    if "lit-llama" in summary:
        ours = summary["lit-llama"]
        for tool in tools:
            if tool == "lit-llama":
                continue
            per_round = [
                a["tokens_per_s"] / b["tokens_per_s"]
                for a, b in zip(
                    (r for r in results if r["tool"] == "lit-llama"), (r for r in results if r["tool"] == tool)
                )
            ]
            summary[tool]["ours_speedup_median"] = ours["tokens_per_s_median"] / summary[tool]["tokens_per_s_median"]
            summary[tool]["ours_speedup_per_round_min"] = min(per_round)
            summary[tool]["ours_speedup_per_round_max"] = max(per_round)
            summary[tool]["ours_rss_ratio"] = ours["peak_rss_mb_median"] / summary[tool]["peak_rss_mb_median"]
            summary[tool]["ours_between_steps_rss_ratio"] = (
                ours["rss_between_steps_mb_median"] / summary[tool]["rss_between_steps_mb_median"]
            )
    return summary


def markdown_table(summary: dict) -> str:
    lines = [
        "| tool | tokens/s median (min-max) | lit-llama speed-up median (per-round min-max) | peak RSS MB median "
        "(min-max) | RSS between steps MB | lit-llama RSS ratio peak / between steps |",
        "|---|---|---|---|---|---|",
    ]
    for tool, s in summary.items():
        speedup, ratio = "-", "-"
        if "ours_speedup_median" in s:
            low, high = s["ours_speedup_per_round_min"], s["ours_speedup_per_round_max"]
            speedup = f"{s['ours_speedup_median']:.2f}x ({low:.2f}-{high:.2f})"
            ratio = f"{s['ours_rss_ratio']:.2f} / {s['ours_between_steps_rss_ratio']:.2f}"
        lines.append(
            f"| {tool} | {s['tokens_per_s_median']:.1f} ({s['tokens_per_s_min']:.1f}-{s['tokens_per_s_max']:.1f}) | "
            f"{speedup} | "
            f"{s['peak_rss_mb_median']:.0f} ({s['peak_rss_mb_min']:.0f}-{s['peak_rss_mb_max']:.0f}) | "
            f"{s['rss_between_steps_mb_median']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    work_dir: Path = Path("out/benchmarks/lora_training"),
    data_file: Optional[Path] = None,
    tools: list[str] = ["lit-llama", "hf+peft", "litgpt"],
    rounds: int = 5,
    warmup: int = 2,
    steps: int = 8,
    micro_batch: int = 4,
    max_seq_length: int = 256,
    threads: int = 2,
    peers_python: Path = Path(".venv-peers/bin/python"),
    litgpt_model_name: str = "SmolLM2-135M-Instruct",
    seed: int = 1337,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
) -> None:
    """Measure LoRA training tokens/s and peak RSS of each tool, interleaved over several rounds.

    Args:
        checkpoint_dir: lit-llama checkpoint whose weights every tool trains.
        work_dir: Where the converted weights, the workload and results.json go.
        data_file: A prepared train.pt to draw samples from; default: Alpaca-like synthetic token ids.
        tools: Which of lit-llama, hf+peft, litgpt to run.
        rounds: Interleaved rounds (each runs every tool once in a fresh process).
        warmup: Untimed steps per run.
        steps: Timed steps per run.
        micro_batch: Samples per step.
        max_seq_length: Longest synthetic sample, in tokens.
        threads: torch threads in every tool.
        peers_python: Python of the venv with transformers, peft and litgpt.
        litgpt_model_name: litgpt's name for the architecture (convert_to_litgpt needs it).
        seed: Seed of the workload.
        quantize: nf4 for QLoRA (lit-llama and hf+peft only).
        precision: bf16-true or 32-true for every tool (default: what finetune/lora.py defaults to on this CPU: bf16
            where bf16 is native, fp32 elsewhere).
    """
    precision = resolve_precision(precision)
    if precision not in ("bf16-true", "32-true"):
        raise UserError(f"--precision {precision}: the tools are compared in bf16-true or 32-true")
    unknown = [t for t in tools if t not in RUNNERS]
    if unknown:
        raise UserError(f"unknown tool(s) {', '.join(unknown)}: choose from {', '.join(RUNNERS)}")
    if quantize not in (None, "nf4"):
        raise UserError(f"unknown --quantize {quantize!r}: the tools share only nf4")
    if quantize and "litgpt" in tools:
        raise UserError("--quantize nf4 runs lit-llama and hf+peft: litgpt's NF4 needs CUDA (--tools '[lit-llama,hf+peft]')")
    if any(t != "lit-llama" for t in tools) and not peers_python.is_file():
        raise UserError(f"no peers venv at {peers_python}: create it as benchmarks/README.md says")
    config = load_config(weights_path(checkpoint_dir))
    count = (warmup + steps) * micro_batch
    samples = (
        prepared_samples(data_file, count, seed) if data_file
        else alpaca_like_samples(count, config.vocab_size, max_seq_length, seed)
    )
    workload = work_dir / "workload.json"
    save_json({"source": str(data_file or "alpaca-like synthetic"), "samples": samples}, workload)
    model_dirs = prepare_weights(checkpoint_dir, work_dir, peers_python, litgpt_model_name, tools)

    results = []
    for round_index in range(rounds):
        for tool in tools:
            python = sys.executable if tool == "lit-llama" else peers_python
            output = run(
                [python, HERE / "peers" / RUNNERS[tool], "--workload", workload, "--model_dir", model_dirs[tool],
                 "--warmup", warmup, "--steps", steps, "--micro_batch", micro_batch, "--threads", threads,
                 "--precision", precision]
                + (["--quantize", quantize] if quantize else []),
                capture=True,
            )
            result = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[len("RESULT ") :])
            result["round"] = round_index
            results.append(result)
            print(
                f"round {round_index + 1}/{rounds} {tool:10s} {result['tokens_per_s']:8.1f} tok/s  "
                f"peak RSS {result['peak_rss_mb']:6.0f} MB (between steps {result['rss_between_steps_mb']:6.0f})  "
                f"first loss {result['first_loss']:.4f}",
                file=sys.stderr, flush=True,
            )
    summary = summarize(results, tools)
    save_json({"summary": summary, "results": results}, work_dir / "results.json")
    print(f"{describe(precision, torch.device('cpu'), training=True)}; {rounds} rounds of {steps} steps")
    print(markdown_table(summary))


if __name__ == "__main__":
    run_cli(main)
