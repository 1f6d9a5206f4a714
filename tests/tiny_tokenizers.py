"""Tiny tokenizers trained in a second from a few sentences, so tests need no download:
a SentencePiece model (LLaMA-like: adds BOS) and a byte-level BPE tokenizer.json (SmolLM2-like: no BOS, ChatML)."""
import io
import json
from pathlib import Path
from typing import Optional

from lit_llama.builtin_tasks import WORDS
from lit_llama.prompts import prompt_styles


def training_text() -> list[str]:
    templates = [style.apply("Sort these words.", "a b") for style in prompt_styles.values()]
    sentences = [" ".join(WORDS[i : i + 9]) + f". {i} + {i * 7} = {i * 8}!" for i in range(len(WORDS))]
    return templates + sentences + ["The quick brown fox jumps over the lazy dog? (yes, 'no'); {x: 1}"]


def make_sentencepiece(directory: Path) -> Path:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory / "tokenizer.model"


def make_byte_level_bpe(directory: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(training_text(), vocab_size=400, min_frequency=1, special_tokens=special)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_llama2_sentencepiece(directory: Path, config: Optional[dict] = None) -> Path:
    """A SentencePiece model trained the way LLaMA 2's was (no normalization, whitespace kept, digits split, byte
    fallback), with the tokenizer_config.json of a Hugging Face Llama 2 repository (`config` entries override)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": False, **(config or {})}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory / "tokenizer.model"


def make_llama3_like(directory: Path, post_processor: str = "bos", config: Optional[dict] = None) -> Path:
    """A byte-level BPE tokenizer.json with Llama 3's special tokens whose post-processor adds BOS ("bos"), BOS and
    EOS ("bos+eos") or nothing ("none"), as the tokenizers library writes it."""
    from tokenizers import ByteLevelBPETokenizer, processors

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(training_text(), vocab_size=400, min_frequency=1, special_tokens=LLAMA3_SPECIALS)
    tokenizer = trainer._tokenizer
    bos, eos = ("<|begin_of_text|>", 0), ("<|end_of_text|>", 1)
    single = {"bos": f"{bos[0]} $A", "bos+eos": f"{bos[0]} $A {eos[0]}", "none": None}[post_processor]
    special = [bos] if post_processor == "bos" else [bos, eos]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=special) if single else None
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos[0], "eos_token": "<|eot_id|>",
                **(config or {})}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory / "tokenizer.json"
