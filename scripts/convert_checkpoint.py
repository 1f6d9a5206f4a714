"""Convert Meta's original LLaMA checkpoint (`consolidated.*.pth` + `params.json`) to lit-llama.

Bigger models come split for model parallelism: each shard holds a slice of every matrix. Column-parallel
layers (wq, wk, wv, w1, w3, output) were split along their output rows, row-parallel ones (wo, w2) and the
embedding along their columns; norms are copied whole into every shard. Meta also stores q/k with RoPE pairs
interleaved, which we reorder into the rotate-half layout our model (and Hugging Face) uses.
"""
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from lit_llama.files import load_torch, read_json_object
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import (
    check_checkpoint_outputs, copy_tokenizer_files, interleaved_to_rotate_half, parse_dtype, write_checkpoint,
)
from lit_llama.errors import UserError
from lit_llama.configs import configs, llama3_rope
from lit_llama.model import Config

# Meta name -> (our name, dimension the shards were split along; None: identical in every shard)
META_NAMES = {
    "tok_embeddings.weight": ("transformer.wte.weight", 1),
    "norm.weight": ("transformer.ln_f.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("attn.q_proj.weight", 0),
    "attention.wk.weight": ("attn.k_proj.weight", 0),
    "attention.wv.weight": ("attn.v_proj.weight", 0),
    "attention.wo.weight": ("attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("norm_1.weight", None),
    "ffn_norm.weight": ("norm_2.weight", None),
}


def lit_name(meta_name: str) -> tuple[str, Optional[int]]:
    if meta_name.startswith("layers."):
        _, layer, rest = meta_name.split(".", 2)
        if rest in META_NAMES:
            name, dim = META_NAMES[rest]
            return f"transformer.h.{layer}.{name}", dim
    elif meta_name in META_NAMES:
        return META_NAMES[meta_name]
    raise UserError(f"unexpected tensor {meta_name!r} in the Meta checkpoint")


def find_tokenizer_dir(checkpoint_dir: Path) -> Optional[Path]:
    """Meta's download puts tokenizer.model in the parent of the per-size folders; newer ones put it beside them."""
    for directory in (checkpoint_dir, checkpoint_dir.parent):
        if (directory / "tokenizer.model").is_file():
            return directory
    return None


def main(
    checkpoint_dir: Path, output_dir: OutputPath, model_size: str = "7B", dtype: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Convert a Meta LLaMA checkpoint directory into a lit-llama checkpoint directory.

    Args:
        checkpoint_dir: Directory with consolidated.00.pth (.01.pth, ...) and params.json, e.g. checkpoints/llama/7B.
        output_dir: Where lit-llama.pth, model_config.json and tokenizer.model are written.
        model_size: Config name the checkpoint's sizes start from (7B, 13B, Llama-2-7b, ...); params.json overrides it.
        dtype: Store the weights in this dtype (bfloat16, float16, float32); default: as in the checkpoint.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    if model_size not in configs:
        raise UserError(f"unknown --model_size {model_size!r}; known: {', '.join(configs)}")
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    params_file = checkpoint_dir / "params.json"
    if not shard_paths or not params_file.is_file():
        raise UserError(f"{checkpoint_dir} needs consolidated.*.pth and params.json (Meta's checkpoint layout)")
    params = read_json_object(params_file)
    check_checkpoint_outputs(output_dir, [checkpoint_dir, find_tokenizer_dir(checkpoint_dir)], overwrite)
    target_dtype = parse_dtype(dtype)

    shards = [load_torch(path) for path in shard_paths]  # memory-mapped: nothing is read until joined below
    state_dict = {}
    for meta_name in tqdm(list(shards[0]), desc="tensors", unit="tensor"):
        if meta_name == "rope.freqs":  # a derived RoPE table, not a weight
            continue
        name, dim = lit_name(meta_name)
        try:
            parts = [shard[meta_name] for shard in shards]
        except KeyError:
            raise UserError(f"{meta_name} is missing from some of the {len(shards)} shards") from None
        tensor = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        state_dict[name] = tensor.to(target_dtype) if target_dtype else tensor

    try:
        n_head = params["n_heads"]
        n_kv_heads = params.get("n_kv_heads") or n_head
        vocab_size, n_embd = state_dict["transformer.wte.weight"].shape  # LLaMA 1's params.json says vocab_size -1
        intermediate_size = state_dict["transformer.h.0.mlp.gate_proj.weight"].shape[0]
        n_layer = params["n_layers"]
    except KeyError as error:
        raise UserError(f"{checkpoint_dir} lacks {error} (in params.json or the weights)") from None
    try:
        config = Config.from_name(
            model_size,
            vocab_size=vocab_size,
            padded_vocab_size=None,
            n_layer=n_layer,
            n_head=n_head,
            n_query_groups=n_kv_heads,
            n_embd=n_embd,
            intermediate_size=intermediate_size,
            norm_eps=params.get("norm_eps", 1e-6),
            rope_base=float(params.get("rope_theta", 10000.0)),
            rope_scaling=llama3_rope if params.get("use_scaled_rope") else None,
            tie_embeddings=False,
        )
    except (TypeError, ValueError) as error:
        raise UserError(f"{params_file} does not describe a valid model: {error}") from None
    for layer in range(config.n_layer):
        q, k = f"transformer.h.{layer}.attn.q_proj.weight", f"transformer.h.{layer}.attn.k_proj.weight"
        state_dict[q] = interleaved_to_rotate_half(state_dict[q], n_head)
        state_dict[k] = interleaved_to_rotate_half(state_dict[k], n_kv_heads)

    path = write_checkpoint(state_dict, config, output_dir, source=str(checkpoint_dir))
    tokenizer_dir = find_tokenizer_dir(checkpoint_dir)
    copied = copy_tokenizer_files(tokenizer_dir, output_dir) if tokenizer_dir else []
    tokenizer = ", ".join(copied) or "no tokenizer (tokenizer.model not found)"
    print(f"wrote {path} from {len(shards)} shard(s) and {tokenizer}")


if __name__ == "__main__":
    run_cli(main)
