"""Write a lit-llama model as a GGUF file, the format llama.cpp, Ollama and LM Studio run.

The file holds llama-architecture metadata, the tokenizer (vocabulary, merges or scores, token types, special ids),
the chat template and the tensors. What differs from our checkpoints: q/k rows go back to Meta's interleaved RoPE
layout, the vocabulary loses its padding rows, Llama 3 RoPE scaling becomes llama.cpp's `rope_freqs` tensor, and
the matrices are encoded in the chosen type. Tensors are converted and written one at a time, so memory holds the
model (memory-mapped) and one encoded tensor. scripts/convert_gguf_checkpoint.py reads such a file back.
"""
import json
import math
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from tqdm import tqdm

from lit_llama.files import atomic_path
from lit_llama.convert import rotate_half_to_interleaved
from lit_llama.errors import UserError
from lit_llama.model import LLaMA, Config, llama3_scaled_frequencies
from lit_llama.tokenizer import Tokenizer, read_json_if_present

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

# Llama 3's word split (its tokenizer.json's Split regex; llama.cpp calls this pre-tokenizer "llama-bpe")
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# our module path (within a block, or top level) -> GGUF's
GGUF_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
    "norm_1": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "norm_2": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# --outtype -> (GGML tensor type of the matrices, llama.cpp's file type)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}


def check_outtype(outtype: str) -> None:
    if outtype in OUTTYPES:
        return
    hint = ""
    if outtype.lower().startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq")):
        # the gguf package has no quantizer for the k-quants: llama.cpp's own tool makes them
        hint = (
            f"; for {outtype} write f16 (or bf16) and run llama.cpp's quantizer: "
            f"llama-quantize model-f16.gguf model-{outtype.lower()}.gguf {outtype.upper()}"
        )
    raise UserError(f"unknown --outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}{hint}")


def gguf_tensor_name(lit_name: str) -> str:
    module, _, suffix = lit_name.rpartition(".")  # suffix: "weight"
    if module.startswith("transformer.h."):
        _, _, layer, part = module.split(".", 3)
        if part in GGUF_NAMES:
            return f"blk.{layer}.{GGUF_NAMES[part]}.{suffix}"
    elif module in GGUF_NAMES:
        return f"{GGUF_NAMES[module]}.{suffix}"
    raise UserError(f"tensor {lit_name!r} has no place in a llama GGUF file (is the model merged?)")


def tensor_type(shape: tuple, outtype: str):
    """Norms (1-D) stay F32 as llama.cpp writes them; a matrix whose rows do not split into the type's blocks
    falls back to F16, as llama.cpp's converter does."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return qtype


def encoded_nbytes(shape: tuple, qtype) -> int:
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block_size) * type_size


def encode(values: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return values
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def rope_factors(config: Config) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp applies it: the divisor of each rotary frequency (`rope_freqs`)."""
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (inv_freq / llama3_scaled_frequencies(inv_freq, **config.rope_scaling)).float()


def gguf_tensors(model: LLaMA) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF's layout) pairs, computed lazily one at a time."""
    config = model.config
    if config.rope_scaling:
        yield "rope_freqs.weight", rope_factors(config)
    for name, tensor in model.state_dict().items():
        if name.startswith(("transformer.wte.", "lm_head.")):
            tensor = tensor[: config.vocab_size]  # our padding rows are no tokens
        elif name.endswith("attn.q_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_head)
        elif name.endswith("attn.k_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_query_groups)
        yield gguf_tensor_name(name), tensor


def add_model_metadata(writer, config: Config, outtype: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def byte_level_pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name for the word split a byte-level tokenizer.json does before merging."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    use_regex = parts[-1].get("use_regex", True) if kinds and kinds[-1] == "ByteLevel" else None
    if kinds == ["ByteLevel"] and use_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and use_regex:
        return "smollm"  # SmolLM2: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT and not use_regex:
        return "llama-bpe"
    raise UserError(
        f"tokenizer.json splits words with {' + '.join(map(str, kinds))}, which matches no pre-tokenizer this "
        "exporter knows for llama.cpp (GPT-2, SmolLM2, Llama 3)"
    )


def byte_level_vocabulary(data: dict, vocab_size: int) -> dict:
    model = data["model"]
    if data.get("normalizer"):
        raise UserError(f"tokenizer.json normalizes text ({data['normalizer'].get('type')}); llama.cpp's byte-level "
                        "BPE does not, so the GGUF would tokenize differently")
    tokens = {i: token for token, i in model["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "model": "gpt2",
        "pre": byte_level_pre_tokenizer(data.get("pre_tokenizer") or {}),
        **padded_vocabulary(tokens, types, vocab_size),
        "merges": merges,
    }


def sentencepiece_processor(path: Path):
    """The SentencePiece model itself (our Tokenizer runs it through the tokenizers library, which has no scores)."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def sentencepiece_vocabulary(processor, vocab_size: int) -> dict:
    ids = range(processor.get_piece_size())
    tokens = {i: processor.id_to_piece(i) for i in ids}
    types = {
        i: UNKNOWN if processor.is_unknown(i) else CONTROL if processor.is_control(i)
        else BYTE if processor.is_byte(i) else UNUSED if processor.is_unused(i) else NORMAL
        for i in ids
    }
    return {
        "model": "llama",
        **padded_vocabulary(tokens, types, vocab_size),
        "scores": [processor.get_score(i) for i in ids] + [-1000.0] * (vocab_size - len(ids)),
        "unk_id": processor.unk_id(),
        # SentencePiece's dummy prefix: "a" becomes "▁a"
        "add_space_prefix": processor.encode_as_pieces("a")[0].startswith("▁"),
    }


def padded_vocabulary(tokens: dict, types: dict, vocab_size: int) -> dict:
    """Tokens and types for ids 0..vocab_size-1: the model may have more embedding rows than the tokenizer has
    tokens; those ids get placeholder names, as llama.cpp's converter gives them."""
    if tokens and max(tokens) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(tokens)}, beyond the model's vocabulary of {vocab_size}")
    return {
        "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        "types": [types.get(i, UNUSED) for i in range(vocab_size)],
    }


def chat_template(directory: Path):
    """tokenizer_config.json's chat template, or chat_template.jinja beside it (transformers 5 saves it there)."""
    template = read_json_if_present(directory / "tokenizer_config.json").get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template


def add_tokenizer_metadata(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    directory = tokenizer.path.parent
    if tokenizer.backend == "sentencepiece":
        vocabulary = sentencepiece_vocabulary(sentencepiece_processor(tokenizer.path), vocab_size)
    else:
        data = json.loads(tokenizer.path.read_text(encoding="utf-8"))
        byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
            data.get("decoder")
        )
        if data["model"].get("type") != "BPE":
            raise UserError(f"{tokenizer.path} is a {data['model'].get('type')} tokenizer; GGUF export needs BPE")
        if byte_level:
            vocabulary = byte_level_vocabulary(data, vocab_size)
        elif (directory / "tokenizer.model").is_file():  # SentencePiece BPE as tokenizer.json: use the original
            vocabulary = sentencepiece_vocabulary(sentencepiece_processor(directory / "tokenizer.model"), vocab_size)
        else:
            raise UserError(f"{tokenizer.path} is neither byte-level BPE nor accompanied by its tokenizer.model")

    writer.add_tokenizer_model(vocabulary["model"])
    if "pre" in vocabulary:
        writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    if "merges" in vocabulary:
        writer.add_token_merges(vocabulary["merges"])
    if "scores" in vocabulary:
        writer.add_token_scores(vocabulary["scores"])
        writer.add_add_space_prefix(vocabulary["add_space_prefix"])
        writer.add_unk_token_id(vocabulary["unk_id"])
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    pad_id = tokenizer.token_id(read_json_if_present(directory / "tokenizer_config.json").get("pad_token"))
    if pad_id is not None:
        writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    writer.add_add_eos_token(False)
    template = chat_template(directory)
    if template:
        writer.add_chat_template(template)


def write_gguf(model: LLaMA, tokenizer: Tokenizer, path: Union[str, Path], outtype: str = "f16", name: str = "") -> dict:
    """Write `model` (plain, e.g. with LoRA merged) and its tokenizer to `path` atomically; returns a count of
    tensors per GGML type."""
    import gguf

    check_outtype(outtype)
    config = model.config
    # the tensor directory precedes the data, so every name, shape and size is known before the first tensor is made
    plan = []
    for gguf_name, tensor in gguf_tensors(model):
        shape = tuple(tensor.shape)
        plan.append((gguf_name, shape, tensor_type(shape, outtype)))
    counts: dict = {}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        try:
            add_model_metadata(writer, config, outtype, name or config.name or "lit-llama")
            add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
            for gguf_name, shape, qtype in plan:
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), encoded_nbytes(shape, qtype), qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            tensors = gguf_tensors(model)
            for (gguf_name, shape, qtype), (_, tensor) in tqdm(zip(plan, tensors), total=len(plan), desc="tensors"):
                values = tensor.detach().to(torch.float32).contiguous().numpy()
                writer.write_tensor_data(encode(values, qtype))
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
        finally:
            writer.close()
    return counts
