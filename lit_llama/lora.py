"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): freeze a linear layer's weight W and learn a low-rank
update, y = W x + (B A x) * alpha / r, with A (r x in) random and B (out x r) zero so training starts at the base model.

    add_lora(model, r=8, alpha=16, dropout=0.05, targets=["query", "value"])
    mark_only_lora_as_trainable(model)
    ...train...
    merge_lora(model)  # fold B A into W: a plain model again, as fast as the base

`LoRALinear` subclasses `nn.Linear`, so the frozen weight keeps its name (`...q_proj.weight`) and a base checkpoint
loads into a LoRA model unchanged; the new tensors are `...q_proj.lora_A` and `...q_proj.lora_B`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import UserError
from lit_llama.model import LLaMA, Linear, linear
from lit_llama.quantize import dequantize, is_quantized, quantized_linear

# --lora_<flag> names -> the module paths they adapt (suffixes of the names in `model.named_modules()`)
LORA_TARGETS = {
    "query": ("attn.q_proj",),
    "key": ("attn.k_proj",),
    "value": ("attn.v_proj",),
    "projection": ("attn.o_proj",),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "head": ("lm_head",),
}


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
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """(Re)create A and B beside the weight (this materialises them in a model built on the meta device):
        A as nn.Linear initialises its weight (the LoRA paper's choice), B zero so B A starts as nothing."""
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a QLoRA base weight (lit_llama.quantize) is dequantized inside its own product
        y = (quantized_linear if is_quantized(self.weight) else linear)(x, self.weight, self.bias)
        scaling = self.scaling
        if self.dropout > 0 and self.training:
            # dropout in one pass: x (maybe bf16) times a 0/1 mask in A's dtype (maybe fp32) is cast and dropped at
            # once, and dropout's 1 / (1 - p) joins the scaling on the r-wide product (~30% off this branch's time)
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling}, dropout={self.dropout}"


def lora_config(r: int = 8, alpha: float = 16, dropout: float = 0.05, targets=("query", "value")) -> dict:
    """The record of a LoRA setup that finetune_config.json keeps (and `add_lora(model, **record)` accepts)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise UserError(f"unknown LoRA target(s) {', '.join(unknown)}: choose from {', '.join(LORA_TARGETS)}")
    if not targets:
        raise UserError("LoRA needs at least one target layer (e.g. query and value)")
    if r < 1:
        raise UserError(f"LoRA rank r must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def add_lora(model: LLaMA, r: int, alpha: float, dropout: float, targets) -> LLaMA:
    """Replace the targeted linear layers by `LoRALinear` in place, keeping their weights (real or meta).

    On a meta-device model the LoRA tensors stay on meta: load the base weights, then call `init_lora_weights`.
    """
    config = lora_config(r, alpha, dropout, targets)
    if "head" in config["targets"] and model.lm_head is None:
        raise UserError(
            f"LoRA target 'head' is impossible for {model.config.name or 'this model'}: its output head is the "
            "tied embedding matrix (tie_embeddings), so there is no lm_head layer to adapt"
        )
    suffixes = tuple(s for t in config["targets"] for s in LORA_TARGETS[t])
    for name, module in list(model.named_modules()):
        if not any(name == s or name.endswith("." + s) for s in suffixes) or isinstance(module, LoRALinear):
            continue
        # built on meta (no wasted init of a weight about to be replaced), then given the existing weight
        with torch.device("meta"):
            lora = LoRALinear(module.in_features, module.out_features, r, alpha, dropout, bias=module.bias is not None)
        lora.weight, lora.bias = module.weight, module.bias
        if not module.weight.is_meta:
            lora.reset_lora_parameters()
        model.set_submodule(name, lora)
    return model


def init_lora_weights(model: nn.Module) -> None:
    """Fresh A and B for every LoRA layer, on its weight's device and dtype (after loading base weights)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora_parameters()


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(("lora_A", "lora_B"))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and put back a plain `Linear`, in place: the result has exactly
    the base model's modules and state-dict keys, and runs at the base model's speed and memory."""
    # names, not modules: holding every replaced layer until the end would keep all the old weights alive too
    for name in [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]:
        module = model.get_submodule(name)
        with torch.device("meta"):
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight = nn.Parameter(module.merged_weight(), requires_grad=module.weight.requires_grad)
        plain.bias = module.bias
        model.set_submodule(name, plain)
    return model
