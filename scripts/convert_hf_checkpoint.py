"""Convert a Hugging Face Llama, Mistral, Qwen2/2.5 or Qwen3 checkpoint (safetensors or pytorch_model*.bin, sharded
or not) to lit-llama.

Shards are read one at a time, tensor by tensor, so memory peaks near one shard plus the converted model.
"""
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from lit_llama.files import load_torch, read_json_object
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import (
    check_checkpoint_outputs, config_from_hf, copy_tokenizer_files, hf_to_lit_name, parse_dtype, write_checkpoint,
)
from lit_llama.errors import UserError


WEIGHT_FORMATS = (  # (shard index, weight files), safetensors preferred over pickles
    ("model.safetensors.index.json", "*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
)


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The shards the index lists, else every weight file of the first format present."""
    for index_name, pattern in WEIGHT_FORMATS:
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise UserError(f"{index} is not a valid shard index ({type(error).__name__}: {error})") from None
            return [checkpoint_dir / shard for shard in shards]
        # Mistral repos also hold Meta-layout `consolidated.safetensors`, which is not this format
        files = sorted(p for p in checkpoint_dir.glob(pattern) if not p.name.startswith("consolidated"))
        if files:
            return files
    raise UserError(f"no *.safetensors or pytorch_model*.bin weights in {checkpoint_dir}")


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, loading one tensor at a time from safetensors, memory-mapped from .bin files."""
    if not path.is_file():
        raise UserError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as error:
            raise UserError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        yield from load_torch(path).items()


def main(checkpoint_dir: Path, output_dir: OutputPath, dtype: Optional[str] = None, overwrite: bool = False) -> None:
    """Convert a Hugging Face Llama-family checkpoint directory into a lit-llama checkpoint directory.

    Args:
        checkpoint_dir: Directory with config.json, the weights and the tokenizer files (from huggingface-cli download).
        output_dir: Where lit-llama.pth, model_config.json and the tokenizer files are written.
        dtype: Store the weights in this dtype (bfloat16, float16, float32); default: as in the checkpoint.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json in {checkpoint_dir}: expected a Hugging Face model directory")
    hf_config = read_json_object(config_file)
    check_checkpoint_outputs(output_dir, [checkpoint_dir], overwrite)
    try:
        config = config_from_hf(hf_config, name=checkpoint_dir.resolve().name)
    except KeyError as error:
        raise UserError(f"{config_file} lacks {error}, which a Llama config needs") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as error:
        raise UserError(f"{config_file} is not a valid Llama config: {error}") from None
    target_dtype = parse_dtype(dtype)

    state_dict = {}
    for path in tqdm(weight_files(checkpoint_dir), desc="shards", unit="shard"):
        for name, tensor in read_tensors(path):
            if name.endswith("rotary_emb.inv_freq"):  # derived RoPE table some old checkpoints saved
                continue
            state_dict[hf_to_lit_name(name)] = tensor.to(target_dtype) if target_dtype else tensor

    path = write_checkpoint(state_dict, config, output_dir, source=str(checkpoint_dir))
    copied = copy_tokenizer_files(checkpoint_dir, output_dir)
    tokenizer = ", ".join(copied) or "no tokenizer files"
    print(f"wrote {path} ({config.n_layer} layers, vocab {config.vocab_size}) and {tokenizer}")


if __name__ == "__main__":
    run_cli(main)
