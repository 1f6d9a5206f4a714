"""Finetuned weights and what they need to be used again.

Finetuning saves only what it trained (LoRA's A and B, an adapter's prompts and gates, or for full finetuning the
whole state dict) and, beside it, `finetune_config.json`: the method and its settings, the base model's config and
checkpoint, the prompt style and the tokenizer's identity. `load_finetuned` rebuilds the exact model from that record:

    model, tokenizer, record = load_finetuned("out/lora/alpaca/lit-llama-lora-finetuned.pth")
"""
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from lit_llama.adapter import ADAPTER
from lit_llama.adapter_v2 import ADAPTER_V2
from lit_llama.checkpoint import check_state_dict, checkpoint_dir, load_config, load_weights, weights_path
from lit_llama.errors import UserError
from lit_llama.files import load_torch
from lit_llama.lora import LORA
from lit_llama.method import FULL, Method, merge
from lit_llama.model import LLaMA, Config
from lit_llama.quantize import merge_into_dequantized, quantize_frozen
from lit_llama.tokenizer import Tokenizer

FINETUNE_CONFIG_NAME = "finetune_config.json"
METHODS: dict[str, Method] = {method.name: method for method in (LORA, ADAPTER, ADAPTER_V2, FULL)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown finetuning method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def finetune_config(
    method: Method,
    options,
    model_config: Union[Config, dict],
    prompt_style: str,
    tokenizer_identity: dict,
    base_checkpoint: Optional[Union[str, Path]] = None,
) -> dict:
    """The record to save as finetune_config.json beside the finetuned weights; `options` is the method's settings
    dataclass (LoRAArgs, AdapterArgs; None for full finetuning)."""
    return {
        "method": method.name,
        "model_config": model_config.to_dict() if isinstance(model_config, Config) else dict(model_config),
        "base_checkpoint": None if base_checkpoint is None else str(base_checkpoint),
        "prompt_style": prompt_style,
        "tokenizer": tokenizer_identity,
        **method.record(options),
    }


def base_fingerprint(state_dict: dict) -> str:
    """sha256 of a cheap, fixed sample of a base model's weights (a few embedding rows, the final norm and a few rows
    of the last block's down projection), rounded to bf16 so a bf16 copy of the same base matches: it tells apart two
    bases of the same shapes, which the shapes alone cannot."""
    if not isinstance(state_dict, dict):
        return ""
    last = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h.")), default=-1)
    digest = hashlib.sha256()
    for key, rows in (("transformer.wte.weight", 4), ("transformer.ln_f.weight", None),
                      (f"transformer.h.{last - 1}.mlp.down_proj.weight", 4)):
        tensor = state_dict.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            sample = tensor[:rows] if rows else tensor
            digest.update(key.encode() + sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_fingerprint(record: dict, base_state: dict, finetuned_path: Path, base_path: Path) -> None:
    recorded = record.get("base_fingerprint")
    if recorded and recorded != base_fingerprint(base_state):
        print(f"warning: {base_path} is not the base {finetuned_path} was finetuned from (same shapes, other "
              f"weights: fingerprint {base_fingerprint(base_state)} vs {recorded}); its output will be wrong",
              file=sys.stderr)


def apply_method(model: LLaMA, record: dict) -> LLaMA:
    """Modify `model` in place as `record` (a finetune_config) says: add LoRA layers or adapters; full: nothing."""
    method = METHODS[record["method"]]
    method.apply(model, method.options_from_record(record))
    return model


def read_finetune_config(finetuned_path: Union[str, Path]) -> dict:
    if not Path(finetuned_path).is_file():
        raise UserError(f"finetuned weights not found: {finetuned_path}")
    path = Path(finetuned_path).parent / FINETUNE_CONFIG_NAME
    if not path.is_file():
        raise UserError(f"no {FINETUNE_CONFIG_NAME} beside {finetuned_path}: it records how the weights were trained")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not an object")
        if record["method"] not in METHODS:
            raise ValueError(f"unknown method {record['method']!r}")
        Config.from_dict(record["model_config"])
        METHODS[record["method"]].options_from_record(record)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError,
            UserError) as error:
        raise UserError(f"{path} is not a valid finetune config: {type(error).__name__}: {error}") from None
    return record


def check_same_base(config: Config, base: Config, finetuned_path: Path, base_path: Path) -> None:
    trained, given = config.to_dict(), base.to_dict()
    differences = [f"{k} {trained[k]} vs {given[k]}" for k in trained if k != "name" and trained[k] != given[k]]
    if differences:
        raise UserError(
            f"{finetuned_path} was finetuned from a different base model than {base_path} "
            f"({', '.join(differences[:4])}): pass the base it was trained on with --checkpoint_path"
        )


def check_trained_tokenizer(recorded: Optional[dict], tokenizer: Tokenizer, finetuned_path: Path) -> None:
    """The tokenizer must be the one finetuning used: another vocabulary is refused; the same vocabulary in a file
    that differs (re-saved, other formatting) only gets a warning."""
    if not recorded:
        return
    current = tokenizer.identity
    for key in ("backend", "vocab_size"):
        if key in recorded and recorded[key] != current[key]:
            raise UserError(
                f"{finetuned_path} was trained with a different tokenizer ({key} {recorded[key]} vs "
                f"{current[key]} in {tokenizer.path})"
            )
    if recorded.get("sha256") not in (None, current["sha256"]):
        print(f"warning: {tokenizer.path} differs from the tokenizer file used in finetuning", file=sys.stderr)


def check_fits(model: nn.Module, finetuned: dict, finetuned_path: Path, base_path: Path) -> None:
    """The finetuned tensors must be exactly the ones the method adds (plus any base tensors it trains, as
    adapter v2's norms), with matching shapes; otherwise they belong to another base or another setup."""
    expected = model.state_dict()
    with torch.device("meta"):
        base_keys = set(LLaMA(model.config).state_dict())
    added = [k for k in expected if k not in base_keys]
    missing = [k for k in added if k not in finetuned]
    unexpected = [k for k in finetuned if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{finetuned_path} does not fit {base_path} with its finetune_config.json: "
            f"missing {missing[:2]}, unexpected {unexpected[:2]}"
        )
    for key, tensor in finetuned.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{finetuned_path} does not fit base {base_path}: {key} has shape {tuple(tensor.shape)}, "
                f"the base needs {tuple(expected[key].shape)} (was it trained on a different base model?)"
            )


def finetune_base(
    finetuned_path: Path, record: dict, checkpoint_path: Optional[Union[str, Path]]
) -> tuple[Path, Config]:
    """The base weights file of a finetune (`checkpoint_path`, default: the one recorded at finetuning time) and the
    model config it was finetuned with, checked to be that base's."""
    checkpoint_path = checkpoint_path or record.get("base_checkpoint")
    if checkpoint_path is None:
        raise UserError(
            f"{FINETUNE_CONFIG_NAME} beside {finetuned_path} names no base checkpoint: pass --checkpoint_path"
        )
    base_path = weights_path(checkpoint_path)
    config = Config.from_dict(record["model_config"])
    check_same_base(config, load_config(base_path), finetuned_path, base_path)
    return base_path, config


def load_finetuned(
    finetuned_path: Union[str, Path],
    checkpoint_path: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    method: Optional[str] = None,
):
    """The finetuned model ready for inference (method layers merged into plain ones where they can be, frozen, eval
    mode), its tokenizer and its finetune config. `checkpoint_path`: the base checkpoint (default: the one recorded
    at finetuning time). `method`: refuse weights finetuned with another method."""
    finetuned_path = Path(finetuned_path)
    record = read_finetune_config(finetuned_path)
    if method is not None and record["method"] != method:
        raise UserError(f"{finetuned_path} holds {record['method']} weights, not {method}")
    base_path, config = finetune_base(finetuned_path, record, checkpoint_path)
    tokenizer = Tokenizer(checkpoint_dir(base_path))
    check_trained_tokenizer(record.get("tokenizer"), tokenizer, finetuned_path)

    finetuned = load_torch(finetuned_path)
    check_state_dict(finetuned, finetuned_path)
    with torch.device("meta"):
        model = apply_method(LLaMA(config), record)
    if METHODS[record["method"]].trains_base_weights:  # a whole state dict: the base only lends its tokenizer
        load_weights(model, finetuned, finetuned_path, dtype)
    else:
        check_fits(model, finetuned, finetuned_path, base_path)
        base_state = load_torch(base_path)
        check_state_dict(base_state, base_path)
        check_fingerprint(record, base_state, finetuned_path, base_path)
        load_weights(model, {**base_state, **finetuned}, base_path, dtype)
    model = model.to(device).requires_grad_(False)
    if record.get("quantize"):  # the function that was trained: the quantized base, the update added to it
        quantize_frozen(model, record["quantize"])
        return merge_into_dequantized(model, dtype).eval(), tokenizer, record
    return merge(model).eval(), tokenizer, record
