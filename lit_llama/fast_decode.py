"""The CPU fast path of generation: one new token of one sequence through a frozen, plain model as straight-line
tensor code, the numbers of `LLaMA.forward` up to the summation order of one matrix-vector product.

    step = DecodeStep.for_model(model)  # after model.setup_kv_cache(batch_size=1, ...); None where it does not apply
    logits = step(token, position) if step else model(token, input_pos=position)

A decode step of one sequence reads every weight once to multiply it by one vector. On a CPU three things make that
faster: `torch.mv` (torch's matrix-vector kernel, faster there than the matrix-matrix kernel F.linear picks for one
row); each block's q, k, v weights (and gate, up) packed back to back in one block of memory, each weight a view of
its rows, so one product reads them instead of several small ones; and no per-layer module calls, attribute lookups
and batch and head bookkeeping between weight reads. `LLaMA.forward` knows nothing of this: generation builds the
step and calls it (lit_llama/generation.py).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_globals

from lit_llama.model import MLP, Block, CausalSelfAttention, LLaMA, RMSNorm, apply_rope, rms_norm


def pack_weights(layers: list[nn.Linear]) -> torch.Tensor:
    """The layers' weights as one (sum of out_features, in_features) matrix whose rows each weight is a view of.
    The first call moves the weights into one new block (no memory is added: weights memory-mapped from a checkpoint
    are copied out of the mapping, whose pages stay behind as reclaimable file cache); later calls find it in place.
    Only for frozen weights (`DecodeStep.for_model` checks): a weight an optimizer may hold keeps its storage."""
    block = packed_weight(layers)
    if block is None:
        with torch.inference_mode(False), torch.no_grad():  # a weight must not become an inference-only tensor
            block = torch.cat([layer.weight for layer in layers])
            for layer, rows in zip(layers, block.split([layer.out_features for layer in layers])):
                layer.weight.data = rows
        block = packed_weight(layers)
    return block


def packed_weight(layers: list[nn.Linear]) -> Optional[torch.Tensor]:
    """The layers' weights as one matrix if they lie back to back in one block, else None (as they do again once a
    weight is replaced: LoRA merged, the model cast to another dtype)."""
    first = layers[0].weight
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    for layer in layers:
        weight = layer.weight
        same_block = weight.untyped_storage().data_ptr() == storage and weight.data_ptr() == address
        if not same_block or not weight.is_contiguous() or weight.dtype != first.dtype:
            return None
        address += weight.numel() * weight.element_size()
    rows = sum(layer.out_features for layer in layers)
    return first.detach().as_strided((rows, first.size(1)), (first.size(1), 1))


class DecodeLayer(NamedTuple):
    """What a decode step reads of one block: its norm weights, packed and plain matrices and KV cache (and the
    q/k/v biases and q/k norm weights of models that have them)."""

    norm_1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    o_proj: torch.Tensor
    norm_2: torch.Tensor
    gate_up: torch.Tensor
    down_proj: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def is_plain_linear(layer, bias: bool = False) -> bool:
    return type(layer) is nn.Linear and (layer.bias is not None) == bias


def applies_to(model) -> bool:
    """Whether the step computes what `model(token, input_pos=position)` would: a plain LLaMA of plain layers (no
    LoRA, adapters or hooks, which the step would skip; not compiled or wrapped), no weight requiring gradients (so
    packing never moves a trainable weight), plain CPU tensors (not sharded), a KV cache for one sequence, and
    neither compiling nor autocast. Biases only where the config puts them (q, k, v: a merged adapter-v2 model has
    them everywhere and takes the module path); q/k norms and a sliding window the step computes too."""
    if type(model) is not LLaMA or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if any(param.requires_grad or type(param.data) is not torch.Tensor or param.device.type != "cpu"
           for param in model.parameters()):
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

    def __init__(self, model: LLaMA) -> None:
        config = model.config
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
                block.attn.o_proj.weight.detach(),
                block.norm_2.weight.detach(),
                pack_weights([block.mlp.gate_proj, block.mlp.up_proj]),
                block.mlp.down_proj.weight.detach(),
                block.attn.kv_cache.k,
                block.attn.kv_cache.v,
            )
            for block in model.transformer.h
        ]
        self.wte = model.transformer.wte.weight.detach()
        self.ln_f = model.transformer.ln_f.weight.detach()
        self.lm_head = self.wte if model.lm_head is None else model.lm_head.weight.detach()
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
            heads = torch.mv(layer.qkv, h) if layer.qkv_bias is None else torch.addmv(layer.qkv_bias, layer.qkv, h)
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
            x = x + torch.mv(layer.o_proj, y.view(-1))
            gate, up = torch.mv(layer.gate_up, rms_norm(x, layer.norm_2, self.eps)).chunk(2)
            x = x + torch.mv(layer.down_proj, F.silu(gate) * up)
        return torch.mv(self.lm_head, rms_norm(x, self.ln_f, self.eps)).view(1, 1, -1)
