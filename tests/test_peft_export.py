"""LoRA weights exported for Hugging Face PEFT give, on transformers' Llama, the logits our unmerged model gives."""
import json

import pytest
import torch

from lit_llama.lora import LORA, LoRAArgs, add_lora
from conftest import HF_ULPS, assert_close
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "name, targets",
    [("tiny", ["query", "value"]), ("tiny-gqa-untied", ["query", "key", "value", "projection", "mlp", "head"])],
)
def test_peft_loads_our_lora_with_the_same_logits(name, targets, tmp_path, script):
    base_path = make_base(tmp_path / "base", name)
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=16, dropout=0.05, targets=targets))
    LORA.mark_trainable(model)
    torch.manual_seed(2)
    randomise_trainable(model, std=0.1)  # B != 0, so the adapter really changes the output
    lora_path = save_finetuned(model, "lora", tmp_path / "out", base_path, r=4, alpha=16, dropout=0.05,
                               targets=targets)
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    script("scripts/convert_lit_checkpoint.py", "--checkpoint_path", base_path, "--output_dir", hf_dir, check=True)
    script("scripts/convert_lora_to_peft.py", "--finetuned_path", lora_path, "--output_dir", peft_dir,
           "--base_model_name_or_path", hf_dir, check=True)

    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_model, peft_dir).eval()
    lora_modules = [n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_modules) == sum(1 for k in torch.load(lora_path, weights_only=True) if k.endswith("lora_A"))

    idx = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ours = model.eval()(idx)[..., : model.config.vocab_size]
        theirs = peft_model(idx).logits
        with peft_model.disable_adapter():
            without_lora = peft_model(idx).logits
    assert_close(ours, theirs, ulps=HF_ULPS)
    assert (theirs - without_lora).abs().max() > 1e-2  # the export carries a real update
