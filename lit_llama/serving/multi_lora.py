"""Many LoRA adapters over one base model, each row of a batch with its own: the layer the server swaps in.

    routing = add_adapters(model, base_path, tokenizer, {"support": Path(".../lit-llama-lora-finetuned.pth"), ...})
    routing.rows = torch.tensor([0, 2, 1])  # row 0 the base, row 1 adapter 2, row 2 adapter 1
    logits = ...forward through the model...

`MultiLoRALinear` keeps the base layer's weight and, stacked, the A and B matrices of every adapter that targets it
(index 0 is the base: zeros; ranks below the largest are zero-padded, which adds exact zeros). Row i of a batch
computes y_i = W x_i + B_{k_i} (A_{k_i} x_i) with k_i = routing.rows[i] and the adapter's alpha / r folded into its
B: one matrix product through the shared weight for the whole batch, then two small batched products of rank r.
Nothing is merged into W, so requests for different adapters share every step.
"""
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.errors import UserError
from lit_llama.files import load_torch
from lit_llama.finetuned import check_fits, check_same_base, check_trained_tokenizer, read_finetune_config
from lit_llama.lora import LORA, add_lora
from lit_llama.model import LLaMA, Config


class AdapterRouting:
    """Which adapter each row of the next forward uses (None: every row the base). Shared by all the layers."""

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: AdapterRouting) -> None:
        """lora_A: (adapters + 1, r, in_features), lora_B: (adapters + 1, out_features, r), already scaled."""
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, in_features)."""
        y = F.linear(x, self.weight, self.bias)
        rows = self.routing.rows
        if rows is None:
            return y
        down = torch.bmm(x, self.lora_A[rows].transpose(1, 2))  # (B, T, r)
        return y + torch.bmm(down, self.lora_B[rows].transpose(1, 2))


def read_adapter(path: Path, base: Config, base_path: Path, tokenizer) -> tuple[dict, dict]:
    """A LoRA finetune's record and its (layer name -> (A, B * alpha / r)), checked against the base."""
    record = read_finetune_config(path)
    if record["method"] != LORA.name:
        raise UserError(f"{path} holds {record['method']} weights: only LoRA adapters can be served beside the base")
    check_same_base(Config.from_dict(record["model_config"]), base, path, base_path)
    check_trained_tokenizer(record.get("tokenizer"), tokenizer, path)
    options = LORA.options_from_record(record)
    weights = load_torch(path)
    with torch.device("meta"):
        expected = add_lora(LLaMA(base), options)
    check_fits(expected, weights, path, base_path)
    scaling = options.alpha / options.r
    layers = {}
    for key in weights:
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            layers[name] = (weights[key].float(), weights[name + ".lora_B"].float() * scaling)
    return record, layers


def add_adapters(model: LLaMA, base_path: Path, tokenizer, adapters: dict[str, Path]) -> tuple[AdapterRouting, dict]:
    """Swap every layer some adapter targets for a `MultiLoRALinear`; adapter k (from 1, in `adapters`' order) is
    routing index k. Returns the routing and each adapter's finetune record."""
    routing = AdapterRouting()
    records, per_adapter = {}, []
    for name, path in adapters.items():
        records[name], layers = read_adapter(Path(path), model.config, base_path, tokenizer)
        per_adapter.append(layers)
    targeted = sorted({layer for layers in per_adapter for layer in layers})
    for layer_name in targeted:
        base = model.get_submodule(layer_name)
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        rank = max(layers[layer_name][0].size(0) for layers in per_adapter if layer_name in layers)
        stacked_A = torch.zeros(len(per_adapter) + 1, rank, base.in_features, **like)
        stacked_B = torch.zeros(len(per_adapter) + 1, base.out_features, rank, **like)
        for index, layers in enumerate(per_adapter, start=1):
            if layer_name in layers:
                A, B = layers[layer_name]
                stacked_A[index, : A.size(0)] = A.to(**like)
                stacked_B[index, :, : B.size(1)] = B.to(**like)
        model.set_submodule(layer_name, MultiLoRALinear(base, stacked_A, stacked_B, routing))
    return routing, records
