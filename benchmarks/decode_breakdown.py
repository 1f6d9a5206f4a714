"""Where one decode token's time goes, bf16 against int8 weight-only: fast_decode's `DecodeStep` whole, with the
block products skipped (the output head still multiplied), and with every product skipped (what remains: norms,
rotary embedding, the KV cache, attention, the step's Python). A skipped product returns a zero vector of its size,
so the rest of the step runs as before; the differences give the block products, the head and the rest per token.
Variants interleaved round by round in one process.

    python benchmarks/decode_breakdown.py --rounds 5
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lit_llama.fast_decode as fast_decode  # noqa: E402
from lit_llama.checkpoint import load  # noqa: E402
from lit_llama.cli import run_cli
from lit_llama.precision import cpu_summary  # noqa: E402
from lit_llama.quantize import quantize_for_generation  # noqa: E402
from generation import random_model  # noqa: E402


def skipping(multiply, kept: list):
    """fast_decode.matvec that multiplies only the matrices in `kept` (the heads) and returns zeros for the rest."""
    zeros = {}

    def matvec(weight, x, bias, mv):
        if any(weight is matrix for matrix in kept):
            return multiply(weight, x, bias, mv)
        rows = (weight.codes if type(weight) is fast_decode.Int8Matrix else weight).size(0)
        if rows not in zeros:
            zeros[rows] = torch.zeros(rows, dtype=x.dtype)
        return zeros[rows]

    return matvec


def main(
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"), config_name: str = "SmolLM2-135M",
    rounds: int = 5, tokens: int = 200, threads: int = 2,
) -> None:
    """Args:
        checkpoint_dir: Converted weights; random weights of `config_name` where the directory is absent.
        config_name: The model config of the random weights.
        rounds: Interleaved rounds (each variant decodes `tokens` steps per round).
        tokens: Steps per round, at positions 20 to 20 + tokens.
        threads: torch.set_num_threads.
    """
    if rounds < 1 or tokens < 1:
        raise SystemExit("error: --rounds and --tokens must be at least 1")
    torch.set_num_threads(threads)
    real = (checkpoint_dir / "lit-llama.pth").is_file()

    def bf16_model():
        return load(checkpoint_dir, "cpu", torch.bfloat16)[0].eval() if real else random_model(config_name).bfloat16()

    multiply = fast_decode.matvec
    steps = {}
    for mode, model in {"bf16": bf16_model(), "int8": quantize_for_generation(bf16_model(), "int8")}.items():
        model.setup_kv_cache(batch_size=1, max_seq_length=20 + tokens + 1)
        steps[mode] = fast_decode.DecodeStep.for_model(model)
        if steps[mode] is None:
            raise SystemExit(f"error: fast_decode's step does not apply to the {mode} {config_name} model")
    heads = [step.lm_head for step in steps.values()]
    # every product; the heads' only; none
    products = {"all": multiply, "head": skipping(multiply, heads), "none": skipping(multiply, [])}
    times = {(mode, kept): [] for mode in steps for kept in products}
    token = torch.tensor([[1]])
    try:
        with torch.inference_mode():
            for round_index in range(rounds + 1):  # the first round warms up
                for mode, kept in times:
                    fast_decode.matvec = products[kept]
                    start = time.perf_counter()
                    for position in range(20, 20 + tokens):
                        steps[mode](token, position)
                    if round_index:
                        times[mode, kept].append((time.perf_counter() - start) / tokens * 1e3)
    finally:
        fast_decode.matvec = multiply
    print(f"{checkpoint_dir if real else 'random ' + config_name}, {cpu_summary()}, {threads} threads, {rounds} rounds "
          f"of {tokens} tokens, torch.mv: {steps['bf16'].mv}")
    print("| | whole token, ms median (min-max) | block products | head | the rest |")
    print("|---|---|---|---|---|")
    parts = {}
    for mode in steps:
        median = {kept: statistics.median(times[mode, kept]) for kept in products}
        parts[mode] = [median["all"], median["all"] - median["head"], median["head"] - median["none"], median["none"]]
        whole = times[mode, "all"]
        print(f"| {mode} | {median['all']:.2f} ({min(whole):.2f}-{max(whole):.2f}) | "
              + " | ".join(f"{part:.2f}" for part in parts[mode][1:]) + " |")
    ratios = [bf16 / int8 for bf16, int8 in zip(parts["bf16"], parts["int8"])]
    print(f"| bf16 / int8 | {ratios[0]:.2f}x | {ratios[1]:.2f}x | {ratios[2]:.2f}x | {ratios[3]:.2f}x |")


if __name__ == "__main__":
    run_cli(main)
