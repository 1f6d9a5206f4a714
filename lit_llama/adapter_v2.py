"""LLaMA-Adapter V2 (Gao et al. 2023, https://arxiv.org/abs/2304.15010) for text: the v1 adapter prompts plus
"bias tuning": every linear layer learns a per-output scale s and bias b, y = s * (W x + b), starting at s = 1,
b = 0; the RMSNorm weights are trained too.

    add_adapter_v2(model, prompt_length=10, start_layer=2)
    mark_only_adapter_v2_as_trainable(model)

A tied output head (tie_embeddings) is the embedding matrix, not a linear layer, so it gets no scale and bias.
"""
import torch
import torch.nn as nn

from lit_llama.adapter import add_adapter, init_adapter_weights, is_adapter_parameter
from lit_llama.model import LLaMA, Linear, RMSNorm, linear
from lit_llama.quantize import dequantize, is_quantized, quantized_linear


class AdapterV2Linear(nn.Linear):
    """nn.Linear with a learned per-output scale and bias; the frozen weight keeps its name (`...q_proj.weight`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.adapter_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def reset_adapter_parameters(self) -> None:
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, **like))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.adapter_bias if self.bias is None else self.bias + self.adapter_bias
        # the bias rides in the matmul kernel; scale and bias may train in fp32 beside a bf16 weight
        y = (quantized_linear if is_quantized(self.weight) else linear)(x, self.weight, bias.to(self.weight.dtype))
        return y * self.adapter_scale.to(y.dtype)

    def merged(self) -> Linear:
        """The same function as a plain Linear with bias: rows of W scaled by s, bias s * b (computed in fp32)."""
        with torch.device("meta"):
            plain = Linear(self.in_features, self.out_features, bias=True)
        scale = self.adapter_scale.float()
        bias = self.adapter_bias.float() + (0 if self.bias is None else self.bias.float())
        with torch.no_grad():
            weight = dequantize(self.weight, torch.float32)  # a quantized (QLoRA-style) base: its dequantized values
            plain.weight = nn.Parameter((weight * scale[:, None]).to(self.weight.dtype))
            plain.bias = nn.Parameter((bias * scale).to(self.weight.dtype))
        return plain


def add_adapter_v2(model: LLaMA, prompt_length: int = 10, start_layer: int = 2) -> LLaMA:
    """The v1 adapter prompts, then every plain Linear made an `AdapterV2Linear`, in place. On a meta-device model
    the new tensors stay on meta: load the base weights, then `init_adapter_v2_weights`."""
    add_adapter(model, prompt_length, start_layer)
    for name, module in list(model.named_modules()):
        if type(module) is not Linear:
            continue
        with torch.device("meta"):
            adapted = AdapterV2Linear(module.in_features, module.out_features, bias=module.bias is not None)
        adapted.weight, adapted.bias = module.weight, module.bias
        if not module.weight.is_meta:
            adapted.reset_adapter_parameters()
        model.set_submodule(name, adapted)
    return model


def init_adapter_v2_weights(model: nn.Module) -> None:
    init_adapter_weights(model)
    for module in model.modules():
        if isinstance(module, AdapterV2Linear):
            module.reset_adapter_parameters()


def mark_only_adapter_v2_as_trainable(model: nn.Module) -> None:
    norm_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_parameter(name) or name.endswith(("adapter_scale", "adapter_bias")) or (
            name in norm_weights
        )


def merge_adapter_v2_linears(model: nn.Module) -> nn.Module:
    """For inference: fold each scale and bias into its layer (one matmul with bias, no extra elementwise pass)."""
    for name in [name for name, module in model.named_modules() if isinstance(module, AdapterV2Linear)]:
        model.set_submodule(name, model.get_submodule(name).merged())  # one old layer alive at a time
    return model
