"""The CPU fast path of generation: one new token of one sequence through a frozen, plain model as straight-line
tensor code, the numbers of `LLaMA.forward` up to the summation order of one matrix-vector product.

    step = DecodeStep.for_model(model)  # after model.setup_kv_cache(batch_size=1, ...); None where it does not apply
    logits = step(token, position) if step else model(token, input_pos=position)

A decode step of one sequence reads every weight once to multiply it by one vector. On a CPU three things make that
faster: the fastest matrix-vector kernel of the CPU, chosen by what the CPU can do (`mv_is_fastest`; BENCHMARKS.md,
"Matrix-vector kernels");
each block's q, k, v weights (and gate, up) packed back to back in one block of memory, each weight a view of its
rows, so one product reads them instead of several small ones; and no per-layer module calls, attribute lookups and
batch and head bookkeeping between weight reads. Int8 weight-only models (`quantize_for_generation(model, "int8")`)
take the same step with PyTorch's int8-weight kernel: half the bytes read per token.
`LLaMA.forward` knows nothing of this: generation builds the step and calls it (lit_llama/generation.py).
"""
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_globals

from lit_llama.model import MLP, Block, CausalSelfAttention, LLaMA, RMSNorm, apply_rope, rms_norm
from lit_llama.precision import cpu_has_amx, cpu_has_native_bf16
from lit_llama.quantize import QuantizedLinear, int8_kernel_applies, is_quantized


def pack_weights(layers: list[nn.Linear]) -> Union[torch.Tensor, "Int8Matrix"]:
    """The layers' weights as one (sum of out_features, in_features) matrix whose rows each weight is a view of (for
    int8 weights, their codes; the scales, a few bytes per row, are copied). The first call moves the weights into
    one new block (no memory is added: weights memory-mapped from a checkpoint are copied out of the mapping, whose
    pages stay behind as reclaimable file cache); later calls find it in place.
    Only for frozen weights (`DecodeStep.for_model` checks): a weight an optimizer may hold keeps its storage."""
    weights = [layer.weight for layer in layers]
    if not is_int8(weights[0]):
        return _pack_rows(weights, "data")
    return Int8Matrix(_pack_rows(weights, "qdata"), int8_scales(weights))


def _pack_rows(owners: list, attribute: str) -> torch.Tensor:
    """The `attribute` tensors of `owners` (a Parameter's data, an int8 weight's codes) moved back to back into one
    block, each becoming a view of its rows."""
    block = packed_rows([getattr(owner, attribute) for owner in owners])
    if block is None:
        with torch.inference_mode(False), torch.no_grad():  # a weight must not become an inference-only tensor
            tensors = [getattr(owner, attribute) for owner in owners]
            block = torch.cat(tensors)
            for owner, rows in zip(owners, block.split([tensor.size(0) for tensor in tensors])):
                setattr(owner, attribute, rows)
        block = packed_rows([getattr(owner, attribute) for owner in owners])
    return block


def packed_weight(layers: list[nn.Linear]) -> Optional[torch.Tensor]:
    """The layers' weights (or int8 codes) as one matrix if they lie back to back in one block, else None (as they
    do again once a weight is replaced: LoRA merged, the model cast to another dtype)."""
    weights = [layer.weight for layer in layers]
    return packed_rows([weight.qdata if is_int8(weight) else weight for weight in weights])


def packed_rows(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    first = tensors[0]
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    for tensor in tensors:
        same_block = tensor.untyped_storage().data_ptr() == storage and tensor.data_ptr() == address
        if not same_block or not tensor.is_contiguous() or tensor.dtype != first.dtype:
            return None
        address += tensor.numel() * tensor.element_size()
    rows = sum(tensor.size(0) for tensor in tensors)
    return first.detach().as_strided((rows, first.size(1)), (first.size(1), 1))


class Int8Matrix(NamedTuple):
    """An int8 weight-only matrix (`quantize_for_generation(model, "int8")`): codes and one scale per row."""

    codes: torch.Tensor
    scales: torch.Tensor


def int8_scales(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights' per-row scales as one vector in the dtype the kernel multiplies in (the weights' own)."""
    return torch.cat([weight.scale.reshape(-1) for weight in weights]).to(weights[0].dtype)


def is_int8(weight: torch.Tensor) -> bool:
    return is_quantized(weight) and int8_kernel_applies(weight)


def matrix(layer: nn.Linear) -> Union[torch.Tensor, Int8Matrix]:
    weight = layer.weight
    return Int8Matrix(weight.qdata, int8_scales([weight])) if is_int8(weight) else weight.detach()


def mv_is_fastest() -> bool:
    """Whether torch.mv is the fastest one-row bf16 product here, by what the CPU can do (the same answer on every
    run, so greedy text never depends on a timing; BENCHMARKS.md, "Matrix-vector kernels"): F.linear where bf16 is
    native without AMX (AVX512-BF16, e.g. AMD Zen 4: oneDNN's bf16 dot products, 1.2-1.5x torch.mv), torch.mv
    elsewhere: with AMX (Sapphire Rapids: 1.35x F.linear, whose tiles idle at one row) and where bf16 is not
    native (AVX2 only: F.linear has no fast bf16 kernel there)."""
    return cpu_has_amx() or not cpu_has_native_bf16()


def matvec(weight: Union[torch.Tensor, Int8Matrix], x: torch.Tensor, bias: Optional[torch.Tensor], mv: bool):
    """weight @ x (+ bias) for one vector x: torch.mv (`mv`) or F.linear on x as one row, or for int8 PyTorch's CPU
    kernel that multiplies by the int8 codes as they are (reading half the bytes of bf16)."""
    if type(weight) is Int8Matrix:
        y = torch._weight_int8pack_mm(x.unsqueeze(0), weight.codes, weight.scales).view(-1)
        return y if bias is None else y + bias
    if not mv:
        return F.linear(x.unsqueeze(0), weight, bias).view(-1)
    return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)


class DecodeLayer(NamedTuple):
    """What a decode step reads of one block: its norm weights, packed and plain matrices and KV cache (and the
    q/k/v biases and q/k norm weights of models that have them)."""

    norm_1: torch.Tensor
    qkv: Union[torch.Tensor, Int8Matrix]
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    o_proj: Union[torch.Tensor, Int8Matrix]
    norm_2: torch.Tensor
    gate_up: Union[torch.Tensor, Int8Matrix]
    down_proj: Union[torch.Tensor, Int8Matrix]
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def is_plain_linear(layer, bias: bool = False) -> bool:
    """An nn.Linear, or a linear layer whose weight is int8 weight-only (`quantize_for_generation`)."""
    plain = type(layer) is nn.Linear and not is_quantized(layer.weight)
    int8 = type(layer) is QuantizedLinear and is_int8(layer.weight) and layer.weight.device.type == "cpu"
    return (plain or int8) and (layer.bias is not None) == bias


def applies_to(model) -> bool:
    """Whether the step computes what `model(token, input_pos=position)` would: a plain LLaMA of plain (or int8
    weight-only) layers (no LoRA, adapters or hooks, which the step would skip; not compiled or wrapped), no weight
    requiring gradients (so packing never moves a trainable weight), plain CPU tensors (not sharded; int8 ones the
    kernel takes), a KV cache for one sequence, and neither compiling nor autocast. Biases only where the config
    puts them (q, k, v: a merged adapter-v2 model has them everywhere and takes the module path); q/k norms and a
    sliding window the step computes too."""
    if type(model) is not LLaMA or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if any(param.requires_grad or (type(param.data) is not torch.Tensor and not is_int8(param))
           or param.device.type != "cpu" for param in model.parameters()):
        return False
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    if any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()):
        return False
    if not (type(model.transformer.wte) is nn.Embedding and type(model.transformer.ln_f) is RMSNorm):
        return False
    if model.lm_head is not None and not is_plain_linear(model.lm_head):
        return False
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        if (type(block), type(attn), type(mlp)) != (Block, CausalSelfAttention, MLP):
            return False
        if not (type(block.norm_1) is RMSNorm and type(block.norm_2) is RMSNorm):
            return False
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        if not all(is_plain_linear(layer, bias=model.config.attention_bias) for layer in qkv):
            return False
        if not all(is_plain_linear(layer) for layer in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return False
        if model.config.qk_norm and not (type(attn.q_norm) is RMSNorm and type(attn.k_norm) is RMSNorm):
            return False
        if attn.kv_cache is None or attn.kv_cache.k.size(0) != 1:
            return False
    return True


class DecodeStep:
    """One new token of one sequence through the whole model, over tensors looked up once per generation. It holds
    the model's KV cache and weights as it found them: build it after `setup_kv_cache`, drop it with the cache."""

    def __init__(self, model: LLaMA, mv: Optional[bool] = None) -> None:
        """`mv`: multiply through torch.mv (True) or F.linear (False); by default the faster on this kind of CPU
        (`mv_is_fastest`)."""
        config = model.config
        self.mv = mv_is_fastest() if mv is None else mv
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        self.eps, self.window = config.norm_eps, config.sliding_window
        self.layers = [
            DecodeLayer(
                block.norm_1.weight.detach(),
                pack_weights([block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]),
                torch.cat([block.attn.q_proj.bias, block.attn.k_proj.bias, block.attn.v_proj.bias]).detach()
                if config.attention_bias else None,
                block.attn.q_norm.weight.detach() if config.qk_norm else None,
                block.attn.k_norm.weight.detach() if config.qk_norm else None,
                matrix(block.attn.o_proj),
                block.norm_2.weight.detach(),
                pack_weights([block.mlp.gate_proj, block.mlp.up_proj]),
                matrix(block.mlp.down_proj),
                block.attn.kv_cache.k,
                block.attn.kv_cache.v,
            )
            for block in model.transformer.h
        ]
        self.wte = model.transformer.wte.weight.detach()
        self.ln_f = model.transformer.ln_f.weight.detach()
        self.lm_head = self.wte if model.lm_head is None else matrix(model.lm_head)
        self.cos, self.sin = model.rope_tables(self.wte.device)

    @classmethod
    def for_model(cls, model) -> Optional["DecodeStep"]:
        """The step for `model`, or None where it does not apply (`applies_to`)."""
        return cls(model) if applies_to(model) else None

    def __call__(self, idx: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (1, 1, padded_vocab_size) for token idx (1, 1) at `position`, its key and value cached."""
        n_head, n_query_groups, hs = self.n_head, self.n_query_groups, self.head_size
        x = self.wte[int(idx)]
        cos, sin = self.cos[position].to(x.dtype), self.sin[position].to(x.dtype)
        first = 0 if self.window is None else max(0, position + 1 - self.window)  # the oldest key in the window
        for layer in self.layers:
            h = rms_norm(x, layer.norm_1, self.eps)
            heads = matvec(layer.qkv, h, layer.qkv_bias, self.mv)
            heads = heads.view(n_head + 2 * n_query_groups, hs)
            qk = heads[: n_head + n_query_groups]
            if layer.q_norm is not None:
                q, k = qk.split([n_head, n_query_groups])
                qk = torch.cat((rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)))
            qk = apply_rope(qk, cos, sin)  # q's and k's heads turned in one go
            layer.k_cache[0, :, position] = qk[n_head:]
            layer.v_cache[0, :, position] = heads[n_head + n_query_groups :]
            k, v = layer.k_cache[:, :, first : position + 1], layer.v_cache[:, :, first : position + 1]
            q = qk[:n_head].view(1, n_head, 1, hs)
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_query_groups != n_head)
            x = x + matvec(layer.o_proj, y.view(-1), None, self.mv)
            gate, up = matvec(layer.gate_up, rms_norm(x, layer.norm_2, self.eps), None, self.mv).chunk(2)
            x = x + matvec(layer.down_proj, F.silu(gate) * up, None, self.mv)
        return matvec(self.lm_head, rms_norm(x, self.ln_f, self.eps), None, self.mv).view(1, 1, -1)
