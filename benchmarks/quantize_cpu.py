"""QLoRA and weight-only generation on this CPU, SmolLM2-135M (the converted checkpoint, or random weights of its
shape when there is none):

- peak RSS of one LoRA training step (memory_7b.py's step: LoRA r=8 on q and v, AdamW) with the frozen base in
  bf16 vs quantized, each in a fresh process; the model is built on the meta device and each block is materialised
  and quantized as it is made, so it is never whole in bf16. Two workloads: the seed's micro-batch (activations
  dominate) and a short one with activation checkpointing (the weights dominate). Besides the process's peak RSS,
  the step's own memory: the peak minus the RSS before the model was built (interpreter, torch, torchao);
- greedy decode tokens/s of bf16 vs int8 and int4 weight-only (and fp32, the exact model: on a CPU without native
  bf16, the precision a quantized kernel must beat to be worth it), interleaved round by round, and how many of the
  greedy tokens agree with bf16's on four questions (on the real checkpoint), next to the fp32 model's: how far
  bf16's own rounding already carries a greedy text from the exact model's.

    python benchmarks/quantize_cpu.py --rounds 3
"""
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_llama.checkpoint import load
from lit_llama.cli import run_cli
from lit_llama.precision import cpu_summary
from lit_llama.generation import generate
from lit_llama.model import LLaMA, Config
from lit_llama.prompts import resolve_prompt_style
from lit_llama.tokenizer import Tokenizer
from lit_llama.quantize import parameter_bytes, quantize_for_generation, quantize_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import random_model  # noqa: E402
from memory_7b import random_lora_model, train_step  # noqa: E402

MiB = 2**20
QUESTIONS = [  # the first is timed; all four count for agreement
    "Explain how a bicycle works, part by part, for a ten-year-old.",
    "Write a short story about a robot who learns to paint.",
    "List ten tips for staying healthy in winter and explain each one.",
    "What causes the seasons on Earth?",
]
WORKLOADS = {"4x256": (4, 256, False), "1x128, checkpointing": (1, 128, True)}


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure_step(config_name: str, quantize: Optional[str], workload: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    micro_batch, seq_length, checkpointing = WORKLOADS[workload]
    if quantize:  # torchao imported before the baseline: a QLoRA process holds it
        quantize_weight(torch.zeros(64, 64), quantize)
    baseline = rss()
    config = Config.from_name(config_name)
    torch.manual_seed(0)
    model = random_lora_model(config, 8, 16, "cpu", checkpointing, quantize)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    built = rss()
    start = time.perf_counter()
    loss = train_step(model, optimizer, torch.randint(0, config.vocab_size, (micro_batch, seq_length)))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(baseline=baseline, built=built, peak=peak, seconds=seconds, bytes=parameter_bytes(model), loss=loss)


def decode(checkpoint_dir: Optional[Path], config_name: str, new_tokens: int, rounds: int, threads: int) -> dict:
    """Greedy tokens/s of the bf16 model, its int8 and int4 weight-only copies and the fp32 model, interleaved round
    by round on the first question; then each model's greedy tokens for every question."""
    torch.set_num_threads(threads)
    real = checkpoint_dir is not None and checkpoint_dir.is_dir()

    def base_model(dtype: torch.dtype = torch.bfloat16) -> LLaMA:
        if real:
            return load(checkpoint_dir, "cpu", dtype)[0].eval()
        torch.manual_seed(0)
        return random_model(config_name).to(dtype).eval()

    models = {"bf16": base_model(), "int8": quantize_for_generation(base_model(), "int8"),
              "int4": quantize_for_generation(base_model(), "int4"), "fp32": base_model(torch.float32)}
    if real:  # questions in the model's chat template: text it was trained on, not noise
        style, tokenizer = resolve_prompt_style(None, checkpoint_dir), Tokenizer(checkpoint_dir)
        prompts = [style.encode_prompt(tokenizer, style.apply(question)) for question in QUESTIONS]
    else:
        vocab_size = models["bf16"].config.vocab_size
        prompts = [torch.randint(0, vocab_size, (16,), generator=torch.Generator().manual_seed(seed))
                   for seed in range(len(QUESTIONS))]
    speeds = {mode: [] for mode in models}
    for model in models.values():  # warm-up
        list(generate(model, prompts[0], 8, temperature=0.0))
    for _ in range(rounds):
        for mode, model in models.items():
            start = time.perf_counter()
            tokens = list(generate(model, prompts[0], new_tokens, temperature=0.0))
            speeds[mode].append(len(tokens) / (time.perf_counter() - start))
    texts = {mode: [list(generate(model, prompt, new_tokens, temperature=0.0)) for prompt in prompts]
             for mode, model in models.items()}
    # free-running greedy texts part at the first near-tie and then differ for good; teacher-forced, each model
    # predicts every position of bf16's texts, so each position counts once
    agreement = {mode: [] for mode in models}
    for prompt, reference in zip(prompts, texts["bf16"]):
        text = torch.cat([prompt, torch.tensor(reference)])[None]
        with torch.inference_mode():
            predictions = {mode: model(text)[0, len(prompt) - 1 : -1].argmax(-1) for mode, model in models.items()}
        for mode, predicted in predictions.items():
            agreement[mode] += (predicted == predictions["bf16"]).tolist()
    return dict(speeds=speeds, texts=texts, agreement={mode: sum(a) / len(a) for mode, a in agreement.items()},
                source=str(checkpoint_dir) if real else f"random {config_name}")


def child(command: list) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, command)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def report_steps(config_name: str, rounds: int, threads: int) -> None:
    for workload in WORKLOADS:
        print(f"{config_name}, one LoRA step (r=8 on q, v) of {workload}, {threads} threads, {rounds} rounds, "
              f"{cpu_summary()}")
        steps = {}
        for quantize in ("bf16", "nf4", "nf4-dq", "int8"):
            args = ["--config_name", config_name, "--role", "step", "--workload", workload, "--threads", threads]
            steps[quantize] = [child(args + ([] if quantize == "bf16" else ["--mode", quantize]))
                               for _ in range(rounds)]
            peak = statistics.median(r["peak"] for r in steps[quantize])
            own = statistics.median(r["peak"] - r["baseline"] for r in steps[quantize])
            ratio = [round(r["peak"] / b["peak"], 2) for r, b in zip(steps[quantize], steps["bf16"])]
            own_ratio = [round((r["peak"] - r["baseline"]) / (b["peak"] - b["baseline"]), 2)
                         for r, b in zip(steps[quantize], steps["bf16"])]
            first = steps[quantize][0]
            print(f"  {quantize:6}: peak RSS {peak / MiB:6.0f} MiB (per round / bf16 {ratio}); the step's own "
                  f"{own / MiB:5.0f} MiB (/ bf16 {own_ratio}); before the model {first['baseline'] / MiB:.0f} MiB, "
                  f"built {first['built'] / MiB:.0f} MiB; weights: quantized {first['bytes']['quantized'] / MiB:.0f} "
                  f"MiB, unquantized {first['bytes']['unquantized'] / MiB:.0f} MiB; step "
                  f"{statistics.median(r['seconds'] for r in steps[quantize]):.2f} s")


def divergence(text: list[int], reference: list[int]) -> str:
    first = next((i for i, (a, b) in enumerate(zip(text, reference)) if a != b), None)
    return "all equal" if first is None else f"first differs at {first}"


def report_decode(checkpoint_dir: Path, config_name: str, rounds: int, new_tokens: int, threads: int) -> None:
    decoded = child(["--checkpoint_dir", checkpoint_dir, "--config_name", config_name, "--role", "decode",
                     "--rounds", rounds, "--new_tokens", new_tokens, "--threads", threads])
    speeds, references = decoded["speeds"], decoded["texts"]["bf16"]
    print(f"{decoded['source']}, greedy decode of {new_tokens} tokens, {rounds} interleaved rounds on the first of "
          f"{len(references)} questions, {threads} threads, {cpu_summary()}")
    for mode, texts in decoded["texts"].items():
        speed = ""
        if mode in speeds:
            values, ratios = speeds[mode], [round(a / b, 2) for a, b in zip(speeds[mode], speeds["bf16"])]
            ratio = statistics.median(values) / statistics.median(speeds["bf16"])
            speed = (f"{statistics.median(values):6.1f} tokens/s (rounds {[round(v, 1) for v in values]}), "
                     f"x{ratio:.2f} bf16 (per round {ratios}); ")
        equal = [f"{sum(a == b for a, b in zip(text, reference))}/{len(reference)} ({divergence(text, reference)})"
                 for text, reference in zip(texts, references)]
        print(f"  {mode:5}: {speed}free-running, tokens equal bf16's per question: "
              f"{', '.join(equal)}; teacher-forced on bf16's texts, {decoded['agreement'][mode]:.1%} of the next "
              f"tokens equal bf16's")


def main(
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"), config_name: str = "SmolLM2-135M",
    rounds: int = 3, new_tokens: int = 256, threads: int = 2, only: Optional[str] = None,
    role: Optional[str] = None, mode: Optional[str] = None, workload: str = "4x256",
) -> None:
    """Args:
        checkpoint_dir: The converted checkpoint decoding runs (random weights of config_name where it is missing).
        config_name: The model shape of the training steps (random weights).
        rounds: Training steps (one per fresh process) per format and workload, and interleaved decode rounds.
        new_tokens: Greedy tokens per decode round.
        threads: torch threads.
        only: "steps" or "decode" to run one half.
        role, mode, workload: internal (a child process's measurement).
    """
    if role == "step":
        print("RESULT " + json.dumps(measure_step(config_name, mode, workload, threads)))
    elif role == "decode":
        print("RESULT " + json.dumps(decode(checkpoint_dir, config_name, new_tokens, rounds, threads)))
    else:
        if only != "decode":
            report_steps(config_name, rounds, threads)
        if only != "steps":
            report_decode(checkpoint_dir, config_name, rounds, new_tokens, threads)


if __name__ == "__main__":
    run_cli(main)
