"""Checkpoint directories: `lit-llama.pth` (state dict), `model_config.json` and the tokenizer files.

Loading is memory-mapped and pickle-safe, writing atomic (lit_llama/files.py).
"""
import json
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from lit_llama.errors import UserError
from lit_llama.files import load_torch, save_json
from lit_llama.configs import configs
from lit_llama.model import LLaMA, Config

CHECKPOINT_NAME = "lit-llama.pth"
CONFIG_NAME = "model_config.json"


def checkpoint_dir(checkpoint_path: Union[str, Path]) -> Path:
    """Scripts take `<dir>/lit-llama.pth`; a directory is accepted too."""
    path = Path(checkpoint_path)
    return path if path.is_dir() else path.parent


def weights_path(checkpoint_path: Union[str, Path]) -> Path:
    path = Path(checkpoint_path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save_config(config: Config, directory: Union[str, Path]) -> None:
    save_json(config.to_dict(), Path(directory) / CONFIG_NAME)


def load_config(checkpoint_path: Union[str, Path], state_dict: Optional[dict] = None) -> Config:
    """The config in `model_config.json` beside the checkpoint, or one inferred from the tensor shapes."""
    config_file = checkpoint_dir(checkpoint_path) / CONFIG_NAME
    if config_file.is_file():
        try:
            return Config.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError, ValueError) as error:
            raise UserError(f"{config_file} is not a valid model config: {error}") from None
    if state_dict is None:
        state_dict = load_torch(weights_path(checkpoint_path))
    config = infer_config(state_dict)
    print(f"no {CONFIG_NAME} beside {checkpoint_path}: inferred config {config.name!r} from tensor shapes", file=sys.stderr)
    return config


def infer_config(state_dict: dict) -> Config:
    """Shapes give every size but the head count; a known config with those sizes decides it, else 128-wide heads."""
    check_state_dict(state_dict, "the checkpoint")
    try:
        vocab, n_embd = state_dict["transformer.wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h."))
        intermediate = state_dict["transformer.h.0.mlp.gate_proj.weight"].shape[0]
        kv_width = state_dict["transformer.h.0.attn.k_proj.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise UserError(f"cannot infer a model config: the state dict is not a lit-llama model ({error})") from None
    tied = "lm_head.weight" not in state_dict
    for name, values in configs.items():
        candidate = Config.from_name(name)
        if (candidate.padded_vocab_size, candidate.n_embd, candidate.n_layer, candidate.intermediate_size) == (
            vocab, n_embd, n_layer, intermediate
        ) and candidate.n_query_groups * candidate.head_size == kv_width and candidate.tie_embeddings == tied:
            return candidate
    head_size = 128 if n_embd % 128 == 0 else 64
    return Config(
        name="inferred", vocab_size=vocab, n_layer=n_layer, n_head=n_embd // head_size,
        n_query_groups=kv_width // head_size, n_embd=n_embd, intermediate_size=intermediate, tie_embeddings=tied,
    )


def check_state_dict(state_dict, source: Union[str, Path]) -> None:
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        kind = type(state_dict).__name__ if not isinstance(state_dict, dict) else "dict holding non-tensors"
        raise UserError(f"{source} is not a state dict (a {kind}, expected a dict of named tensors)")


def check_shapes(model: torch.nn.Module, state_dict: dict, source: Union[str, Path]) -> None:
    check_state_dict(state_dict, source)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the model config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: tensor {key} has shape {tuple(state_dict[key].shape)}, "
                f"the config expects {tuple(tensor.shape)}"
            )
        if state_dict[key].is_floating_point() != tensor.is_floating_point():
            raise UserError(f"{source}: tensor {key} holds {state_dict[key].dtype} values, not weights")


def load_weights(model: LLaMA, state_dict: dict, source: Union[str, Path], dtype: Optional[torch.dtype] = None) -> None:
    """Load into a (possibly meta-device) model without holding a second copy: tensors are assigned, not copied."""
    check_shapes(model, state_dict, source)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)


def load(
    checkpoint_path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
):
    """`model, tokenizer = load("checkpoints/x/lit-llama.pth")`: the model for inference (eval mode, no weight
    requiring gradients: call `requires_grad_()` to train it) and its tokenizer."""
    from lit_llama.tokenizer import Tokenizer

    path = weights_path(checkpoint_path)
    state_dict = load_torch(path)
    config = load_config(path, state_dict)
    with torch.device("meta"):
        model = LLaMA(config)
    load_weights(model, state_dict, path, dtype)
    tokenizer = Tokenizer(checkpoint_dir(path))
    check_vocabulary(tokenizer, config, path)
    model = model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def check_vocabulary(tokenizer, config: Config, source: Union[str, Path]) -> None:
    """Token ids past the model's embedding rows would fail (or read garbage on a GPU) at the first forward."""
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise UserError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but the model of {source} has only "
            f"{config.padded_vocab_size} embedding rows: this tokenizer belongs to another model"
        )
