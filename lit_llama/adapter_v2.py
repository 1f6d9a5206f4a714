"""LLaMA-Adapter V2 (Gao et al. 2023, https://arxiv.org/abs/2304.15010) for text: the v1 adapter prompts plus
"bias tuning": every linear layer learns a per-output scale s and bias b, y = s * (W x + b), starting at s = 1,
b = 0; the RMSNorm weights are trained too.

    add_adapter_v2(model, AdapterArgs(prompt_length=10, start_layer=2))
    ADAPTER_V2.mark_trainable(model)

A tied output head (tie_embeddings) is the embedding matrix, not a linear layer, so it gets no scale and bias.
"""
from itertools import chain
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.adapter import AdapterArgs, add_adapter, prompt_parameters
from lit_llama.method import Method, replace_module
from lit_llama.model import LLaMA, RMSNorm
from lit_llama.quantize import dequantize, is_quantized, quantized_linear


class AdapterV2Linear(nn.Linear):
    """nn.Linear with a learned per-output scale and bias; the frozen weight keeps its name (`...q_proj.weight`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.adapter_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def reset_method_parameters(self) -> None:
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, **like))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.adapter_bias if self.bias is None else self.bias + self.adapter_bias
        # the bias rides in the matmul kernel; scale and bias may train in fp32 beside a bf16 weight
        y = (quantized_linear if is_quantized(self.weight) else F.linear)(x, self.weight, bias.to(self.weight.dtype))
        return y * self.adapter_scale.to(y.dtype)

    def merged(self) -> nn.Linear:
        """The same function as a plain Linear with bias: rows of W scaled by s, bias s * b (computed in fp32)."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=True)
        scale = self.adapter_scale.float()
        bias = self.adapter_bias.float() + (0 if self.bias is None else self.bias.float())
        with torch.no_grad():
            weight = dequantize(self.weight, torch.float32)  # a quantized (QLoRA-style) base: its dequantized values
            plain.weight = nn.Parameter((weight * scale[:, None]).to(self.weight.dtype))
            plain.bias = nn.Parameter((bias * scale).to(self.weight.dtype))
        return plain


def add_adapter_v2(model: LLaMA, options: AdapterArgs) -> LLaMA:
    """The v1 adapter prompts, then every plain Linear made an `AdapterV2Linear`, in place. On a meta-device model
    the new tensors stay on meta: load the base weights, then `reset_method_parameters`."""
    add_adapter(model, options)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            replace_module(
                model, name, keep=("weight", "bias"),
                build=lambda: AdapterV2Linear(module.in_features, module.out_features, bias=module.bias is not None),
            )
    return model


def adapter_v2_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The prompts and gates, every linear layer's scale and bias, and the RMSNorm weights."""
    scales_and_biases = (
        (module.adapter_scale, module.adapter_bias) for module in model.modules() if isinstance(module, AdapterV2Linear)
    )
    norms = (module.weight for module in model.modules() if isinstance(module, RMSNorm))
    return chain(prompt_parameters(model), chain.from_iterable(scales_and_biases), norms)


ADAPTER_V2 = Method(
    name="adapter_v2", options=AdapterArgs, record_key="adapter", apply=add_adapter_v2,
    trainable_parameters=adapter_v2_parameters, weights_name="lit-llama-adapter-v2-finetuned.pth",
)
