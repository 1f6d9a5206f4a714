"""The matrix-vector kernels one decode token spends most of its time in, on this CPU: every block matrix of a
config (distinct matrices per layer, as a real model reads them, so caches do not flatter a kernel) times one
vector, kernel by kernel, interleaved round by round. What `fast_decode.py` picks per weight should be the fastest
here; this shows whether it is on a given CPU.

    python benchmarks/matvec_kernels.py --rounds 15

Kernels: `torch.mv` and `F.linear` (bf16, and fp32 for a CPU's `--precision 32-true`; fast_decode chooses between
them by what the CPU can do: `fast_decode.mv_is_fastest`, printed with the table), a
`torch.compile`d reduction (the product written as multiply-and-sum, which Inductor fuses into one pass over the
weight), and for int8 weight-only codes PyTorch's `_weight_int8pack_mm` (what fast_decode uses) and the same compiled
reduction over the codes.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_llama.cli import run_cli
from lit_llama.precision import cpu_summary  # noqa: E402
from lit_llama.fast_decode import mv_is_fastest  # noqa: E402
from lit_llama.model import Config  # noqa: E402
from generation import copy_bandwidth  # noqa: E402


def reduction(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return ((weight.to(x.dtype) * x).sum(-1, dtype=torch.float32) * scales).to(x.dtype)


def block_shapes(config: Config) -> list[tuple[int, int]]:
    """(rows, columns) of one block's matrices as fast_decode packs them: qkv, o, gate+up, down."""
    qkv_rows = (config.n_head + 2 * config.n_query_groups) * config.head_size
    return [(qkv_rows, config.n_embd), (config.n_embd, config.n_head * config.head_size),
            (2 * config.intermediate_size, config.n_embd), (config.n_embd, config.intermediate_size)]


def main(config_name: str = "SmolLM2-135M", rounds: int = 15, threads: int = 2) -> None:
    """Time one token's block matrix-vector products per kernel.

    Args:
        config_name: The model config whose block shapes are timed (random weights).
        rounds: Interleaved rounds after two warm-up rounds.
        threads: torch.set_num_threads.
    """
    torch.set_num_threads(threads)
    config = Config.from_name(config_name)
    torch.manual_seed(0)
    shapes = block_shapes(config) * config.n_layer
    bf16 = [torch.randn(shape, dtype=torch.bfloat16) for shape in shapes]
    fp32 = [weight.float() for weight in bf16]
    vectors32 = {columns: torch.randn(columns) for _, columns in shapes}
    codes = [torch.randint(-127, 128, shape, dtype=torch.int8) for shape in shapes]
    scales = [torch.rand(rows, dtype=torch.bfloat16) / 127 for rows, _ in shapes]
    ones = [torch.ones(rows, dtype=torch.bfloat16) for rows, _ in shapes]
    vectors = {columns: torch.randn(columns, dtype=torch.bfloat16) for _, columns in shapes}
    compiled = torch.compile(reduction, dynamic=False)
    kernels = {
        "bf16 torch.mv": lambda i: torch.mv(bf16[i], vectors[shapes[i][1]]),
        "bf16 F.linear": lambda i: F.linear(vectors[shapes[i][1]].unsqueeze(0), bf16[i]),
        "fp32 torch.mv": lambda i: torch.mv(fp32[i], vectors32[shapes[i][1]]),
        "fp32 F.linear": lambda i: F.linear(vectors32[shapes[i][1]].unsqueeze(0), fp32[i]),
        "bf16 compiled reduction": lambda i: compiled(vectors[shapes[i][1]], bf16[i], ones[i]),
        "int8 _weight_int8pack_mm": lambda i: torch._weight_int8pack_mm(
            vectors[shapes[i][1]].unsqueeze(0), codes[i], scales[i]),
        "int8 compiled reduction": lambda i: compiled(vectors[shapes[i][1]], codes[i], scales[i]),
    }
    times = {name: [] for name in kernels}
    with torch.inference_mode():
        for round_index in range(rounds + 2):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                for i in range(len(shapes)):
                    kernel(i)
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
    bandwidth = copy_bandwidth()
    print(f"{cpu_summary()}, {threads} threads, {config_name}: {config.n_layer} x {block_shapes(config)}, "
          f"{rounds} rounds; copy bandwidth {bandwidth / 1e9:.1f} GB/s; fast_decode multiplies bf16 through "
          f"{'torch.mv' if mv_is_fastest() else 'F.linear'} here")
    print("| kernel | ms per token, median (min-max) | weight bytes read per second | vs bf16 torch.mv |")
    print("|---|---|---|---|")
    reference = statistics.median(times["bf16 torch.mv"])
    for name, values in times.items():
        median = statistics.median(values)
        weight_bytes = sum(rows * columns for rows, columns in shapes) * {"bf16": 2, "fp32": 4}.get(name[:4], 1)
        print(f"| {name} | {median * 1e3:.2f} ({min(values) * 1e3:.2f}-{max(values) * 1e3:.2f}) "
              f"| {weight_bytes / median / 1e9:.1f} GB/s | {reference / median:.2f}x |")


if __name__ == "__main__":
    run_cli(main)
