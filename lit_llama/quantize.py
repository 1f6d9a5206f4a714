"""Quantized frozen weights, through torchao's tensor subclasses:

- training (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): `quantize_frozen(model, mode)` stores
  every frozen weight of the transformer blocks' linear layers as NF4 ("nf4", "nf4-dq") or int8 ("int8"); LoRA and
  adapter tensors stay in their own dtype and train as before. Each layer dequantizes its own weight inside its
  forward (and again in backward), so at most one layer's weight exists in bf16 at a time.
- generation: `quantize_for_generation(model, "int8" | "int4")`, weight-only, from a bf16 model just loaded.

The token embedding, the output head (the embedding itself on tied models), the norms and everything that trains
stay unquantized: `unquantized_parameters(model)` counts them.

Why torchao's NF4 and not bitsandbytes (howto/finetune_lora.md, "QLoRA"): NF4Tensor is plain PyTorch on any device
and shards under FSDP2 (it implements the all-gather hooks torchtune relies on), while bitsandbytes' Params4bit loses
its quantization state under FSDP2's fully_shard; bitsandbytes' kernels are faster per layer (CPU and CUDA).
"""
import ctypes
import functools
import logging
import sys
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import UserError
from lit_llama.precision import cpu_flags

TRAINING_MODES = {
    "nf4": "4-bit NormalFloat, one bf16 absmax per 64 weights (4.25 bits per weight)",
    "nf4-dq": "4-bit NormalFloat with double quantization: the absmax scalers in int8 (about 4.13 bits per weight)",
    "int8": "int8, one scale per output row (8 bits per weight)",
}
GENERATION_MODES = {
    "int8": "int8 weight-only, one scale per output row",
    "int4": "int4 weight-only, one scale and zero point per group of 128 (or 64, 32) inputs",
}
NF4_BLOCK_SIZE = 64  # weights per absmax, as in QLoRA
NF4_SCALER_BLOCK_SIZE = 256  # absmax scalers per int8 scale under double quantization, as in QLoRA
SCALER_GROUPS_MULTIPLE = 8  # groups of scalers per weight: a multiple of 8 shards evenly over 1, 2, 4 or 8 devices


@contextmanager
def _quiet_torchao_import():
    """torchao logs a warning for each CUDA extension it cannot load on a CPU machine, and torch one for an enum
    it registers: noise on every script start, not something a user can act on."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@functools.cache
def _torchao():
    try:
        with _quiet_torchao_import():
            import torchao.quantization as ao
            from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
    except ImportError as error:
        raise UserError(
            f"quantization needs torchao ({error}): pip install -e '.[quantize]' (with torch pinned, see README)"
        ) from None
    return ao, NF4Tensor, to_nf4, Int4OpaqueTensor


def check_training_mode(mode: Optional[str], method: str) -> Optional[str]:
    """`mode` for a finetune of `method` ("lora", "adapter", "adapter_v2", "full"), or a UserError saying why not."""
    if mode is None:
        return None
    if mode not in TRAINING_MODES:
        raise UserError(f"unknown --quantize {mode!r}: choose from {', '.join(TRAINING_MODES)}")
    if method == "full":
        raise UserError(
            f"--quantize {mode} freezes the base weights in {mode}, which a full finetune trains: "
            "quantize for lora, adapter or adapter_v2, or drop --quantize"
        )
    return mode


def check_generation_mode(mode: Optional[str]) -> Optional[str]:
    if mode is not None and mode not in GENERATION_MODES:
        raise UserError(f"unknown --quantize {mode!r} for generation: choose from {', '.join(GENERATION_MODES)}")
    return mode


def generation_speed_note(mode: Optional[str]) -> Optional[str]:
    """A line to show where a weight-only mode decodes slower than bf16 weights on this CPU, by what the CPU can do:
    PyTorch's int4 CPU kernel has no fast path without AVX-512 (0.82x bf16 on an AMD EPYC with AVX2 only; still
    1.5x fp32 and a quarter of bf16's memory, which is why the mode is kept: BENCHMARKS.md, "Weight-only
    generation")."""
    if mode == "int4" and "avx512f" not in cpu_flags():
        return ("--quantize int4: without AVX-512 this CPU decodes int4 weights slower than bf16 ones (about 0.8x); "
                "leave --quantize out for speed, keep int4 for a quarter of bf16's memory")
    return None


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is one of the quantized tensors made here (not, say, an FSDP2 shard of a plain weight)."""
    if type(weight) in (torch.Tensor, nn.Parameter) or "torchao" not in sys.modules:
        return False
    ao, NF4Tensor, _, Int4OpaqueTensor = _torchao()
    return isinstance(weight, (NF4Tensor, ao.Int8Tensor, Int4OpaqueTensor))


def dequantize(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight as a plain tensor (in `dtype`, else the dtype it was quantized from); plain tensors pass through."""
    dtype = dtype or weight.dtype
    if not is_quantized(weight):
        return weight.to(dtype)
    _, NF4Tensor, _, Int4OpaqueTensor = _torchao()
    if isinstance(weight, NF4Tensor):
        return dequantize_nf4(weight).to(dtype)
    if isinstance(weight, Int4OpaqueTensor):  # no dequantize in torchao 0.18: its own kernel times the identity
        identity = torch.eye(weight.size(1), dtype=weight.dtype, device=weight.device)
        return F.linear(identity, weight).t().contiguous().to(dtype)
    return weight.dequantize(dtype)


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """torchao's `NF4Tensor.get_original_weight()`, bit for bit, in three passes instead of about ten (2-2.5x faster
    on a CPU, BENCHMARKS.md): each byte holds two 4-bit codes, so a 256-entry table gives both levels at once, then
    every block of 64 is scaled by its absmax (the double-quantized scalers restored as torchao restores them)."""
    levels, codes = weight.nf4, torch.arange(256, device=weight.device)
    pairs = torch.stack([levels[codes >> 4], levels[codes & 15]], dim=-1)  # byte -> (high code's, low code's level)
    absmax = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    values = pairs.index_select(0, weight.quantized_data.int()).view(-1, weight.block_size)
    return (values * absmax.unsqueeze(-1)).view(weight.shape)


class _FrozenQuantizedLinear(torch.autograd.Function):
    """x W^T + b for a frozen quantized W that keeps only the quantized form for backward: autograd through a
    dequantize-then-matmul would save a bf16 copy of every weight, the memory that quantizing saves."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        if x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu" and int8_kernel_applies(weight):
            rows = x.reshape(-1, x.size(-1)).contiguous()
            y = torch._weight_int8pack_mm(rows, weight.qdata, weight.scale.view(-1).to(x.dtype))
            y = y.view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return F.linear(x, dequantize(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_bias = grad.reshape(-1, grad.size(-1)).sum(0) if ctx.needs_input_grad[2] else None
        return grad @ dequantize(weight, grad.dtype), None, grad_bias


def int8_kernel_applies(weight: torch.Tensor) -> bool:
    """Whether PyTorch's CPU kernel for bf16/fp32 activations times int8 weights with a scale per row takes `weight`:
    it reads the int8 weight directly (1.3-2x a bf16 matrix-vector product, BENCHMARKS.md), where dequantizing first
    reads it three times. It takes inputs in multiples of 16 only (in torch 2.13 other widths fail, 172 crashes the
    process)."""
    ao, _, _, _ = _torchao()
    return (
        isinstance(weight, ao.Int8Tensor) and weight.scale.numel() == weight.size(0)
        and weight.act_quant_kwargs is None and weight.size(1) % 16 == 0
    )


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear for a quantized weight: dequantized inside, never kept in bf16. Int4 (generation only) runs torchao's
    own CPU kernel."""
    _, _, _, Int4OpaqueTensor = _torchao()
    if isinstance(weight, Int4OpaqueTensor):
        return F.linear(x, weight, bias)
    return _FrozenQuantizedLinear.apply(x, weight, bias)


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight is quantized; same state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)


def _nf4(weight: torch.Tensor, double_quantize: bool, shards: int, name: str) -> torch.Tensor:
    """torchao's NF4 codes for `weight`. torchao always stores the absmax scalers double-quantized (int8, one scale
    per `scaler_block_size` scalers after subtracting their mean); without double quantization they are kept exact,
    in the weight's dtype, in that same tensor (a scale of one, a mean of zero), so the two modes share the format."""
    _, NF4Tensor, to_nf4, _ = _torchao()
    n_blocks = weight.numel() // NF4_BLOCK_SIZE
    # the scaler blocks must tile the scalers in a number of blocks that FSDP2 can split into equal parts (it splits
    # each of the tensor's parts): the largest size up to QLoRA's 256 that gives a multiple of SCALER_GROUPS_MULTIPLE
    # blocks (576 x 576 -> 216). It never depends on the device count, so a run quantizes its base the same way on
    # 1, 2, 4 or 8 devices and when it is loaded again for inference.
    scaler_block_size = max(
        d for d in range(1, NF4_SCALER_BLOCK_SIZE + 1) if n_blocks % (d * SCALER_GROUPS_MULTIPLE) == 0 or d == 1
    )
    if (n_blocks // scaler_block_size) % shards:
        raise UserError(f"cannot shard {name} in nf4 over {shards} devices: its {n_blocks // scaler_block_size} "
                        "groups of scales do not split evenly (1, 2, 4 or 8 devices do)")
    quantized = to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, scaler_block_size)
    if double_quantize:
        return quantized
    absmax = weight.detach().reshape(n_blocks, NF4_BLOCK_SIZE).abs().amax(dim=1)
    return NF4Tensor(
        quantized.__tensor_flatten__()[1]["tensor_meta"], NF4_BLOCK_SIZE, n_blocks, scaler_block_size,
        absmax, torch.ones(n_blocks // scaler_block_size, dtype=weight.dtype, device=weight.device),
        torch.zeros((), dtype=weight.dtype, device=weight.device), quantized.quantized_data, quantized.nf4,
    )


def quantize_weight(weight: torch.Tensor, mode: str, name: str = "weight", shards: int = 1) -> torch.Tensor:
    """One frozen weight in `mode` (a TRAINING_MODES or GENERATION_MODES key), as a non-trainable Parameter."""
    ao, _, _, Int4OpaqueTensor = _torchao()
    if weight.dim() != 2:
        raise UserError(f"cannot quantize {name}: a {weight.dim()}-d tensor, not a linear layer's weight")
    with torch.no_grad():
        weight = weight.detach()
        if mode in ("nf4", "nf4-dq"):
            if weight.numel() % NF4_BLOCK_SIZE:
                raise UserError(f"cannot quantize {name} to {mode}: {tuple(weight.shape)} is not a whole number of "
                                f"{NF4_BLOCK_SIZE}-weight blocks")
            if weight.size(0) % shards or weight.numel() % (NF4_BLOCK_SIZE * shards):
                raise UserError(f"cannot shard {name} {tuple(weight.shape)} in {mode} over {shards} devices: its "
                                f"rows and {NF4_BLOCK_SIZE}-weight blocks must split evenly")
            quantized = _nf4(weight, double_quantize=mode == "nf4-dq", shards=shards, name=name)
        elif mode == "int8":
            quantized = ao.Int8Tensor.from_hp(weight, ao.PerRow())
        elif mode == "int4":
            group = next((g for g in (128, 64, 32) if weight.size(1) % g == 0), None)
            if group is None or weight.size(0) % 16:  # what torch's CPU int4 packing takes
                raise UserError(f"cannot quantize {name} to int4: {tuple(weight.shape)} needs outputs in multiples "
                                "of 16 and inputs in multiples of 32")
            quantized = Int4OpaqueTensor.from_hp(weight, [1, group])
        else:
            raise UserError(f"unknown quantization {mode!r}: choose from {', '.join({**TRAINING_MODES, **GENERATION_MODES})}")
    return nn.Parameter(quantized, requires_grad=False)


def quantize_linears(
    model: nn.Module, names: list[str], mode: str, device: Optional[torch.device] = None, shards: int = 1
) -> None:
    """Quantize the weights of the linear layers `names` of `model` in place (see `quantize_frozen`)."""
    from lit_llama.adapter_v2 import AdapterV2Linear
    from lit_llama.lora import LoRALinear

    for name in names:  # one layer at a time: a bf16 weight is released as soon as its quantized form exists
        module = model.get_submodule(name)
        weight = module.weight if device is None else module.weight.to(device)
        quantized = quantize_weight(weight, mode, f"{name}.weight", shards)
        release_freed_heap()  # quantizing's temporaries: else the heap grows by ~1 GB over SmolLM2-135M's weights
        if isinstance(module, (LoRALinear, AdapterV2Linear)):  # their forward takes a quantized weight as it is
            module.weight = quantized
            continue
        with torch.device("meta"):  # the model's own layers become QuantizedLinear (same keys, quantized forward)
            layer = QuantizedLinear(module.in_features, module.out_features, bias=module.bias is not None)
        layer.weight, layer.bias = quantized, module.bias
        if device is not None and module.bias is not None:
            layer.bias = nn.Parameter(module.bias.to(device), requires_grad=module.bias.requires_grad)
        model.set_submodule(name, layer)


def release_freed_heap() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim; elsewhere nothing). torchao's
    quantization makes temporaries of several times each weight's size; glibc keeps the memory they freed, so
    after quantizing a model the process held 2.7 GB for a 0.6 GB model (SmolLM2-135M, BENCHMARKS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def block_linear_names(model: nn.Module) -> list[str]:
    """The linear layers inside the transformer blocks (attention and MLP projections): what QLoRA quantizes."""
    return [f"transformer.h.{name}" for name, module in model.transformer.h.named_modules()
            if isinstance(module, nn.Linear)]


def quantize_frozen(
    model: nn.Module, mode: str, device: Optional[torch.device] = None, shards: int = 1
) -> nn.Module:
    """Quantize, in place, every block linear layer's weight (the frozen base of LoRA, adapter and adapter-v2 runs):
    call after adding the method's layers and marking what trains, before building the optimizer. With `device`,
    each weight moves there just before it is quantized, so a model loaded on the CPU is never whole on the GPU.
    `shards`: the FSDP2 world size the model will be sharded over (NF4's parts must split evenly).
    Refuses weights that train (a full finetune): their quantized copies could not learn."""
    if mode not in TRAINING_MODES:
        raise UserError(f"unknown --quantize {mode!r}: choose from {', '.join(TRAINING_MODES)}")
    names = block_linear_names(model)
    training = [f"{name}.weight" for name in names if model.get_submodule(name).weight.requires_grad]
    if training:
        raise UserError(
            f"--quantize {mode} needs frozen base weights, but {training[0]} trains (a full finetune, or the base "
            "not frozen yet): quantize lora, adapter or adapter_v2 runs after marking their parameters trainable"
        )
    quantize_linears(model, names, mode, device, shards)
    return model


def unshardable_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Quantized weights that FSDP2 cannot shard (torchao's Int8Tensor has no split): pass them to fully_shard as
    `ignored_params`, so each device keeps a whole frozen copy (int8: half of bf16) while the rest is sharded.
    NF4 weights shard (`quantize_frozen(..., shards=world_size)`)."""
    if "torchao" not in sys.modules:
        return set()
    ao, _, _, _ = _torchao()
    return {p for p in model.parameters() if isinstance(p, ao.Int8Tensor)}


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Every quantized weight back to a plain tensor (in `dtype`, else the dtype it was quantized from), in place;
    QuantizedLinear layers become nn.Linear again."""
    for name in [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]:
        module = model.get_submodule(name)
        if not is_quantized(module.weight):
            continue
        weight = nn.Parameter(dequantize(module.weight, dtype), requires_grad=False)
        if type(module) is QuantizedLinear:
            with torch.device("meta"):
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = weight, module.bias
            model.set_submodule(name, plain)
        else:
            module.weight = weight
    return model


def merge_into_dequantized(model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """A QLoRA model as a plain `dtype` model, in place: each LoRA update added to its dequantized weight (the
    function that was trained, quantization error included), every other quantized weight dequantized."""
    from lit_llama.method import merge

    merge(model)
    dequantize_model(model, dtype)
    return model


def quantize_for_generation(model: nn.Module, mode: str) -> nn.Module:
    """Weight-only quantization of a plain model loaded from a bf16 (or fp32) checkpoint, in place: the block linear
    layers and an untied output head. A tied head is the embedding table and stays as it is: quantizing it to int8
    made greedy decoding of SmolLM2-135M leave bf16's tokens after 8 of 256, and the int8 kernel reads a tall
    matrix little faster than bf16 (BENCHMARKS.md). Int8 runs PyTorch's
    int8 weight kernel on a CPU; int4 torchao's CPU kernel (_weight_int4pack_mm_for_cpu), CPU only in torchao 0.18:
    its CUDA int4 layouts need the separate mslk package."""
    check_generation_mode(mode)
    names = block_linear_names(model)
    if getattr(model, "lm_head", None) is not None:
        names.append("lm_head")
    if mode == "int4" and any(p.device.type != "cpu" for p in model.parameters()):
        raise UserError("--quantize int4 runs on a CPU only (torchao's GPU int4 kernels need the mslk package): "
                        "use int8 on a GPU")
    with torch.no_grad():
        quantize_linears(model, names, mode, device=None)
    return model


def parameter_bytes(model: nn.Module) -> dict:
    """Bytes held by quantized weights and by everything else (embedding, head, norms, LoRA/adapter tensors)."""
    quantized = plain = 0
    for param in model.parameters():
        if is_quantized(param):
            inner, _ = param.__tensor_flatten__()
            quantized += sum(getattr(param, name).numel() * getattr(param, name).element_size() for name in inner)
        else:
            plain += param.numel() * param.element_size()
    return {"quantized": quantized, "unquantized": plain}


def unquantized_parameters(model: nn.Module) -> dict[str, int]:
    """Element counts of the parameters left unquantized, by name: what a quantized run still holds at full width."""
    return {name: p.numel() for name, p in model.named_parameters() if not is_quantized(p)}


def bits_per_weight(mode: str, rows: int = 4096, columns: int = 4096) -> float:
    """Storage per weight of a (rows x columns) matrix in `mode` (the model in benchmarks/memory_7b.py)."""
    n = rows * columns
    if mode == "nf4":
        return 4 + 16 / NF4_BLOCK_SIZE
    if mode == "nf4-dq":
        return 4 + 8 / NF4_BLOCK_SIZE + 16 / (NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE) + 16 / n
    if mode == "int8":
        return 8 + 32 / columns
    if mode == "int4":
        return 4 + 2 * 16 / 128
    raise ValueError(mode)

