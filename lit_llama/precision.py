"""Choosing a precision (Fabric's names: `32-true`, `bf16-true`, `bf16-mixed`, `16-mixed`, ...) by what the hardware
computes natively, and by the kind of work.

Two kinds of work want different things from a CPU (BENCHMARKS.md, "Precision by CPU"):
- products of many rows (training, a prompt's prefill, a batch of decoding rows) are bound by arithmetic: bf16 is
  fast only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX; PyTorch's oneDNN check says). A CPU with
  AVX2 only multiplies bf16 matrices 6-8x (576-wide) to 90x (1024-wide) slower than fp32.
- decoding one sequence reads every weight once per token and is bound by memory bandwidth: bf16 weights (half of
  fp32's bytes) decode faster on every CPU, native bf16 or not.

So by default training computes in bf16 only where bf16 is native (fp32 elsewhere), and generation holds bf16
weights on every CPU; where bf16 is not native, its forwards of many rows (prefill, batches) run their products in
fp32 (`products_for`, `Fp32Products`), each bf16 weight copied into an fp32 scratch buffer first (a 500-token
prefill at 0.9x fp32 weights' speed, 5x bf16's). The numbers are bf16's either way: bf16 inputs, fp32 sums, bf16
outputs.

`LIT_LLAMA_NATIVE_BF16=0` (or `1`) makes the choice as a CPU without (with) native bf16 would: how the tests and
developers run the other kinds' paths on the machine at hand.
"""
import contextlib
import functools
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lit_llama.errors import UserError

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")
# the CPU flags that decide the precision and kernels, as /proc/cpuinfo names them
DECIDING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# rows from which an fp32 product (with the weight copied to fp32) beats a bf16 one on a CPU without native bf16:
# about 16 rows of SmolLM2's block matrices on an AMD EPYC with AVX2 only (1.0-1.2x there; 2.6-2.9x at 64 rows,
# 5.8-6.1x at 512; BENCHMARKS.md, "Precision by CPU")
FP32_PRODUCT_MIN_ROWS = 16


@functools.cache
def cpu_flags() -> frozenset:
    """The instruction-set flags of this CPU as /proc/cpuinfo lists them (empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def forced_native_bf16() -> Optional[bool]:
    """`LIT_LLAMA_NATIVE_BF16`, if set: 0 makes every choice as a CPU without native bf16 would, 1 as one with."""
    value = os.environ.get("LIT_LLAMA_NATIVE_BF16")
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise UserError(f"LIT_LLAMA_NATIVE_BF16 must be 0 or 1, got {value!r}")
    return value == "1"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices at least as fast as fp32 ones (PyTorch's own check: oneDNN's bf16
    kernels, AVX512-BF16 or AMX), or what LIT_LLAMA_NATIVE_BF16 says."""
    forced = forced_native_bf16()
    if forced is not None:
        return forced
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx() -> bool:
    """AMX tiles: on such CPUs a one-row bf16 product is fastest through torch.mv (fast_decode.py)."""
    forced = forced_native_bf16()
    return "amx_bf16" in cpu_flags() if forced is None else forced and "amx_bf16" in cpu_flags()


def bf16_supported() -> bool:
    """Whether bf16 is the right dtype for products of many rows here (a GPU that has it; a CPU with native bf16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(precision: Optional[str], mixed: bool = False, decoding: bool = False) -> str:
    """`None` means automatic. Training: bf16 where the hardware computes it natively (`-mixed` for full finetuning),
    else fp32 (batched evaluation picks this way too). `decoding` (generate, chat, serve): bf16 weights on every CPU,
    as they decode one sequence about twice as fast as fp32 ones (forwards of many rows then multiply in fp32 where
    bf16 is not native: `products_for`)."""
    if precision is None:
        on_cpu = not torch.cuda.is_available()
        if bf16_supported() or (decoding and on_cpu):
            return "bf16-mixed" if mixed else "bf16-true"
        return "32-true"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in under `precision` (mixed precision keeps fp32 weights)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(precision, torch.float32)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def upcasts_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products of many rows run in fp32 (`Fp32Products`): bf16 weights on a CPU without native bf16."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16()


def products_for(rows: int, weights: torch.Tensor):
    """The context a forward of `rows` token rows (batch x length) over a model whose weights are like `weights`
    runs under: `Fp32Products` where the rows are many and `upcasts_products`, else nothing. Only around forwards
    of many rows: the mode's Python hook on every operation would cost a one-row decode step ~20%."""
    if rows >= FP32_PRODUCT_MIN_ROWS and upcasts_products(weights.dtype, weights.device):
        return Fp32Products()
    return contextlib.nullcontext()


def cpu_summary() -> str:
    """This CPU's name and the flags that decide precision and kernels: `AMD EPYC [avx2; no avx512f, ...]`."""
    flags = cpu_flags()
    has = [flag for flag in DECIDING_FLAGS if flag in flags]
    lacks = [flag for flag in DECIDING_FLAGS if flag not in flags]
    features = "; ".join(part for part in (", ".join(has), "no " + ", ".join(lacks) if lacks else "") if part)
    return f"{cpu_name()} [{features}]"


def describe(precision: str, device: torch.device, training: bool = False) -> str:
    """One line for the start of every command: the precision, the hardware facts that decided it, the threads."""
    if device.type == "cuda":
        return f"precision {precision} on {torch.cuda.get_device_name(device)}"
    native = cpu_has_native_bf16()
    forced = "" if forced_native_bf16() is None else " (as LIT_LLAMA_NATIVE_BF16 says)"
    if upcasts_products(weights_dtype(precision), device):
        how = "bf16 weights, products of many rows in fp32 as bf16 is not native here" + forced
        if training:
            how += "; training in bf16 here is several times slower than --precision 32-true"
    elif weights_dtype(precision) == torch.bfloat16 or autocast_dtype(precision) == torch.bfloat16:
        how = "bf16 is native here" + forced if native else "bf16"
    else:
        how = "fp32" + ("" if native else ", as bf16 is not native here" + forced)
    return f"precision {precision} ({how}) on {cpu_summary()}, {torch.get_num_threads()} threads"


# the fp32 copy of a weight is made this many elements at a time (16 MiB): bounded memory for a vocabulary-sized head
SCRATCH_ELEMENTS = 2**22
_scratch = threading.local()


def fp32_scratch(elements: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least `elements`, kept between calls: a fresh fp32 tensor per product would
    cost ~9x the copy into it in page faults."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        with torch.inference_mode(False):  # an ordinary tensor: writable in and out of inference mode
            buffer = _scratch.buffer = torch.empty(elements)
    return buffer[:elements]


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear of bf16 `x` and `weight` summed in fp32 and rounded to bf16, the weight copied to fp32 a block of
    rows at a time."""
    rows_per_block = max(1, SCRATCH_ELEMENTS // weight.size(1))
    x32 = x.float()
    if weight.size(0) <= rows_per_block:
        weight32 = fp32_scratch(weight.numel()).view(weight.shape).copy_(weight)
        return F.linear(x32, weight32, None if bias is None else bias.float()).to(torch.bfloat16)
    y = x.new_empty(*x.shape[:-1], weight.size(0))
    for start in range(0, weight.size(0), rows_per_block):
        block = weight[start : start + rows_per_block]
        weight32 = fp32_scratch(block.numel()).view(block.shape).copy_(block)
        part = None if bias is None else bias[start : start + rows_per_block].float()
        y[..., start : start + block.size(0)] = F.linear(x32, weight32, part)
    return y


class Fp32Products(TorchFunctionMode):
    """Within it, `F.linear` of bf16 CPU tensors with at least `FP32_PRODUCT_MIN_ROWS` rows and no gradient to keep
    computes in fp32 (`fp32_linear`); every other call runs as it is. The numbers are those of a native bf16 product
    (bf16 inputs, fp32 sums, bf16 outputs), at fp32's speed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            plain = type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a quantized tensor subclass
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            if (plain and not needs_grad and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu"
                    and x.dim() and x.numel() >= FP32_PRODUCT_MIN_ROWS * x.size(-1)):
                return fp32_linear(x, weight, bias)
        return func(*args, **kwargs)
