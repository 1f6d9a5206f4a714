"""Tiny base checkpoints and finetuned weights saved the way finetune/*.py saves them, for the LoRA, adapter and
PEFT-export tests."""
import json
from pathlib import Path
from typing import Optional

import torch

from lit_llama.checkpoint import CHECKPOINT_NAME, save_config
from lit_llama.files import save_json, save_torch
from lit_llama.finetuned import FINETUNE_CONFIG_NAME, METHODS, finetune_config
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import QWEN, make_byte_level_bpe, with_template


def make_base(directory: Path, name: str = "tiny", seed: int = 0, make_tokenizer=make_byte_level_bpe) -> Path:
    """A randomly initialised checkpoint directory with a tiny tokenizer (byte-level unless `make_tokenizer` writes
    another); returns its lit-llama.pth. The context is long enough for an Alpaca prompt in that tokenizer.
    "tiny-gqa-untied": GQA with an lm_head."""
    make_tokenizer(directory)
    overrides = dict(vocab_size=Tokenizer(directory).vocab_size, block_size=512)
    if name == "tiny-gqa-untied":
        name, overrides["tie_embeddings"] = "tiny-gqa", False
    config = Config.from_name(name, **overrides)
    torch.manual_seed(seed)
    save_torch(LLaMA(config).state_dict(), directory / CHECKPOINT_NAME)
    save_config(config, directory)
    return directory / CHECKPOINT_NAME


def load_base(base_path: Path) -> LLaMA:
    from lit_llama.checkpoint import load

    return load(base_path)[0]


def randomise_trainable(model: torch.nn.Module, std: float = 0.05) -> None:
    """Non-trivial finetuned values (B != 0, gates != 0, ...) so equivalence checks test something."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def save_finetuned(model: LLaMA, method: str, directory: Path, base_path: Path, **options) -> Path:
    """The trainable tensors (everything for "full") and finetune_config.json, as the training loop writes them."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    path = directory / f"lit-llama-{method}-finetuned.pth"
    save_torch(weights, path)
    identity = Tokenizer(base_path.parent).identity
    spec = METHODS[method]
    settings = spec.options(**options) if spec.options else None
    record = finetune_config(spec, settings, model.config, "alpaca", identity, base_path)
    save_json(record, directory / FINETUNE_CONFIG_NAME)
    return path


def make_chat_lora(tmp_path: Path, block_size: Optional[int] = None) -> tuple[Path, Path]:
    """(LoRA weights, base checkpoint): a LoRA finetune of a tiny base whose checkpoint has a Qwen-style chat
    template, recorded as its style; with `block_size`, a longer context than make_base's (no weight depends on it)."""
    from lit_llama.lora import LORA, LoRAArgs, add_lora

    base_path = make_base(tmp_path / "base", "tiny")
    if block_size:
        config_path = base_path.parent / "model_config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"block_size": block_size}))
    with_template(base_path.parent, QWEN)
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=8, targets=["query", "value"]))
    LORA.mark_trainable(model)
    torch.manual_seed(2)
    randomise_trainable(model)
    path = save_finetuned(model, "lora", tmp_path / "out", base_path, r=4, alpha=8, targets=["query", "value"])
    config_path = path.parent / FINETUNE_CONFIG_NAME
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prompt_style": "chat_template"}))
    return path, base_path
