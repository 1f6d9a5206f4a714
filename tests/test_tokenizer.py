import json

import pytest
import torch

from lit_llama.errors import UserError
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import make_byte_level_bpe, make_sentencepiece

TEXT = "Sort these words: tree, stone & 42 + 7 = 49!"


def test_sentencepiece_round_trip_and_special_ids(tmp_path):
    tokenizer = Tokenizer(make_sentencepiece(tmp_path))
    assert tokenizer.backend == "sentencepiece" and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)  # from the model
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == torch.long and ids[0] == 1  # LLaMA convention: BOS by default
    assert tokenizer.encode(TEXT, bos=False).tolist() == ids[1:].tolist()
    assert tokenizer.encode(TEXT, eos=True)[-1] == 2
    assert tokenizer.decode(ids[1:]) == TEXT
    assert tokenizer.decode(ids).startswith("<s>")  # special tokens are kept, as transformers' decode keeps them
    tree = tokenizer.encode("tree", bos=False).tolist()
    assert tokenizer.encode_batch([TEXT, "tree"], bos=False) == [ids[1:].tolist(), tree]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer(tmp_path).encode(TEXT)[0] != 1  # the config can switch BOS off


def test_byte_level_bpe_round_trip_and_special_ids(tmp_path):
    make_byte_level_bpe(tmp_path)
    tokenizer = Tokenizer(tmp_path)  # a directory works too
    assert tokenizer.backend == "huggingface"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)  # <|im_start|>, <|im_end|> from tokenizer_config.json
    text = "héllo wörld 🙂 <|im_end|>\n\ttabs  and  spaces"
    ids = tokenizer.encode(text)
    assert ids[0] != 1  # SmolLM2 convention: no BOS
    assert 2 in ids.tolist()  # special tokens in the text are recognised
    assert tokenizer.decode(ids) == text  # byte-level: exact
    assert tokenizer.encode(text, bos=True, eos=True).tolist() == [1, *ids.tolist(), 2]

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.eos_id == 0 and tokenizer.stop_ids == {0, 2}


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)
    with pytest.raises(UserError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "tokenizer.model")
