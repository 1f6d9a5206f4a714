"""LLaMA-Adapter (Zhang et al. 2023, https://arxiv.org/abs/2303.16199): a frozen model learns, in each of its top
layers, a short prompt of `prompt_length` vectors that every token attends to, through a gate that starts at zero.

    add_adapter(model, AdapterArgs(prompt_length=10, start_layer=2))
    ADAPTER.mark_trainable(model)

In layer l >= start_layer, the prompt P (prompt_length x n_embd) goes through that layer's own k_proj and v_proj
(no RoPE: the prompt has no position) and each query attends to it without a causal mask; that attention's output,
times a per-head gate g, is added to the ordinary attention output before o_proj:

    y = attention(q, k, v) + g * softmax(q P_k^T / sqrt(hs)) P_v

This is the paper's zero-init attention (the two softmaxes are separate, the prompt's is gated by g, which starts
at zero so finetuning starts exactly at the base model). g multiplies directly, as in the paper's equation and
lit-llama; the authors' released code passes it through tanh first, which only differs once |g| grows.
"""
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import UserError
from lit_llama.method import Method, replace_module
from lit_llama.model import CausalSelfAttention, Config, LLaMA


@dataclass
class AdapterArgs:
    """LLaMA-Adapter settings (v1 and v2; kept in finetune_config.json as they are here).

    Args:
        prompt_length: Learned prompt vectors per adapted layer.
        start_layer: The first layer that gets an adapter (earlier layers stay unchanged).
    """

    prompt_length: int = 10
    start_layer: int = 2

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise UserError(f"adapter prompt_length must be at least 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise UserError(f"adapter start_layer must be 0 or more, got {self.start_layer}")


class AdapterAttention(CausalSelfAttention):
    def __init__(self, config: Config, prompt_length: int) -> None:
        super().__init__(config)
        self.adapter_wte = nn.Embedding(prompt_length, config.n_embd)
        self.adapter_gate = nn.Parameter(torch.zeros(config.n_head))

    def reset_method_parameters(self) -> None:
        """(Re)create the prompt and gate beside the layer's weights (materialising them after a meta-device build):
        the prompt N(0, 1) like an nn.Embedding (as the authors' and PEFT's code), the gate zero."""
        like = dict(device=self.q_proj.weight.device, dtype=self.q_proj.weight.dtype)
        self.adapter_wte = nn.Embedding(self.adapter_wte.num_embeddings, self.config.n_embd, **like)
        self.adapter_gate = nn.Parameter(torch.zeros(self.config.n_head, **like))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos=None) -> torch.Tensor:
        q, k, v = self.project_qkv(x, cos, sin)
        y = self.attend(q, k, v, input_pos) + self.attend_to_prompt(q)
        return self.o_proj(y)

    def attend_to_prompt(self, q: torch.Tensor) -> torch.Tensor:
        """Gated attention of queries (B, n_head, T, hs) to the prompt: (B, T, C). The prompt's keys and values are
        recomputed on every call (prompt_length rows: cheap) and never enter the KV cache."""
        B, _, T, hs = q.shape
        prompt = self.adapter_wte.weight.to(self.k_proj.weight.dtype)  # the prompt may train in fp32, k_proj bf16
        k = self.k_proj(prompt).view(1, -1, self.config.n_query_groups, hs)
        if self.config.qk_norm:  # the prompt's keys are keys like any other: normalised, but never turned by RoPE
            k = self.k_norm(k)
        k = k.transpose(1, 2).expand(B, -1, -1, -1)
        v = self.v_proj(prompt).view(1, -1, self.config.n_query_groups, hs).transpose(1, 2).expand(B, -1, -1, -1)
        gqa = self.config.n_query_groups != self.config.n_head
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), enable_gqa=gqa)
        y = y * self.adapter_gate.to(y.dtype).view(1, -1, 1, 1)
        return y.transpose(1, 2).reshape(B, T, -1)


def add_adapter(model: LLaMA, options: AdapterArgs) -> LLaMA:
    """Give layers start_layer.. an adapter prompt, in place, keeping their weights (real or meta).

    On a meta-device model the prompt and gate stay on meta: load the base weights, then `reset_method_parameters`.
    """
    if options.start_layer >= model.config.n_layer:
        raise UserError(
            f"adapter start_layer {options.start_layer} leaves no layer to adapt: the model has {model.config.n_layer}"
        )
    for index in range(options.start_layer, model.config.n_layer):
        if not isinstance(model.transformer.h[index].attn, AdapterAttention):
            norms = ("q_norm", "k_norm") if model.config.qk_norm else ()
            replace_module(
                model, f"transformer.h.{index}.attn", keep=("q_proj", "k_proj", "v_proj", "o_proj", "kv_cache", *norms),
                build=lambda: AdapterAttention(model.config, options.prompt_length),
            )
    return model


def prompt_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for module in model.modules():
        if isinstance(module, AdapterAttention):
            yield from (module.adapter_wte.weight, module.adapter_gate)


ADAPTER = Method(
    name="adapter", options=AdapterArgs, record_key="adapter", apply=add_adapter,
    trainable_parameters=prompt_parameters, weights_name="lit-llama-adapter-finetuned.pth",
)
