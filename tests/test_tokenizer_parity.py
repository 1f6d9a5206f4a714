"""Tokenizer.encode/decode give exactly what transformers' AutoTokenizer gives for the same files, for every kind of
tokenizer a user brings: tokenizer.json with or without a BOS/EOS post-processor, SentencePiece tokenizer.model with
the add_bos_token/add_eos_token flags, byte-level BPE without BOS, special tokens written inside the text."""
import json
import shutil

import pytest

from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import make_byte_level_bpe, make_llama2_sentencepiece, make_llama3_like

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")

TEXTS = [
    "Sort these words: tree, stone & 42 + 7 = 49!",
    " a leading space,  two spaces and a trailing one ",
    "lines\nand\ttabs\n\n  indented",
    "naïve café — 東京 🚀",
    "",
    " ",
    "12345678",
]
LLAMA2_SPECIAL_TEXTS = ["<s>[INST] hi [/INST] ok </s>", "a</s>b", "</s> after", "x <s>"]
LLAMA3_SPECIAL_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "two<|eot_id|><|eot_id|> in a row", " <|end_of_text|>",
]
CHATML_SPECIAL_TEXTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y"]


def llama3_kind(post_processor, config=None):
    return lambda d: make_llama3_like(d, post_processor, config)


def llama2_kind(config=None):
    return lambda d: make_llama2_sentencepiece(d, config)


def sentencepiece_saved_as_tokenizer_json(directory):
    """A Llama 2 repository as the Hub has it: transformers' own tokenizer.json next to (here: instead of) the
    SentencePiece model, with a TemplateProcessing post-processor adding <s>."""
    source = directory.parent / f"{directory.name}-source"
    make_llama2_sentencepiece(source)
    transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(directory))
    (directory / "tokenizer.model").unlink(missing_ok=True)
    shutil.rmtree(source)
    assert json.loads((directory / "tokenizer.json").read_text())["post_processor"]["type"] == "TemplateProcessing"


KINDS = {  # name: (how to build it, extra texts, whether transformers starts a text with BOS)
    "json-post-processor-bos": (llama3_kind("bos"), LLAMA3_SPECIAL_TEXTS, True),
    "json-post-processor-bos-eos": (llama3_kind("bos+eos"), LLAMA3_SPECIAL_TEXTS, True),
    "json-no-post-processor": (llama3_kind("none"), LLAMA3_SPECIAL_TEXTS, False),
    # transformers 5 takes BOS/EOS from a tokenizer.json's post-processor and ignores these flags
    "json-no-post-processor-add-bos-eos-flags": (
        llama3_kind("none", {"add_bos_token": True, "add_eos_token": True}), LLAMA3_SPECIAL_TEXTS, False),
    "json-post-processor-bos-add-bos-false": (llama3_kind("bos", {"add_bos_token": False}), LLAMA3_SPECIAL_TEXTS, True),
    "json-byte-level-bpe-no-bos": (make_byte_level_bpe, CHATML_SPECIAL_TEXTS, False),
    "json-from-sentencepiece": (sentencepiece_saved_as_tokenizer_json, LLAMA2_SPECIAL_TEXTS, True),
    "sentencepiece-add-bos": (llama2_kind(), LLAMA2_SPECIAL_TEXTS, True),
    "sentencepiece-add-bos-eos": (llama2_kind({"add_eos_token": True}), LLAMA2_SPECIAL_TEXTS, True),
    "sentencepiece-no-flags": (
        llama2_kind({"add_bos_token": None, "add_eos_token": None}), LLAMA2_SPECIAL_TEXTS, False),
    "sentencepiece-legacy-prefix": (llama2_kind({"legacy": True}), LLAMA2_SPECIAL_TEXTS, True),
    "sentencepiece-added-tokens": (
        llama2_kind({"added_tokens_decoder": {
            "400": {"content": "<pad>", "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                    "single_word": False},
            "401": {"content": "<|tool|>", "special": False, "normalized": False, "lstrip": False, "rstrip": False,
                    "single_word": False}}}),
        LLAMA2_SPECIAL_TEXTS + ["a<pad>b <|tool|> c"], True),
}


def without_nulls(directory):
    """Drop the config entries a kind sets to None (meaning: the flag is absent)."""
    path = directory / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_equal_transformers_auto_tokenizer(kind, tmp_path):
    build, special_texts, starts_with_bos = KINDS[kind]
    directory = tmp_path / kind
    build(directory)
    without_nulls(directory)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = Tokenizer(directory)
    for text in TEXTS + special_texts:
        expected = reference(text).input_ids
        assert ours.encode(text).tolist() == expected, (kind, text)
        assert ours.decode(expected) == reference.decode(expected), (kind, text)
        assert ours.encode_batch([text, text]) == [expected, expected]
    assert ours.add_bos == starts_with_bos
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)


@pytest.mark.parametrize("kind", ["json-post-processor-bos-eos", "sentencepiece-add-bos-eos", "json-no-post-processor"])
def test_bos_and_eos_overrides_add_exactly_one_each(kind, tmp_path):
    build, _, _ = KINDS[kind]
    build(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = TEXTS[0]
    plain = reference(text, add_special_tokens=False).input_ids
    assert tokenizer.encode(text, bos=False, eos=False).tolist() == plain
    assert tokenizer.encode(text, bos=True, eos=False).tolist() == [tokenizer.bos_id, *plain]
    assert tokenizer.encode(text, bos=False, eos=True).tolist() == [*plain, tokenizer.eos_id]
    assert tokenizer.encode(text, bos=True, eos=True).tolist() == [tokenizer.bos_id, *plain, tokenizer.eos_id]


def test_a_bare_meta_sentencepiece_model_starts_with_bos(tmp_path):
    """Meta's LLaMA downloads have tokenizer.model and no tokenizer_config.json; their code always prepends BOS."""
    make_llama2_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer(tmp_path / "tokenizer.model")
    assert tokenizer.encode("tree")[0] == tokenizer.bos_id == 1 and tokenizer.eos_id == 2


def test_generation_config_lists_every_stop_id(tmp_path):
    make_llama3_like(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.stop_ids == {1, 4} and tokenizer.eos_id == 1
    assert tokenizer.decode(sorted(tokenizer.stop_ids)) == "<|end_of_text|><|eot_id|>"


def test_identity_is_hashed_once(tmp_path, monkeypatch):
    from lit_llama import tokenizer as module

    make_llama3_like(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    calls = []
    original = module.file_sha256
    monkeypatch.setattr(module, "file_sha256", lambda path: calls.append(path) or original(path))
    assert tokenizer.identity == tokenizer.identity and len(calls) == 1
