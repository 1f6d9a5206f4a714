"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): freeze a linear layer's weight W and learn a low-rank
update, y = W x + (B A x) * alpha / r, with A (r x in) random and B (out x r) zero so training starts at the base model.

    add_lora(model, LoRAArgs(r=8, alpha=16, dropout=0.05, targets=["query", "value"]))
    LORA.mark_trainable(model)
    ...train...
    merge(model)  # lit_llama.method.merge: fold B A into W, a plain model again, as fast as the base

`LoRALinear` subclasses `nn.Linear`, so the frozen weight keeps its name (`...q_proj.weight`) and a base checkpoint
loads into a LoRA model unchanged; the new tensors are `...q_proj.lora_A` and `...q_proj.lora_B`.
"""
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import UserError
from lit_llama.method import Method, replace_module
from lit_llama.quantize import dequantize, is_quantized, quantized_linear

# --lora.targets names -> the module paths they adapt (suffixes of the names in `model.named_modules()`)
LORA_TARGETS = {
    "query": ("attn.q_proj",),
    "key": ("attn.k_proj",),
    "value": ("attn.v_proj",),
    "projection": ("attn.o_proj",),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "head": ("lm_head",),
}


@dataclass
class LoRAArgs:
    """LoRA settings (kept in finetune_config.json as they are here).

    Args:
        r: Rank of the update.
        alpha: Scaling numerator: the update is scaled by alpha / r.
        dropout: Dropout on the LoRA branch's input.
        targets: The layers to adapt: query, key, value, projection (attention output), mlp (its three
            projections), head (not for models with tied embeddings).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise UserError(f"unknown LoRA target(s) {', '.join(unknown)}: choose from {', '.join(LORA_TARGETS)}")
        if not self.targets:
            raise UserError("LoRA needs at least one target layer (e.g. query and value)")
        if self.r < 1:
            raise UserError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha):
            raise UserError(f"LoRA alpha must be a finite number, got {self.alpha}")


class LoRALinear(nn.Linear):
    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0, bias: bool = False,
        device=None, dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.scaling = alpha / r
        self.dropout = dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        if not self.lora_A.is_meta:
            self.reset_method_parameters()

    def reset_method_parameters(self) -> None:
        """(Re)create A and B beside the weight (this materialises them in a model built on the meta device):
        A as nn.Linear initialises its weight (the LoRA paper's choice), B zero so B A starts as nothing."""
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a QLoRA base weight (lit_llama.quantize) is dequantized inside its own product
        y = (quantized_linear if is_quantized(self.weight) else F.linear)(x, self.weight, self.bias)
        scaling = self.scaling
        if self.dropout > 0 and self.training:
            # dropout in one pass: x (maybe bf16) times a 0/1 mask in A's dtype (maybe fp32) is cast and dropped at
            # once, and dropout's 1 / (1 - p) joins the scaling on the r-wide product
            keep = torch.rand(x.shape, device=x.device, dtype=self.lora_A.dtype).ge_(self.dropout)
            x = x * keep
            scaling = scaling / (1 - self.dropout)
        else:
            x = x.to(self.lora_A.dtype)  # the frozen weight may be bf16 while A and B train in fp32
        # (x A^T) is only r wide: scaling it there is cheaper than scaling the out-wide result, and W + B A is never
        # formed, so training memory grows by r * (in + out) per layer rather than by a second weight matrix
        return y + F.linear(F.linear(x, self.lora_A) * scaling, self.lora_B).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + B A * scaling, computed in fp32 so a bf16 weight is rounded once, not twice (a quantized W: its
        dequantized values, the weight the update was trained against, in the dtype it was quantized from)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (dequantize(self.weight, torch.float32) + delta).to(self.weight.dtype)

    def merged(self) -> nn.Linear:
        """The plain layer with the update folded into its weight: the base model's module and state-dict key."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling}, dropout={self.dropout}"


def add_lora(model: nn.Module, options: LoRAArgs) -> nn.Module:
    """Replace the targeted linear layers by `LoRALinear` in place, keeping their weights (real or meta).

    On a meta-device model the LoRA tensors stay on meta: load the base weights, then `reset_method_parameters`.
    """
    if "head" in options.targets and model.lm_head is None:
        raise UserError(
            f"LoRA target 'head' is impossible for {model.config.name or 'this model'}: its output head is the "
            "tied embedding matrix (tie_embeddings), so there is no lm_head layer to adapt"
        )
    suffixes = tuple(s for t in options.targets for s in LORA_TARGETS[t])
    for name, module in list(model.named_modules()):
        if not any(name == s or name.endswith("." + s) for s in suffixes) or isinstance(module, LoRALinear):
            continue
        replace_module(
            model, name, keep=("weight", "bias"),
            build=lambda: LoRALinear(module.in_features, module.out_features, options.r, options.alpha,
                                     options.dropout, bias=module.bias is not None),
        )
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            yield from (module.lora_A, module.lora_B)


LORA = Method(
    name="lora", options=LoRAArgs, record_key="lora", apply=add_lora, trainable_parameters=lora_parameters,
    weights_name="lit-llama-lora-finetuned.pth",
)
