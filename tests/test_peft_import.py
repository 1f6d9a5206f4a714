"""PEFT LoRA adapters come in as our LoRA weights: an adapter made by `peft` gives transformers+peft's logits through
load_finetuned, ours -> PEFT -> ours is bit-exact, and what our LoRA cannot compute is refused in one line."""
import importlib.util
import json
import re
import shutil

import pytest
import torch

from conftest import HF_ULPS, REPO, assert_close
from lit_llama.errors import UserError
from lit_llama.finetuned import base_fingerprint, load_finetuned
from lit_llama.lora import LORA, LoRAArgs, add_lora
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned
from tiny_tokenizers import make_byte_level_bpe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def import_script():
    spec = importlib.util.spec_from_file_location("convert_peft_to_lora", REPO / "scripts" / "convert_peft_to_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("modules, tied", [(["q_proj", "v_proj"], True), (ALL_MODULES, False)])
def test_an_adapter_made_by_peft_gives_its_logits_through_load_finetuned(modules, tied, tmp_path, script):
    hf_dir, lit_dir, peft_dir, out = tmp_path / "hf", tmp_path / "lit", tmp_path / "peft", tmp_path / "out"
    make_byte_level_bpe(hf_dir)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(hf_dir)
    script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", lit_dir, check=True)

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=modules, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_model, lora)
    with torch.no_grad():  # PEFT starts B at zero: give the adapter a real update
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(peft_dir)
    script("scripts/convert_peft_to_lora.py", "--adapter_dir", peft_dir, "--checkpoint_path", lit_dir / "lit-llama.pth",
           "--output_dir", out, "--prompt_style", "chatml", check=True)

    ours, _, record = load_finetuned(out / "lit-llama-lora-finetuned.pth", dtype=torch.float32)
    assert (record["lora"]["r"], record["lora"]["alpha"], record["lora"]["dropout"]) == (4, 8, 0.1)
    assert record["prompt_style"] == "chatml"
    idx = torch.randint(0, 400, (2, 13))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(idx).logits
        with peft_model.disable_adapter():
            without_adapter = peft_model(idx).logits
        assert_close(ours(idx)[..., :400], theirs, ulps=HF_ULPS)
    assert (theirs - without_adapter).abs().max() > 1e-2  # the adapter changes the output


def our_lora(tmp_path, name="tiny-gqa-untied", targets=("query", "key", "value", "projection", "mlp", "head")):
    base_path = make_base(tmp_path / "base", name)
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=16, dropout=0.05, targets=list(targets)))
    LORA.mark_trainable(model)
    torch.manual_seed(3)
    randomise_trainable(model, std=0.1)
    lora_path = save_finetuned(model, "lora", tmp_path / "ours", base_path, r=4, alpha=16, dropout=0.05,
                               targets=list(targets))
    return base_path, lora_path


def test_ours_to_peft_and_back_is_bit_exact(tmp_path, script):
    base_path, lora_path = our_lora(tmp_path)
    script("scripts/convert_lora_to_peft.py", "--finetuned_path", lora_path, "--output_dir", tmp_path / "peft", check=True)
    script("scripts/convert_peft_to_lora.py", "--adapter_dir", tmp_path / "peft", "--checkpoint_path", base_path,
           "--output_dir", tmp_path / "back", "--prompt_style", "alpaca", check=True)

    original = torch.load(lora_path, weights_only=True)
    back = torch.load(tmp_path / "back" / "lit-llama-lora-finetuned.pth", weights_only=True)
    assert back.keys() == original.keys()
    vocab = json.loads((base_path.parent / "model_config.json").read_text())["vocab_size"]
    for key, tensor in original.items():
        if key == "lm_head.lora_B":  # PEFT's head has no padding rows: they come back as zeros
            assert torch.equal(back[key][:vocab], tensor[:vocab]) and not back[key][vocab:].any()
        else:
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    record = json.loads((tmp_path / "back" / "finetune_config.json").read_text())
    expected = json.loads((lora_path.parent / "finetune_config.json").read_text())
    assert record.pop("base_fingerprint") == base_fingerprint(torch.load(base_path, weights_only=True))
    assert {k: v for k, v in record.items() if k != "lora"} == {k: v for k, v in expected.items() if k != "lora"}
    assert sorted(record["lora"]["targets"]) == sorted(expected["lora"]["targets"])
    assert {k: record["lora"][k] for k in ("r", "alpha", "dropout")} == {"r": 4, "alpha": 16, "dropout": 0.05}


@pytest.fixture
def peft_adapter(tmp_path, script):
    base_path, lora_path = our_lora(tmp_path, targets=("query", "value"))
    script("scripts/convert_lora_to_peft.py", "--finetuned_path", lora_path, "--output_dir", tmp_path / "peft", check=True)
    return base_path, tmp_path / "peft"


@pytest.mark.parametrize(
    "change, named",
    [
        ({"use_dora": True}, "DoRA"),
        ({"use_rslora": True}, "rsLoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, "'embed_tokens'"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_peft_options_our_lora_does_not_compute_are_refused_by_name(change, named, peft_adapter, tmp_path):
    base_path, adapter_dir = peft_adapter
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(UserError, match=named.replace("(", r"\(")) as error:
        import_script().main(adapter_dir, base_path, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_tensors_of_modules_we_lack_are_refused(peft_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    base_path, adapter_dir = peft_adapter
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 320)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="embed_tokens"):
        import_script().main(adapter_dir, base_path, tmp_path / "out")


def test_an_adapter_of_another_base_or_a_missing_file_gets_one_line(peft_adapter, tmp_path, script):
    _, adapter_dir = peft_adapter  # trained on tiny-gqa-untied: 2 key/value heads, so k/v have other shapes
    other_base = make_base(tmp_path / "other", "tiny")
    result = script("scripts/convert_peft_to_lora.py", "--adapter_dir", adapter_dir, "--checkpoint_path", other_base,
                    "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "shape" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()

    shutil.copytree(adapter_dir, tmp_path / "incomplete")
    (tmp_path / "incomplete" / "adapter_model.safetensors").unlink()
    result = script("scripts/convert_peft_to_lora.py", "--adapter_dir", tmp_path / "incomplete", "--checkpoint_path",
                    other_base, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "no adapter_model.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, named", [
    ({"r": "8"}, "r must be a whole number"), ({"r": 0}, "r must be a whole number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number"),
    ({"lora_dropout": 1.5}, "lora_dropout must be a number in [0, 1)"),
    ({"target_modules": 7}, "target_modules must be"), ({"base_model_name_or_path": 3}, "base_model_name_or_path"),
])
def test_adapter_config_fields_are_checked_one_by_one(change, named, peft_adapter, tmp_path):
    base_path, adapter_dir = peft_adapter
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(UserError, match=re.escape(named)):
        import_script().main(adapter_dir, base_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spoil, named", [(lambda t: t.fill_(float("nan")), "NaN or infinite"),
                                          (lambda t: t.to(torch.int8), "int8 values")])
def test_nan_or_integer_lora_tensors_are_refused(spoil, named, peft_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    base_path, adapter_dir = peft_adapter
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = spoil(tensors[name].clone())
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=named):
        import_script().main(adapter_dir, base_path, tmp_path / "out")


def test_an_adapter_imported_onto_a_same_shape_base_with_other_weights_is_warned_about(peft_adapter, tmp_path,
                                                                                        capsys):
    base_path, adapter_dir = peft_adapter  # adapter_config.json names base_path's directory
    other = tmp_path / "other"
    shutil.copytree(base_path.parent, other)
    weights = torch.load(other / "lit-llama.pth", weights_only=True)
    torch.save({k: v + 0.5 for k, v in weights.items()}, other / "lit-llama.pth")
    import_script().main(adapter_dir, other / "lit-llama.pth", tmp_path / "out")
    assert "whose weights are not those of" in capsys.readouterr().err
    import_script().main(adapter_dir, base_path, tmp_path / "same")
    assert "warning" not in capsys.readouterr().err
    load_finetuned(tmp_path / "same" / "lit-llama-lora-finetuned.pth", other / "lit-llama.pth")
    assert "is not the base" in capsys.readouterr().err  # the imported record carries the base's fingerprint
