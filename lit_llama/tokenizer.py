"""One Tokenizer over Hugging Face `tokenizer.json` (byte-level BPE: Llama 3, SmolLM2, Qwen) and SentencePiece
`tokenizer.model` (LLaMA 1/2, Mistral), giving exactly the ids and text `transformers.AutoTokenizer` gives for the same
files: both kinds run through the `tokenizers` library, a SentencePiece model rebuilt the way transformers' Llama
tokenizer rebuilds it. BOS/EOS ids come from the tokenizer's own files."""
import hashlib
from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import torch

from lit_llama.errors import UserError
from lit_llama.files import read_json_object

TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"
)
# the special tokens tokenizer_config.json can name, as transformers reads them
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(self, path: Union[str, Path]) -> None:
        """`path`: a `tokenizer.model` or `tokenizer.json` file, or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.model"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise UserError(f"no tokenizer.json or tokenizer.model in {path}")
            path = found[0]
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        self.path = path
        config_path = path.parent / "tokenizer_config.json"
        config = read_json_if_present(config_path)
        generation = read_json_if_present(path.parent / "generation_config.json")
        self.special_tokens = {key: token_text(config.get(key)) for key in NAMED_SPECIAL_TOKENS}

        if path.suffix == ".model":
            self.backend = "sentencepiece"
            self.processor, pieces = sentencepiece_as_tokenizers(path, config)
            for key, piece in pieces.items():  # transformers' defaults where the config names none
                self.special_tokens[key] = self.special_tokens[key] or piece
            # transformers 5 builds the BOS/EOS post-processor from these flags (unset: neither); a bare Meta
            # checkpoint has no tokenizer_config.json at all, and Meta's LLaMA always starts with BOS
            add_bos = config.get("add_bos_token", False) if config_path.is_file() else True
            self.add_special_tokens_of_config(config)
            self.processor.post_processor = bos_eos_processor(
                self.special_tokens, self.processor, add_bos, config.get("add_eos_token", False)
            )
        elif path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            try:
                self.processor = HFTokenizer.from_file(str(path))
            except Exception as error:
                raise UserError(f"cannot read tokenizer {path}: {error}") from None
            # transformers 5 ignores add_bos_token/add_eos_token next to a tokenizer.json: its post-processor decides
            self.add_special_tokens_of_config(config)
        else:
            raise UserError(f"unsupported tokenizer file {path}: expected tokenizer.model or tokenizer.json")
        self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(self.special_tokens["bos_token"])
        self.eos_id = self.token_id(self.special_tokens["eos_token"])
        # what the post-processor puts around every text (BOS, EOS or both), found by asking it
        plain = self.processor.encode("a", add_special_tokens=False).ids
        full = self.processor.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        self.special_prefix, self.special_suffix = full[:start], full[start + len(plain) :]

        # generation_config.json states what the model was trained to stop on (Llama 3 lists several)
        if generation.get("bos_token_id") is not None:
            self.bos_id = generation["bos_token_id"]
        eos = generation.get("eos_token_id")
        if eos is not None:
            self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.stop_ids = set(eos) if isinstance(eos, list) else {self.eos_id} - {None}
        if self.bos_id is not None and self.bos_id < 0:
            self.bos_id = None

    def add_special_tokens_of_config(self, config: dict) -> None:
        """Tokens tokenizer_config.json declares that the vocabulary file lacks, added as transformers adds them: the
        named special tokens and `added_tokens_decoder`, so that they are recognised inside text."""
        from tokenizers import AddedToken

        known = {token.content for token in self.processor.get_added_tokens_decoder().values()}
        declared = config.get("added_tokens_decoder") or {}
        for token_id, token in sorted(declared.items(), key=lambda item: int(item[0])):
            if not isinstance(token, dict) or token.get("content") in known:
                continue
            options = {key: token[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in token}
            self.processor.add_tokens([AddedToken(token["content"], special=bool(token.get("special")), **options)])
            known.add(token["content"])
            if self.processor.token_to_id(token["content"]) != int(token_id):
                raise UserError(
                    f"tokenizer_config.json next to {self.path} places {token['content']!r} at id {token_id}, but "
                    f"the vocabulary puts it at {self.processor.token_to_id(token['content'])}"
                )
        extra = [token_text(t) for t in config.get("additional_special_tokens") or []]
        missing = [t for t in [*self.special_tokens.values(), *extra] if t is not None and t not in known]
        missing = dict.fromkeys(missing)  # once each, in order
        self.processor.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def token_id(self, token) -> Optional[int]:
        token = token_text(token)
        return None if token is None else self.processor.token_to_id(token)

    def encode(self, text: str, bos: Optional[bool] = None, eos: Optional[bool] = None) -> torch.Tensor:
        """Token ids of `text`; special tokens written in the text are recognised. With `bos`/`eos` left as None, the
        tokenizer's own convention adds them (exactly `AutoTokenizer(text).input_ids`: Llama 2 and 3: BOS; SmolLM2,
        Qwen: nothing); True/False forces them, as data preparation needs (a response takes no BOS)."""
        return torch.tensor(self.encode_batch([text], bos=bos, eos=eos)[0], dtype=torch.long)

    def encode_batch(self, texts: list[str], bos: Optional[bool] = None, eos: Optional[bool] = None) -> list[list[int]]:
        """Token id lists for many texts at once, through the library's multi-threaded batch encoder."""
        batch = [e.ids for e in self.processor.encode_batch(texts, add_special_tokens=False)]
        prefix = self.special_prefix if bos is None else [self.bos_id] if bos and self.bos_id is not None else []
        suffix = self.special_suffix if eos is None else [self.eos_id] if eos and self.eos_id is not None else []
        return [prefix + ids + suffix for ids in batch]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, start character of each token) of each text, without BOS/EOS: for labelling tokens by the part of
        the text they come from."""
        encodings = self.processor.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, [start for start, _ in e.offsets]) for e in encodings]

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its vocabulary string spells each byte as at least one
        character): a text of more than n times this many characters is surely longer than n tokens."""
        return max(map(len, self.processor.get_vocab(with_added_tokens=True)), default=1)

    @cached_property
    def special_token_texts(self) -> frozenset:
        """The texts of the special tokens (<s>, <|im_end|>, <|eot_id|>, ...), as they appear in rendered prompts."""
        return frozenset(t.content for t in self.processor.get_added_tokens_decoder().values() if t.special)

    @property
    def add_bos(self) -> bool:
        """Whether `encode` starts a text with BOS by default."""
        return self.bos_id is not None and self.special_prefix[-1:] == [self.bos_id]

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens included: `AutoTokenizer.decode(ids)`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(ids, skip_special_tokens=False)

    @cached_property
    def identity(self) -> dict:
        """What data prepared with this tokenizer must match: its kind, vocabulary size and content hash."""
        return {"backend": self.backend, "vocab_size": self.vocab_size, "sha256": file_sha256(self.path)}


def token_text(token) -> Optional[str]:
    if isinstance(token, dict):  # configs store AddedToken objects as dicts
        token = token.get("content")
    return token if isinstance(token, str) else None


def sentencepiece_as_tokenizers(path: Path, config: dict):
    """A SentencePiece BPE model as the `tokenizers.Tokenizer` transformers' LlamaTokenizer makes of it, and the
    pieces of its unknown/BOS/EOS ids.

    The model file holds pieces and scores but no merges: every way of splitting a piece into two known pieces is a
    merge, ranked by the piece's id (SentencePiece ids follow the scores). Spaces become "▁"; with transformers'
    default (`legacy` false) only the text's first word gets a "▁" prefix, not the text after a special token.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as error:
        raise UserError(f"cannot read SentencePiece model {path}: {error}") from None
    if model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(model.trainer_spec.model_type)
        raise UserError(f"{path} is a SentencePiece {kind} model; LLaMA-family tokenizers are BPE")
    pieces = [piece.piece for piece in model.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece in pieces:
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix_space else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    tokenizer.add_tokens([  # control pieces (<s>, </s>) are special, user-defined ones are plain added tokens
        AddedToken(piece.piece, special=piece.type == kinds.CONTROL, normalized=False)
        for piece in model.pieces if piece.type in (kinds.CONTROL, kinds.USER_DEFINED)
    ])
    spec = model.trainer_spec
    named = {"unk_token": spec.unk_id, "bos_token": spec.bos_id, "eos_token": spec.eos_id}
    return tokenizer, {key: pieces[i] for key, i in named.items() if 0 <= i < len(pieces)}


def bos_eos_processor(special_tokens: dict, tokenizer, add_bos: bool, add_eos: bool):
    from tokenizers import processors

    parts = {"bos_token": add_bos, "eos_token": add_eos}
    ids = {key: tokenizer.token_to_id(special_tokens[key] or "") for key in parts}
    used = [key for key, wanted in parts.items() if wanted and ids[key] is not None]
    single = " ".join(([special_tokens["bos_token"]] if "bos_token" in used else []) + ["$A"]
                      + ([special_tokens["eos_token"]] if "eos_token" in used else []))
    return processors.TemplateProcessing(single=single, special_tokens=[(special_tokens[k], ids[k]) for k in used])


def read_json_if_present(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
