import copy

import pytest
import torch

from conftest import assert_close
from lit_llama.adapter import ADAPTER, AdapterArgs, AdapterAttention, add_adapter
from lit_llama.adapter_v2 import ADAPTER_V2, AdapterV2Linear, add_adapter_v2
from lit_llama.checkpoint import load
from lit_llama.errors import UserError
from lit_llama.finetuned import METHODS, load_finetuned
from lit_llama.method import merge, reset_method_parameters
from lit_llama.generation import generate
from lit_llama.model import LLaMA, Config
from lit_llama.prompts import PromptStyle
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned

ADAPTERS = ["adapter", "adapter_v2"]


def tiny_model(name: str) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(Config.from_name(name))


def finetuned_copy(base: LLaMA, method: str, start_layer: int = 1) -> LLaMA:
    """An adapter model with random non-zero prompts, gates, scales and biases."""
    model = copy.deepcopy(base)
    METHODS[method].apply(model, AdapterArgs(prompt_length=5, start_layer=start_layer))
    METHODS[method].mark_trainable(model)
    randomise_trainable(model, std=0.3)
    return model.eval()


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_zero_gates_give_the_base_output_exactly(method, name):
    base = tiny_model(name)
    model = copy.deepcopy(base)
    METHODS[method].apply(model, AdapterArgs(prompt_length=5, start_layer=0))
    adapted = [m for m in model.modules() if isinstance(m, AdapterAttention)]
    assert len(adapted) == base.config.n_layer and all(m.adapter_wte.weight.std() > 0.5 for m in adapted)
    idx = torch.randint(0, 320, (2, 9))
    assert torch.equal(model(idx), base(idx))
    finetuned = finetuned_copy(base, method, start_layer=0)
    assert (finetuned(idx) - base(idx)).abs().max() > 1e-3  # once the gates open, the prompt matters


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kv_cache_generation_matches_full_recomputation(method, name):
    model = finetuned_copy(tiny_model(name), method)
    prompt = torch.randint(0, 320, (6,))
    cached = list(generate(model, prompt, max_new_tokens=10, temperature=0))
    tokens = prompt.tolist()
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence every step
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, :320].argmax()))
    assert cached == tokens[6:]


def test_trainable_parameters_of_each_version():
    model = add_adapter(tiny_model("tiny"), AdapterArgs(prompt_length=5, start_layer=1))
    ADAPTER.mark_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "transformer.h.1.attn.adapter_wte.weight", "transformer.h.1.attn.adapter_gate"
    }
    assert model.transformer.h[1].attn.adapter_gate.shape == (4,)  # one gate per head

    model = add_adapter_v2(tiny_model("tiny-gqa"), AdapterArgs(prompt_length=5, start_layer=1))
    ADAPTER_V2.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    linears = [f"transformer.h.{i}.{m}" for i in range(2) for m in
               ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj")]
    norms = [f"transformer.h.{i}.norm_{j}.weight" for i in range(2) for j in (1, 2)] + ["transformer.ln_f.weight"]
    assert trainable == {"transformer.h.1.attn.adapter_wte.weight", "transformer.h.1.attn.adapter_gate", *norms,
                         *(f"{m}.adapter_{x}" for m in linears for x in ("scale", "bias"))}
    model(torch.randint(0, 320, (1, 5))).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_impossible_setups_are_refused():
    with pytest.raises(UserError, match="start_layer 2 leaves no layer"):
        add_adapter(tiny_model("tiny"), AdapterArgs(prompt_length=5, start_layer=2))
    with pytest.raises(UserError, match="prompt_length"):
        add_adapter_v2(tiny_model("tiny"), AdapterArgs(prompt_length=0, start_layer=0))


def test_v2_scale_and_bias_merge_into_the_weights():
    model = finetuned_copy(tiny_model("tiny"), "adapter_v2")
    idx = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        before = model(idx)
        merge(model)
        assert not any(isinstance(m, AdapterV2Linear) for m in model.modules())
        assert_close(model(idx), before)


def test_meta_device_build_then_base_weights_then_adapter_init():
    base = tiny_model("tiny-gqa")
    with torch.device("meta"):
        model = add_adapter_v2(LLaMA(base.config), AdapterArgs(prompt_length=5, start_layer=0))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    assert not unexpected and all("adapter_" in k for k in missing)
    reset_method_parameters(model)
    assert not any(p.is_meta for p in model.parameters())
    idx = torch.randint(0, 320, (2, 9))
    assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("method", ["adapter", "adapter_v2", "full"])
def test_load_finetuned_rebuilds_each_method(method, tmp_path):
    base_path = make_base(tmp_path / "base", "tiny-gqa")
    if method == "full":
        model = load_base(base_path)
        METHODS["full"].mark_trainable(model)
        randomise_trainable(model)
        path = save_finetuned(model, method, tmp_path / "out", base_path)
    else:
        model = finetuned_copy(load_base(base_path), method)
        path = save_finetuned(model, method, tmp_path / "out", base_path, prompt_length=5, start_layer=1)
    loaded, tokenizer, record = load_finetuned(path, base_path)
    assert record["method"] == method
    idx = tokenizer.encode("Sort these words.").unsqueeze(0)
    with torch.no_grad():
        assert_close(loaded(idx), model(idx))
    with pytest.raises(UserError, match=f"holds {method} weights, not lora"):
        load_finetuned(path, base_path, method="lora")


def test_generate_adapter_script(tmp_path, script):
    base_path = make_base(tmp_path / "base", "tiny")
    model = finetuned_copy(load_base(base_path), "adapter")
    path = save_finetuned(model, "adapter", tmp_path / "out", base_path, prompt_length=5, start_layer=1)
    options = ["--prompt", "Sort these words.", "--max_new_tokens", 5, "--temperature", 0, "--precision", "32-true"]
    result = script("generate/adapter.py", "--finetuned_path", path, *options, check=True)
    tokenizer = load(base_path)[1]
    prompt = tokenizer.encode(PromptStyle.from_name("alpaca").apply("Sort these words."))
    expected = list(generate(model, prompt, 5, temperature=0, eos_id=tokenizer.eos_id))
    assert result.stdout == tokenizer.decode(expected) + "\n"
    assert "tokens/sec" in result.stderr
    # every entry point reads the method from finetune_config.json: the same answer from generate/finetuned.py
    assert script("generate/finetuned.py", "--finetuned_path", path, *options, check=True).stdout == result.stdout
