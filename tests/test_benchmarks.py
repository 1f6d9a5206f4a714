"""The benchmarks' own mechanics: the shared workload and batches, the summary, the memory model and FLOP count,
and a smoke run of the GPU benchmark on CPU with a tiny model."""
import json
import math
import sys

import pytest
import torch

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
from common import IGNORE_INDEX, batches  # noqa: E402
from gpu_lora_7b import step_flops  # noqa: E402
from lora_training import alpaca_like_samples, summarize  # noqa: E402
from memory_7b import memory_model, predict, random_lora_model, saved_activation_bytes, train_step  # noqa: E402

from lit_llama.model import Config  # noqa: E402


def test_alpaca_like_samples_are_deterministic_and_masked():
    samples = alpaca_like_samples(50, vocab_size=320, max_seq_length=96, seed=3)
    assert samples == alpaca_like_samples(50, vocab_size=320, max_seq_length=96, seed=3)
    assert samples != alpaca_like_samples(50, vocab_size=320, max_seq_length=96, seed=4)
    for s in samples:
        ids, labels = s["input_ids"], s["labels"]
        assert 24 <= len(ids) <= 96 and len(labels) == len(ids) and max(ids) < 320
        prompt = labels.count(IGNORE_INDEX)
        assert 0 < prompt < len(ids) and labels[:prompt] == [IGNORE_INDEX] * prompt and labels[prompt:] == ids[prompt:]


def test_batches_pad_dynamically_and_shift_targets():
    samples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 4], "labels": [4, 4]},  # a third sample cannot fill a micro-batch of 2: left out
    ]
    (batch,) = list(batches(samples, micro_batch=2))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 2, 3, -100, -100]]
    assert batch["inputs"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert batch["targets"].tolist() == [[-100, 7, 8, 9], [2, 3, -100, -100]]
    assert batch["useful_tokens"] == 4 + 2


def test_summarize_reports_medians_and_paired_ratios():
    results = [
        dict(tool=tool, tokens_per_s=speed, peak_rss_mb=rss, rss_between_steps_mb=rss / 2, first_loss=1.0)
        for tool, speed, rss in [
            ("lit-llama", 30, 100), ("hf+peft", 10, 200), ("lit-llama", 20, 100), ("hf+peft", 20, 200),
            ("lit-llama", 40, 100), ("hf+peft", 20, 100),
        ]
    ]
    summary = summarize(results, ["lit-llama", "hf+peft"])
    assert summary["lit-llama"]["tokens_per_s_median"] == 30 and summary["hf+peft"]["tokens_per_s_median"] == 20
    assert summary["hf+peft"]["ours_speedup_median"] == 1.5
    assert (summary["hf+peft"]["ours_speedup_per_round_min"], summary["hf+peft"]["ours_speedup_per_round_max"]) == (1, 3)
    assert summary["hf+peft"]["ours_rss_ratio"] == 0.5


def test_step_flops_counts_frozen_matmuls_lora_and_attention():
    config = Config.from_name("tiny")
    model = random_lora_model(config, 8, 16, "cpu", activation_checkpointing=False)
    C, I, L, V = config.n_embd, config.intermediate_size, config.n_layer, config.padded_vocab_size
    n_mm = L * (4 * C * C + 3 * C * I) + V * C  # tiny: MHA, so k and v are C x C too
    n_lora = L * 2 * 8 * (C + C)
    B, T = 2, 16
    assert step_flops(model, B, T) == B * T * (4 * n_mm + 6 * n_lora) + L * 6 * B * T * T * C


def test_memory_model_counts_saved_activations_per_token():
    config = Config.from_name("tiny")
    # flash/efficient attention saves O(T) state, so saved bytes grow linearly with the tokens
    one, two = saved_activation_bytes(config, 1, 1, 32), saved_activation_bytes(config, 1, 2, 32)
    assert two == pytest.approx(2 * one, rel=0.05)
    m = memory_model(config, lora_r=8, probe_tokens=32)
    assert m["a_layer"] > 10 * config.n_embd  # at least the bf16 outputs of a block's seven projections
    without, with_ac = predict(m, config, 4096, False), predict(m, config, 4096, True)
    assert with_ac["total"] < without["total"] and with_ac["weights"] == without["weights"] == 2 * m["n_frozen"]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_benchmark_smoke_on_cpu(quantize):
    result = run_script(
        "benchmarks/gpu_lora_7b.py", "--config_name", "tiny", "--device", "cpu", "--compile", "false",
        "--seq_length", "32", "--warmup", "1", "--steps", "2", "--new_tokens", "8",
        *(["--quantize", quantize] if quantize else []),
    )
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    numbers = json.loads(line[len("RESULT ") :])
    assert numbers["tokens_per_s"] > 0 and numbers["mfu"] > 0 and numbers["generate_eager_tokens_per_s"] > 0
    assert math.isfinite(numbers["loss"]) and numbers["peak_memory_gib"] > 0 and numbers["quantize"] == quantize
    if quantize is None:
        return
    bad = run_script("benchmarks/gpu_lora_7b.py", "--config_name", "tiny", "--device", "cpu", "--quantize", "nf5")
    assert bad.returncode == 2 and "unknown --quantize 'nf5'" in bad.stderr


def test_the_qlora_benchmark_model_is_quantized_block_by_block_and_trains():
    from lit_llama.quantize import block_linear_names, is_quantized

    model = random_lora_model(Config.from_name("tiny"), 8, 16, "cpu", activation_checkpointing=False, quantize="nf4")
    names = block_linear_names(model.module)
    assert names and all(is_quantized(model.module.get_submodule(name).weight) for name in names)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    before = [p.detach().clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    losses = [train_step(model, optimizer, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
              for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))

    too_long = run_script("benchmarks/gpu_lora_7b.py", "--config_name", "tiny", "--device", "cpu", "--seq_length", "500")
    assert too_long.returncode == 2 and too_long.stderr.startswith("error:") and "block_size" in too_long.stderr


def test_decode_step_before_after_smoke(tmp_path):
    result = run_script(
        "benchmarks/decode_step.py", "--checkpoint_dir", str(tmp_path / "absent"), "--config_name", "tiny",
        "--position", "8", "--greedy_tokens", "4", "--rounds", "2", "--steps_per_round", "1", "--compile", "false",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row[0].strip() for row in rows] == ["baseline", "plain model", "fast_decode, torch.mv",
                                                "fast_decode, F.linear"]
    # the random weights are the same for all, so are the greedy tokens (fp32 init, bf16 run)
    assert all(row[3].strip() == "True" for row in rows)


def test_the_qlora_throughput_benchmark_refuses_what_the_tools_do_not_share():
    for flags, message in [(["--quantize", "int4"], "unknown --quantize 'int4'"),
                           (["--quantize", "nf4", "--tools", "[lit-llama,litgpt]"], "litgpt's NF4 needs CUDA")]:
        result = run_script("benchmarks/lora_training.py", *flags)
        assert result.returncode == 2 and result.stderr.startswith("error:") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_matvec_benchmark_times_the_decode_steps_shapes_and_products():
    from matvec_kernels import block_shapes, reduction
    from lit_llama.fast_decode import DecodeStep
    from lit_llama.model import LLaMA

    config = Config.from_name("tiny-gqa")
    model = LLaMA(config).to(torch.bfloat16).requires_grad_(False)
    model.setup_kv_cache(batch_size=1, max_seq_length=8)
    layer = DecodeStep(model).layers[0]
    assert block_shapes(config) == [tuple(m.shape) for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    # bf16 products of 64 terms: the two kernels' summation orders differ by a few bf16 ulps of the result
    torch.testing.assert_close(reduction(x, weight, torch.ones(96, dtype=torch.bfloat16)), torch.mv(weight, x),
                               atol=0.1, rtol=2e-2)
    codes, scales = torch.randint(-127, 128, (96, 64), dtype=torch.int8), torch.rand(96, dtype=torch.bfloat16) / 127
    torch.testing.assert_close(reduction(x, codes, scales),
                               torch._weight_int8pack_mm(x.unsqueeze(0), codes, scales).view(-1), atol=0.05, rtol=2e-2)


def test_the_decode_breakdown_parts_add_up_to_the_whole_token(tmp_path):
    result = run_script("benchmarks/decode_breakdown.py", "--checkpoint_dir", str(tmp_path / "absent"),
                        "--rounds", "1", "--tokens", "3")
    assert result.returncode == 0, result.stderr
    rows = {row[0].strip(): row[1:] for row in (line.split("|")[1:-1] for line in result.stdout.splitlines()
                                                 if line.startswith("| bf16") or line.startswith("| int8"))}
    for mode in ("bf16", "int8"):
        whole, *parts = rows[mode]
        assert math.isclose(float(whole.split()[0]), sum(float(part) for part in parts), abs_tol=0.02)  # 2 decimals
    assert set(rows) == {"bf16", "int8", "bf16 / int8"}
