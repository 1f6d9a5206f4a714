import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from lit_llama.checkpoint import load
from lit_llama.files import load_torch, save_torch
from lit_llama.errors import UserError
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import generate
from lit_llama.lora import LORA, LoRAArgs, LoRALinear, add_lora
from lit_llama.method import merge, reset_method_parameters
from lit_llama.model import LLaMA, Config
from lit_llama.prompts import PromptStyle
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned

ALL_TARGETS = ["query", "key", "value", "projection", "mlp", "head"]


def targets_for(config: Config) -> list[str]:
    return [t for t in ALL_TARGETS if not (t == "head" and config.tie_embeddings)]


def tiny_model(name: str) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(Config.from_name(name))


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_zero_B_gives_the_base_output_exactly(name):
    base = tiny_model(name)
    idx = torch.randint(0, 320, (2, 9))
    model = add_lora(copy.deepcopy(base), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=targets_for(base.config)))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == base.config.n_layer * 7 + (not base.config.tie_embeddings)
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in layers)
    assert torch.equal(model(idx), base(idx))
    # with GQA the key/value layers are narrower than the query layer: LoRA must follow each layer's shape
    attn = model.transformer.h[0].attn
    assert attn.k_proj.lora_B.shape == (base.config.n_query_groups * base.config.head_size, 4)
    assert attn.q_proj.lora_B.shape == (base.config.n_embd, 4)


def test_only_lora_parameters_train_and_are_saved():
    model = add_lora(tiny_model("tiny"), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value"]))
    LORA.mark_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{m}_proj.lora_{x}" for i in range(2) for m in "qv" for x in "AB"}
    # gradients reach only LoRA: after a backward pass no base weight has a gradient
    model(torch.randint(0, 320, (1, 5))).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_7B_with_rank_8_on_query_and_value_trains_4_194_304_parameters():
    with torch.device("meta"):
        model = add_lora(LLaMA(Config.from_name("7B")), LoRAArgs(r=8, alpha=16, dropout=0.05, targets=["query", "value"]))
    LORA.mark_trainable(model)
    assert model.num_parameters(trainable_only=True) == 32 * 2 * (8 * 4096 + 4096 * 8) == 4_194_304


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_merge_matches_the_unmerged_model_and_gives_a_plain_base_model(name):
    base = tiny_model(name)
    model = add_lora(copy.deepcopy(base), LoRAArgs(r=4, alpha=8, dropout=0.1, targets=targets_for(base.config)))
    LORA.mark_trainable(model)
    randomise_trainable(model)
    model.eval()  # no dropout: the unmerged output is deterministic
    idx = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        unmerged = model(idx)
        assert (unmerged - base(idx)).abs().max() > 1e-3  # the update really changes the output
        merge(model)
        assert_close(model(idx), unmerged)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}


def test_dropout_applies_to_the_lora_path_only():
    base = tiny_model("tiny")
    model = add_lora(copy.deepcopy(base), LoRAArgs(r=4, alpha=8, dropout=0.5, targets=["query", "value"])).train()
    idx = torch.randint(0, 320, (1, 7))
    assert torch.equal(model(idx), base(idx))  # B = 0: dropout on x must not touch the base path
    randomise_trainable(model)
    assert not torch.equal(model(idx), model(idx))  # training mode: the LoRA path is dropped at random
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_dropout_keeps_the_expected_lora_update():
    """Inverted dropout: each input feature is kept with probability 1 - p and scaled by 1 / (1 - p), so the mean of
    many training-mode LoRA updates is the eval-mode update (the scale folded into the r-wide product included)."""
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4, alpha=8, dropout=0.25).to(torch.bfloat16)
    layer.lora_A.data, layer.lora_B.data = torch.randn(4, 16), torch.randn(8, 4)  # fp32 beside a bf16 weight
    x = torch.randn(1, 16).to(torch.bfloat16)
    base = F.linear(x, layer.weight).float()
    expected = layer.eval()(x).float() - base
    layer.train()
    updates = torch.stack([layer(x).float() - base for _ in range(4000)])
    standard_error = updates.std(0) / len(updates) ** 0.5
    assert ((updates.mean(0) - expected).abs() < 5 * standard_error + 0.02).all()  # 0.02: bf16 rounding of y
    assert ((updates.mean(0) - expected / 0.75).abs() > 5 * standard_error).any()  # a wrong scale would be seen
    dropped_rows = (updates == 0).all(-1).float().mean()  # x A^T is r wide: only an all-dropped x gives exactly 0
    assert dropped_rows < 0.01
    assert layer(x).dtype == torch.bfloat16


def test_impossible_setups_are_refused():
    with pytest.raises(UserError, match="tied embedding"):
        add_lora(tiny_model("tiny-gqa"), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "head"]))
    with pytest.raises(UserError, match="unknown LoRA target"):
        LoRAArgs(targets=["query", "attention"])
    with pytest.raises(UserError, match="rank"):
        LoRAArgs(r=0)


def test_meta_device_build_then_base_weights_then_lora_init():
    base = tiny_model("tiny-gqa")
    with torch.device("meta"):
        model = add_lora(LLaMA(base.config), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "key", "value", "mlp"]))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    assert not unexpected and all(k.endswith(("lora_A", "lora_B")) for k in missing)
    reset_method_parameters(model)
    assert not any(p.is_meta for p in model.parameters())
    idx = torch.randint(0, 320, (2, 9))
    assert torch.equal(model(idx), base(idx))


@pytest.fixture
def lora_run(tmp_path):
    """A base checkpoint and a LoRA finetune of it (random non-zero B), plus the unmerged model in memory."""
    base_path = make_base(tmp_path / "base", "tiny")
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=8, dropout=0.05, targets=["query", "value", "mlp", "head"]))
    LORA.mark_trainable(model)
    torch.manual_seed(1)
    randomise_trainable(model)
    lora_path = save_finetuned(
        model, "lora", tmp_path / "out", base_path, r=4, alpha=8, dropout=0.05, targets=["query", "value", "mlp", "head"]
    )
    return base_path, lora_path, model.eval()


def test_load_finetuned_rebuilds_the_model(lora_run):
    base_path, lora_path, unmerged = lora_run
    model, tokenizer, record = load_finetuned(lora_path)  # the base comes from finetune_config.json
    assert record["lora"]["alpha"] == 8 and record["prompt_style"] == "alpaca"
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged for generation
    idx = tokenizer.encode("Sort these words.").unsqueeze(0)
    with torch.no_grad():
        assert_close(model(idx), unmerged(idx))


def test_load_finetuned_refuses_weights_that_do_not_fit(lora_run, tmp_path):
    base_path, lora_path, _ = lora_run
    weights = load_torch(lora_path)
    weights["transformer.h.0.attn.q_proj.lora_A"] = torch.zeros(4, 32)
    save_torch(weights, lora_path)  # a new file: the old one stays mapped
    with pytest.raises(UserError, match=r"transformer.h.0.attn.q_proj.lora_A has shape \(4, 32\).*needs \(4, 64\)"):
        load_finetuned(lora_path, base_path)
    (lora_path.parent / "finetune_config.json").unlink()
    with pytest.raises(UserError, match="no finetune_config.json"):
        load_finetuned(lora_path, base_path)
    with pytest.raises(UserError, match="finetuned weights not found"):
        load_finetuned(tmp_path / "missing.pth", base_path)


def test_merge_script_writes_a_standalone_checkpoint(lora_run, tmp_path, script):
    base_path, lora_path, unmerged = lora_run
    out = tmp_path / "merged"
    script("scripts/merge_lora.py", "--finetuned_path", lora_path, "--checkpoint_path", base_path, "--output_dir", out,
           check=True)
    assert sorted(p.name for p in out.iterdir()) == ["lit-llama.pth", "model_config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    merged, tokenizer = load(out / "lit-llama.pth")
    idx = tokenizer.encode("The quick brown fox").unsqueeze(0)
    with torch.no_grad():
        assert_close(merged(idx), unmerged(idx))
    assert set(load_torch(out / "lit-llama.pth")) == set(load_torch(base_path))


def test_generate_lora_prints_only_the_response(lora_run, script):
    base_path, lora_path, unmerged = lora_run
    result = script("generate/lora.py", "--finetuned_path", lora_path, "--prompt", "Sort these words.", "--input", "a b",
                    "--max_new_tokens", 8, "--temperature", 0, "--precision", "32-true", check=True)
    tokenizer = load(base_path)[1]
    prompt = PromptStyle.from_name("alpaca").apply("Sort these words.", "a b")
    expected = list(generate(unmerged, tokenizer.encode(prompt), 8, temperature=0, eos_id=tokenizer.eos_id))
    assert result.stdout == tokenizer.decode(expected) + "\n"
    assert "tokens/sec" in result.stderr and "### Instruction" not in result.stdout


def test_lora_from_a_different_base_is_a_one_line_error(lora_run, tmp_path, script):
    _, lora_path, _ = lora_run
    other_base = make_base(tmp_path / "other", "tiny-gqa")
    result = script("generate/lora.py", "--finetuned_path", lora_path, "--checkpoint_path", other_base)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "finetuned from a different base model" in result.stderr
