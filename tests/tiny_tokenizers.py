"""Tiny tokenizers trained in a second from a few sentences, so tests need no download:
a SentencePiece model (LLaMA-like: adds BOS) and a byte-level BPE tokenizer.json (SmolLM2-like: no BOS, ChatML)."""
import io
import json
from pathlib import Path

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
