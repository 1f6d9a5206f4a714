"""One Tokenizer over SentencePiece (`tokenizer.model`: LLaMA 1/2, Mistral) and Hugging Face
`tokenizer.json` (byte-level BPE: Llama 3, SmolLM2). BOS/EOS ids come from the tokenizer's own files."""
import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch

from lit_llama.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


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
        config = read_json_if_present(path.parent / "tokenizer_config.json")
        generation = read_json_if_present(path.parent / "generation_config.json")

        if path.suffix == ".model":
            import sentencepiece

            self.backend = "sentencepiece"
            try:
                self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except Exception as error:
                raise UserError(f"cannot read SentencePiece model {path}: {error}") from None
            self.vocab_size = self.processor.vocab_size()
            self.bos_id = self.processor.bos_id()
            self.eos_id = self.processor.eos_id()
            self.add_bos = config.get("add_bos_token", True)
        elif path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            try:
                self.processor = HFTokenizer.from_file(str(path))
            except Exception as error:
                raise UserError(f"cannot read tokenizer {path}: {error}") from None
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            self.bos_id = self.token_id(config.get("bos_token"))
            self.eos_id = self.token_id(config.get("eos_token"))
            # a tokenizer.json whose post-processor inserts BOS itself must not get a second one from us
            self.add_bos = bool(config.get("add_bos_token", False))
        else:
            raise UserError(f"unsupported tokenizer file {path}: expected tokenizer.model or tokenizer.json")

        # generation_config.json states what the model was trained to stop on (Llama 3 lists several)
        if generation.get("bos_token_id") is not None:
            self.bos_id = generation["bos_token_id"]
        eos = generation.get("eos_token_id")
        if eos is not None:
            self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.stop_ids = set(eos) if isinstance(eos, list) else {self.eos_id}
        if self.bos_id is not None and self.bos_id < 0:
            self.bos_id = None

    def token_id(self, token) -> Optional[int]:
        if isinstance(token, dict):  # older configs store AddedToken objects
            token = token.get("content")
        return None if token is None else self.processor.token_to_id(token)

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids of `text`. `bos=None` follows the tokenizer's own convention (LLaMA: yes, SmolLM2: no)."""
        ids = self.encode_batch([text], bos=bos, eos=eos)[0]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def encode_batch(self, texts: list[str], bos: Optional[bool] = None, eos: bool = False) -> list[list[int]]:
        """Token id lists for many texts at once, through the libraries' multi-threaded batch encoders."""
        if self.backend == "sentencepiece":
            batch = self.processor.encode(texts)
        else:
            batch = [e.ids for e in self.processor.encode_batch(texts, add_special_tokens=False)]
        prefix = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        suffix = [self.eos_id] if eos else []
        return [prefix + ids + suffix for ids in batch]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.backend == "sentencepiece":
            return self.processor.decode(ids)
        return self.processor.decode(ids, skip_special_tokens=False)

    @property
    def identity(self) -> dict:
        """What data prepared with this tokenizer must match: its kind, vocabulary size and content hash."""
        return {"backend": self.backend, "vocab_size": self.vocab_size, "sha256": file_sha256(self.path)}


def read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
