"""QLoRA through the scripts users run: finetune/lora.py --quantize trains LoRA over a quantized frozen base, resumes
bit-exactly, shards over two processes like one, and its result generates, evaluates and merges; generate/base.py
--quantize runs weight-only int8; impossible requests are one line."""
import json

import pytest
import torch

from conftest import assert_close, run_script
from lit_llama.finetuned import load_finetuned
from lit_llama.lora import LoRAArgs, add_lora
from lit_llama.quantize import is_quantized, quantize_frozen
from tiny_finetunes import load_base
from tiny_runs import as_args, finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)

pytest.importorskip("torchao")
FINAL = "lit-llama-lora-finetuned.pth"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


def qlora_settings(inputs, out_dir, **overrides):
    checkpoint_path, data_dir = inputs
    options = dict(precision="32-true", quantize="nf4-dq", learning_rate=0.02, warmup_steps=0, lora_mlp=True,
                   max_steps=4, eval_interval=4, save_interval=2)
    options = {key: value for key, value in (options | overrides).items() if value is not None}
    return settings(checkpoint_path, data_dir, out_dir, **options)


def test_qlora_run_resumes_bit_exactly_and_its_result_is_the_quantized_function(inputs, tmp_path, single_thread):
    finetune_main("lora")(**qlora_settings(inputs, tmp_path / "straight"))
    finetune_main("lora")(**qlora_settings(inputs, tmp_path / "resumed", max_steps=2))
    finetune_main("lora")(**qlora_settings(inputs, tmp_path / "resumed", resume="auto"))
    straight = torch.load(tmp_path / "straight" / FINAL, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / FINAL, weights_only=True)
    assert straight.keys() == resumed.keys() and all(k.endswith(("lora_A", "lora_B")) for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    record = json.loads((tmp_path / "straight" / "finetune_config.json").read_text())
    assert record["quantize"] == "nf4-dq"

    # loaded for inference: plain weights, the LoRA update added to the dequantized base it was trained against
    merged, tokenizer, _ = load_finetuned(tmp_path / "straight" / FINAL)
    assert not any(is_quantized(p) for p in merged.parameters())
    reference = add_lora(load_base(inputs[0]), LoRAArgs(**record["lora"]))
    reference.load_state_dict(straight, strict=False)
    quantize_frozen(reference.requires_grad_(False), "nf4-dq")
    idx = tokenizer.encode("Repeat the words twice.").unsqueeze(0)
    with torch.no_grad():
        assert_close(merged(idx), reference.eval()(idx))


def test_qlora_result_generates_evaluates_and_merges_through_the_scripts(inputs, tmp_path, single_thread):
    finetune_main("lora")(**qlora_settings(inputs, tmp_path / "out", quantize="nf4"))
    weights = tmp_path / "out" / FINAL
    run_script("generate/lora.py", "--finetuned_path", weights, "--max_new_tokens", 4, "--temperature", 0, check=True)
    run_script("scripts/merge_lora.py", "--finetuned_path", weights, "--output_dir", tmp_path / "merged", check=True)
    merged = load_base(tmp_path / "merged" / "lit-llama.pth")
    assert all(type(p.data) is torch.Tensor for p in merged.parameters())
    test_records = inputs[1] / "test.json"
    run_script("scripts/evaluate_tasks.py", "--finetuned_path", weights, "--data_file", test_records,
               "--max_new_tokens", 4, "--output_json", tmp_path / "eval.json", check=True)
    assert json.loads((tmp_path / "eval.json").read_text())["records"] == 8


def test_two_processes_train_a_qlora_run_like_one(inputs, tmp_path, single_thread):
    # no dropout: each process draws its own masks (as in test_multiprocess.py), and Adam's first steps turn any
    # difference in a gradient's sign into 2 * learning_rate
    options = dict(max_steps=2, eval_interval=2, lora_dropout=0.0)
    run_script("finetune/lora.py", *as_args(qlora_settings(inputs, tmp_path / "two", devices=2, **options)), check=True)
    finetune_main("lora")(**qlora_settings(inputs, tmp_path / "one", **options))
    one = torch.load(tmp_path / "one" / FINAL, weights_only=True)
    two = torch.load(tmp_path / "two" / FINAL, weights_only=True)
    assert one.keys() == two.keys()
    # AdamW divides each gradient by its own size plus eps (1e-8): a gradient within a few eps of zero (here 1.8e-8)
    # turns a rounding difference of 3e-11 into 6e-6 of its weight, a thousandth of a step; a real mismatch (another
    # base, other dropout masks) moves weights by whole steps (up to 2 * learning_rate = 0.04)
    for key in one:
        assert_close(two[key], one[key], ulps=2**14)


def test_impossible_quantization_requests_are_one_line(inputs, tmp_path):
    full = run_script("finetune/full.py", *as_args(qlora_settings(inputs, tmp_path / "full", lora_mlp=None)))
    assert full.returncode == 2 and full.stderr.strip().splitlines()[-1].startswith("error: --quantize nf4-dq freezes")
    unknown = run_script("finetune/lora.py", *as_args(qlora_settings(inputs, tmp_path / "x", quantize="nf3")))
    assert unknown.returncode == 2 and "error: unknown --quantize 'nf3'" in unknown.stderr
    assert not (tmp_path / "full").exists() and not (tmp_path / "x").exists()
    bad = run_script("generate/base.py", "--checkpoint_path", inputs[0], "--quantize", "nf4")
    assert bad.returncode == 2 and "error: unknown --quantize 'nf4' for generation" in bad.stderr


def test_generate_base_with_int8_weights(inputs):
    result = run_script("generate/base.py", "--checkpoint_path", inputs[0], "--quantize", "int8", "--prompt", "red fox",
                        "--max_new_tokens", 5, "--temperature", 0, "--precision", "bf16-true", check=True)
    assert result.stdout.startswith("red fox") and "tokens/sec" in result.stderr
