"""What each precision costs on this CPU, by kind of work: the facts `lit_llama/precision.py` chooses by.

1. One block matrix of SmolLM2 times 1 to 512 rows: bf16 (PyTorch's kernel for this CPU), fp32, and bf16 numbers
   multiplied in fp32 (`Fp32Products`: the weight copied into an fp32 buffer first).
2. A 500-token prompt's prefill of the whole model: fp32 weights, bf16 weights, bf16 weights under `Fp32Products`
   (what generation runs on a CPU without native bf16).
3. One decode token of one sequence (fast_decode's step): bf16 weights against fp32 weights.

Every measurement is interleaved with the others of its part, round by round; medians and ratios are printed.

    python benchmarks/precision_by_cpu.py --rounds 5
    LIT_LLAMA_NATIVE_BF16=0 python benchmarks/precision_by_cpu.py   # the choices of a CPU without native bf16
"""
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_llama.checkpoint import load  # noqa: E402
from lit_llama.cli import run_cli  # noqa: E402
from lit_llama.fast_decode import DecodeStep  # noqa: E402
from lit_llama.model import Config, LLaMA  # noqa: E402
from lit_llama.precision import Fp32Products, cpu_has_native_bf16, cpu_summary  # noqa: E402
from generation import random_model  # noqa: E402


def interleaved(cases: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per case, the cases run A B C A B C ... after one warm-up round."""
    times = {name: [] for name in cases}
    for round_index in range(rounds + 1):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def products(config: Config, rounds: int) -> None:
    print("| rows | matrix | bf16 ms | fp32 ms | bf16 in Fp32Products ms | fp32 products vs bf16 |")
    print("|---|---|---|---|---|---|")
    mode = Fp32Products()
    for rows in (1, 4, 6, 16, 64, 512):
        for shape in ((config.intermediate_size, config.n_embd), (config.n_embd, config.intermediate_size)):
            weight = torch.randn(shape, dtype=torch.bfloat16)
            weight32 = weight.float()
            x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
            x32 = x.float()

            def upcast():
                with mode:
                    F.linear(x, weight)

            medians = interleaved({"bf16": lambda: F.linear(x, weight), "fp32": lambda: F.linear(x32, weight32),
                                   "upcast": upcast}, rounds * 3)
            print(f"| {rows} | {shape[0]} x {shape[1]} | {medians['bf16'] * 1e3:.3f} | {medians['fp32'] * 1e3:.3f} | "
                  f"{medians['upcast'] * 1e3:.3f} | {medians['bf16'] / medians['upcast']:.2f}x |")


def prefill(models: dict[str, LLaMA], prompt_length: int, rounds: int) -> None:
    prompt = torch.randint(0, 1000, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    last = torch.zeros(prompt.shape, dtype=torch.bool)
    last[:, -1] = True

    def run(model: LLaMA, upcast: bool) -> Callable[[], None]:
        def case():
            model.setup_kv_cache(1, prompt_length + 1)
            with torch.inference_mode(), (Fp32Products() if upcast else contextlib.nullcontext()):
                model(prompt, input_pos=0, logits_at=last)
            model.clear_kv_cache()
        return case

    medians = interleaved({"fp32 weights": run(models["fp32"], False), "bf16 weights": run(models["bf16"], False),
                           "bf16 weights, Fp32Products": run(models["bf16"], True)}, rounds)
    print(f"\n| {prompt_length}-token prefill | seconds | tokens/s | vs fp32 weights |")
    print("|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {prompt_length / seconds:.0f} | {medians['fp32 weights'] / seconds:.2f}x |")


def decode(models: dict[str, LLaMA], tokens: int, rounds: int) -> None:
    steps = {}
    for name, model in models.items():
        model.setup_kv_cache(1, tokens + 1)
        steps[name] = DecodeStep(model)

    def run(step: DecodeStep) -> Callable[[], None]:
        def case():
            token = torch.tensor([[5]])
            with torch.inference_mode():
                for position in range(tokens):
                    step(token, position)
        return case

    medians = interleaved({name: run(step) for name, step in steps.items()}, rounds)
    print(f"\n| one-sequence decode ({tokens} tokens) | tokens/s | vs fp32 weights |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} weights | {tokens / seconds:.1f} | {medians['fp32'] / seconds:.2f}x |")


def main(checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"), rounds: int = 5, threads: int = 2,
         prompt_length: int = 500, decode_tokens: int = 64) -> None:
    """Time products, a prefill and decoding in bf16 and fp32 on this CPU.

    Args:
        checkpoint_dir: A converted checkpoint; if it does not exist, a random-weight SmolLM2-135M.
        rounds: Interleaved rounds after a warm-up round.
        threads: torch.set_num_threads.
        prompt_length: Tokens of the timed prefill.
        decode_tokens: Tokens of each timed decode.
    """
    torch.set_num_threads(threads)
    if checkpoint_dir.is_dir():
        model, _ = load(checkpoint_dir, "cpu", torch.float32)
    else:
        torch.manual_seed(0)
        model = random_model("SmolLM2-135M")
    models = {"fp32": model, "bf16": LLaMA(model.config).to(torch.bfloat16).requires_grad_(False)}
    models["bf16"].load_state_dict(model.state_dict())
    print(f"{cpu_summary()}; bf16 native: {cpu_has_native_bf16()}; {threads} threads; {rounds} rounds; "
          f"torch {torch.__version__}\n")
    products(model.config, rounds)
    prefill(models, prompt_length, rounds)
    decode(models, decode_tokens, rounds)


if __name__ == "__main__":
    run_cli(main)
