"""Llama 3.2, Qwen2 (q/k/v biases), Qwen3 (own head_dim, q/k norms) and Mistral (sliding window, own head_dim),
each as transformers computes it: tiny random models of transformers' own classes, converted with the scripts, give
transformers' logits and greedy tokens; LoRA on every layer merges exactly; the PEFT and Hugging Face exports load in
transformers with the same logits. The named configs of the real sizes have the real parameter counts."""
from pathlib import Path

import pytest
import torch

from conftest import HF_ULPS, assert_close, run_script
from lit_llama.adapter import AdapterArgs
from lit_llama.adapter_v2 import ADAPTER_V2
from lit_llama.checkpoint import load
from lit_llama.convert import config_from_hf, config_to_hf
from lit_llama.errors import UserError
from lit_llama.fast_decode import DecodeStep
from lit_llama.lora import LORA, LoRAArgs, add_lora
from lit_llama.method import merge
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer
from test_convert import VOCAB, write_word_tokenizer
from tiny_finetunes import randomise_trainable, save_finetuned

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)
# family: (transformers config class, its settings). Between them: tied and untied heads, heads wider (Mistral) and
# narrower (Qwen3) than hidden_size / num_attention_heads, Llama 3 RoPE scaling with Llama 3.2's factor 32
FAMILIES = {
    "llama-3.2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16,  # shorter than the test sequences: the scaling matters
    ))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, head_dim=32, sliding_window=6)),
}
SEQUENCE = 40  # several times Mistral's window


def tiny_hf_model(family: str):
    """transformers' own class for `family`, with weights wide enough that greedy decoding wanders, and random
    norm weights and biases, so a norm or bias put in the wrong place would show."""
    config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(**TINY, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(std=0.5)
            else:
                param.normal_(std=0.2)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits.float()


class Converted:
    """One family's transformers model, its directory, our conversion of it and the Hugging Face export of that."""

    def __init__(self, family: str, root: Path) -> None:
        self.family, self.hf_model = family, tiny_hf_model(family)
        self.hf_dir, self.lit_dir, self.export_dir = root / "hf", root / "lit", root / "export"
        self.hf_model.save_pretrained(self.hf_dir)
        write_word_tokenizer(self.hf_dir)
        run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", self.hf_dir, "--output_dir", self.lit_dir,
                   check=True)
        run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_path", self.lit_dir / "lit-llama.pth",
                   "--output_dir", self.export_dir, check=True)

    def model(self) -> LLaMA:
        return load(self.lit_dir / "lit-llama.pth", dtype=torch.float32)[0]


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory) -> Converted:
    return Converted(request.param, tmp_path_factory.mktemp(request.param))


def test_converted_model_gives_transformers_logits_and_exports_back(converted):
    model = converted.model()
    config, hf_config = model.config, converted.hf_model.config
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    assert (config.head_size, config.tie_embeddings) == (head_dim, hf_config.tie_word_embeddings)
    assert config.attention_bias == (converted.family == "qwen2") and config.qk_norm == (converted.family == "qwen3")
    assert config.sliding_window == (hf_config.sliding_window if converted.family == "mistral" else None)
    idx = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(converted.hf_model, idx)
    with torch.no_grad():
        assert_close(model(idx)[..., :VOCAB], expected, ulps=HF_ULPS)

    exported = transformers.AutoModelForCausalLM.from_pretrained(converted.export_dir, dtype=torch.float32).eval()
    assert type(exported) is type(converted.hf_model)
    assert_close(hf_logits(exported, idx), expected, ulps=HF_ULPS)


def test_greedy_tokens_of_the_cli_equal_transformers_generate(converted):
    prompt = "w5 w37 w42 w99"
    result = run_script(
        "generate/base.py", "--checkpoint_path", converted.lit_dir / "lit-llama.pth", "--prompt", prompt,
        "--temperature", "0", "--max_new_tokens", "24", "--precision", "32-true", check=True,
    )
    tokenizer = Tokenizer(converted.lit_dir)
    prompt_ids = tokenizer.encode(prompt).tolist()
    stop_ids = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    with torch.no_grad():
        theirs = converted.hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(stop_ids),
            pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()
    # the CLI prints the prompt and then the continuation's text, a stop token not included
    expected = tokenizer.decode([token for token in theirs if token not in stop_ids])
    assert result.stdout.split() == prompt.split() + expected.split()
    assert len(set(theirs)) > 3  # a model repeating one token would prove little


def test_decode_step_and_chunked_prefill_give_the_full_forwards_numbers(converted):
    """The CLI's tokens came through fast_decode's step; here its numbers, and a KV cache filled several tokens at a
    time (windowed masks over cached keys), against the model without a cache."""
    model = converted.model()
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(idx)
        model.setup_kv_cache(batch_size=1, max_seq_length=24)
        chunks = [model(idx[:, :5], input_pos=0), model(idx[:, 5:13], input_pos=5)]
        assert DecodeStep.for_model(model) is not None
        for mv in (True, False):  # both kernels on any CPU, whichever the step picks here
            step = DecodeStep(model, mv=mv)
            steps = [step(idx[:, i : i + 1], i) for i in range(13, 24)]
            assert_close(torch.cat(chunks + steps, dim=1), full, ulps=64)
    if converted.family == "mistral":  # beyond the window the window matters
        model.config.sliding_window = None
        model.clear_kv_cache()
        with torch.inference_mode():
            unwindowed = model(idx)
        assert_close(unwindowed[:, :6], full[:, :6], ulps=64)
        assert (unwindowed[:, 6:] - full[:, 6:]).abs().max() > 1e-2


def every_lora_target(model: LLaMA) -> list[str]:
    return ["query", "key", "value", "projection", "mlp"] + ([] if model.config.tie_embeddings else ["head"])


def assert_merge_keeps_the_logits(model: LLaMA, method, options, seed: int) -> None:
    """Add `method`'s layers with non-trivial values, then merge them: the logits must not change."""
    method.apply(model, options)
    method.mark_trainable(model)
    torch.manual_seed(seed)
    randomise_trainable(model, std=0.1)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        unmerged = model.eval()(idx)
        merge(model)
        assert_close(model(idx), unmerged)


def test_lora_on_every_target_merges_to_the_same_logits(converted):
    model = converted.model()
    assert_merge_keeps_the_logits(
        model, LORA, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=every_lora_target(model)), seed=3
    )
    if converted.family == "qwen2":  # the biases survive the merge
        assert model.transformer.h[0].attn.q_proj.bias is not None


def test_adapter_v2_merges_to_the_same_logits(converted):
    assert_merge_keeps_the_logits(converted.model(), ADAPTER_V2, AdapterArgs(prompt_length=3, start_layer=1), seed=5)


def test_peft_export_loads_in_transformers_with_the_same_logits(converted, tmp_path):
    peft = pytest.importorskip("peft")
    model = converted.model()
    targets = every_lora_target(model)
    add_lora(model, LoRAArgs(r=4, alpha=16, dropout=0.05, targets=targets))
    LORA.mark_trainable(model)
    torch.manual_seed(7)
    randomise_trainable(model, std=0.1)
    base_path = converted.lit_dir / "lit-llama.pth"
    lora_path = save_finetuned(model, "lora", tmp_path / "out", base_path, r=4, alpha=16, dropout=0.05,
                               targets=targets)
    peft_dir = tmp_path / "peft"
    run_script("scripts/convert_lora_to_peft.py", "--finetuned_path", lora_path, "--output_dir", peft_dir,
               "--base_model_name_or_path", converted.export_dir, check=True)

    base = transformers.AutoModelForCausalLM.from_pretrained(converted.export_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = model.eval()(idx)[..., :VOCAB]
        theirs = peft_model(idx).logits
        with peft_model.disable_adapter():
            without_lora = peft_model(idx).logits
    assert_close(ours, theirs, ulps=HF_ULPS)
    assert (theirs - without_lora).abs().max() > 1e-2  # the export carries a real update


# Exact parameter counts of the published weights: the Hugging Face Hub's safetensors totals (the element counts
# of the released tensors; Qwen2.5-7B: its model.safetensors.index.json total_size 15231233024 bytes / 2 for bf16).
# They round to the model cards' figures: Llama 3.2 1.23B (Meta truncates) and 3.21B; Qwen2.5 0.49B, 1.54B, 7.61B;
# Qwen3 0.6B, 4.0B, 8.2B.
PUBLISHED_PARAMETERS = {
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen3-0.6B": 596_049_920,
    "Qwen3-4B": 4_022_468_096,
    "Qwen3-8B": 8_190_735_360,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_named_config_has_the_published_parameter_count(name):
    config = Config.from_name(name)
    assert config.padded_vocab_size == config.vocab_size  # no padding rows: every parameter is a real one
    with torch.device("meta"):
        assert LLaMA(config).num_parameters() == PUBLISHED_PARAMETERS[name]


# The models' own config.json values (transformers 4.x spelling, as published), trimmed to what the model reads
REAL_CONFIGS = {
    "Llama-3.2-1B": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-06,
        rope_theta=1000000.0, tie_word_embeddings=True, sliding_window=32768, use_sliding_window=False,
        max_window_layers=24,
    ),
    "Qwen3-0.6B": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-06, rope_theta=1000000, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
        sliding_window=None, use_sliding_window=False, max_window_layers=28,
    ),
}


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_a_real_config_json_converts_to_the_named_config(name):
    assert config_from_hf(REAL_CONFIGS[name], name=name) == Config.from_name(name)


@pytest.mark.parametrize("name", ["Llama-3.2-3B", "Qwen2.5-7B", "Qwen3-4B", "tiny"])
def test_named_configs_survive_the_hugging_face_config_round_trip(name):
    config = Config.from_name(name)
    assert config_from_hf(config_to_hf(config), name=name) == config
    windowed = Config.from_name(name, sliding_window=9)
    assert config_from_hf(config_to_hf(windowed), name=name) == windowed


@pytest.mark.parametrize("hf_config, culprit", [
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(model_type="llama", mlp_bias=True), "mlp_bias"),
    (dict(model_type="gemma"), "'gemma'"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1), "max_window_layers 1"),
])
def test_what_no_config_expresses_is_refused_by_name(hf_config, culprit):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UserError, match=culprit):
        config_from_hf({**base, **hf_config})


def test_a_qwen2_window_over_every_layer_converts():
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
    windowed = dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert config_from_hf({**base, **windowed}).sliding_window == 64
    assert config_from_hf({**base, **windowed, "use_sliding_window": False}).sliding_window is None


@pytest.mark.parametrize("features", [dict(attention_bias=True), dict(qk_norm=True, head_size=24)])
def test_a_windowed_qwen_model_computes_what_transformers_does(features):
    """Qwen's classes take a window too (on every layer, as config_to_hf writes it)."""
    from lit_llama.convert import lit_to_hf_name

    torch.manual_seed(9)
    model = LLaMA(Config.from_name("tiny-gqa", vocab_size=VOCAB, sliding_window=7, **features)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(0.5, 1.5) if "norm" in name else param.normal_(std=0.2)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(model.config))
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    state_dict = {lit_to_hf_name(k): v[:VOCAB] if k == "transformer.wte.weight" else v
                  for k, v in model.state_dict().items()}
    hf.load_state_dict(state_dict, strict=False)  # the tied head has no key of its own
    hf.tie_weights()
    idx = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert_close(model(idx)[..., :VOCAB], hf_logits(hf, idx), ulps=HF_ULPS)


def test_a_model_built_on_meta_resets_its_biases_to_zero_and_its_head_norms_to_one():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("tiny", attention_bias=True, qk_norm=True))
    model.to_empty(device="cpu").reset_parameters()
    attn = model.transformer.h[0].attn
    assert all(layer.bias.eq(0).all() for layer in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.q_norm.weight.eq(1).all() and attn.k_norm.weight.eq(1).all() and attn.o_proj.bias is None
