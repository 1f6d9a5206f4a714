"""Precision and kernels by what the CPU can do: each choice forced through LIT_LLAMA_NATIVE_BF16 (the capability
mocked), so that every path runs whichever CPU the suite lands on."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, run_script
from lit_llama import fast_decode, precision, quantize
from lit_llama.errors import UserError
from lit_llama.precision import FP32_PRODUCT_MIN_ROWS, Fp32Products, describe, products_for, resolve_precision
from test_generate import checkpoint, tiny_model  # noqa: F401 (checkpoint: a fixture)


@pytest.fixture(params=["0", "1"], ids=["bf16-not-native", "bf16-native"])
def native(request, monkeypatch):
    """Each test runs as a CPU without native bf16 (AVX2 only) would, and as one with it."""
    monkeypatch.setenv("LIT_LLAMA_NATIVE_BF16", request.param)
    return request.param == "1"


def test_training_computes_in_bf16_only_where_bf16_is_native(native):
    assert resolve_precision(None) == ("bf16-true" if native else "32-true")
    assert resolve_precision(None, mixed=True) == ("bf16-mixed" if native else "32-true")


def test_generation_holds_bf16_weights_on_every_cpu(native):
    """Decoding one sequence reads every weight per token: bf16's half of fp32's bytes wins with or without
    native bf16; forwards of many rows then run their products in fp32 where bf16 is not native."""
    assert resolve_precision(None, decoding=True) == "bf16-true"
    bf16, fp32 = torch.ones(2, dtype=torch.bfloat16), torch.ones(2)
    assert isinstance(products_for(FP32_PRODUCT_MIN_ROWS, bf16), Fp32Products) != native
    assert not isinstance(products_for(FP32_PRODUCT_MIN_ROWS - 1, bf16), Fp32Products)  # one-token decode steps
    assert not isinstance(products_for(512, fp32), Fp32Products)


def test_a_precision_the_user_names_is_kept(native):
    assert resolve_precision("bf16-true") == "bf16-true"
    assert resolve_precision("32-true", decoding=True) == "32-true"


def test_a_bad_forcing_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LIT_LLAMA_NATIVE_BF16", "yes")
    with pytest.raises(UserError, match="LIT_LLAMA_NATIVE_BF16 must be 0 or 1"):
        resolve_precision(None)


def test_the_start_line_names_precision_cpu_flags_and_threads(native):
    line = describe("bf16-true", torch.device("cpu"))
    assert line.startswith("precision bf16-true (") and f"{torch.get_num_threads()} threads" in line
    assert "avx2" in line and "LIT_LLAMA_NATIVE_BF16" in line
    assert ("products of many rows in fp32" in line) != native
    assert "slower than --precision 32-true" in describe("bf16-true", torch.device("cpu"), training=True) or native
    assert "fp32" in describe("32-true", torch.device("cpu"))


@pytest.mark.parametrize("rows", [1, FP32_PRODUCT_MIN_ROWS - 1, FP32_PRODUCT_MIN_ROWS, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_products_are_a_bf16_product_summed_in_fp32(rows, bias):
    """From FP32_PRODUCT_MIN_ROWS rows on, the product is the fp32 product of the bf16 numbers rounded to bf16 (as a
    native bf16 kernel computes it); below, the bf16 kernel runs as it is. Either way the same numbers within bf16's
    rounding of the fp32 product."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 48, generator=generator).bfloat16()[:1]
    weight = torch.randn(40, 48, generator=generator).bfloat16()
    b = torch.randn(40, generator=generator).bfloat16() if bias else None
    with torch.inference_mode(), Fp32Products():
        y = F.linear(x, weight, b)
        again = F.linear(x, weight, b)  # the scratch buffer reused
    exact = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert y.dtype == torch.bfloat16 and torch.equal(y, again)
    if rows >= FP32_PRODUCT_MIN_ROWS:
        assert torch.equal(y, exact.bfloat16())
    else:
        assert torch.equal(y, F.linear(x, weight, b))
    assert_close(y.float(), exact, ulps=2 * 2**16)  # within a couple of bf16 ulps of the fp32 product


def test_fp32_products_leave_fp32_products_and_gradients_alone():
    """fp32 tensors pass through; a bf16 product whose gradient autograd keeps does too (the scratch buffer it
    would save for backward is overwritten by the next product)."""
    x = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(4, 16)
    with Fp32Products():
        y = F.linear(x, weight)
        y16 = F.linear(x.bfloat16(), weight.bfloat16())
    (y.sum() + y16.float().sum()).backward()
    assert torch.equal(y, F.linear(x, weight)) and x.grad is not None
    assert torch.equal(y16, F.linear(x.bfloat16(), weight.bfloat16()))


def test_a_weight_taller_than_the_scratch_block_is_copied_a_block_at_a_time(monkeypatch):
    """A vocabulary-sized head is copied to fp32 a block of rows at a time (bounded memory): the same numbers."""
    monkeypatch.setattr(precision, "SCRATCH_ELEMENTS", 5 * 48)
    generator = torch.Generator().manual_seed(9)
    x, weight = (torch.randn(*shape, generator=generator).bfloat16() for shape in ((7, 48), (23, 48)))
    bias = torch.randn(23, generator=generator).bfloat16()
    with torch.inference_mode(), Fp32Products():
        y = F.linear(x, weight, bias)
    assert torch.equal(y, F.linear(x.float(), weight.float(), bias.float()).bfloat16())


def test_a_bf16_prefill_in_fp32_products_is_as_close_to_fp32_as_the_bf16_kernels():
    """The whole model's prefill (many rows) under Fp32Products: as close to the same model computed in fp32 as
    the bf16 kernels' own forward is (both round the same numbers to bf16 between operations)."""
    model = tiny_model("tiny-gqa")
    prompt = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = model(prompt)
        bf16_model = model.to(torch.bfloat16)
        with Fp32Products():
            upcast = bf16_model(prompt)
        plain = bf16_model(prompt)
    upcast_error, plain_error = ((logits.float() - exact).abs().mean() for logits in (upcast, plain))
    assert upcast_error <= 1.25 * plain_error, (upcast_error, plain_error)
    assert (upcast.float() - exact).abs().mean() < 0.02 * exact.abs().mean()


@pytest.mark.parametrize(("flags", "forced", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, None, True),  # Sapphire Rapids: AMX idles at one row
    ({"avx2", "avx512f", "avx512_bf16"}, None, False),  # Zen 4: oneDNN's native bf16 dot products in F.linear
    ({"avx2"}, None, True),  # Zen 3: no fast bf16 F.linear at all
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "0", True),  # forced "not native": as an AVX2 CPU
])
def test_the_decode_kernel_is_chosen_by_cpu_features_not_vendor(monkeypatch, flags, forced, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    native = "avx512_bf16" in flags
    monkeypatch.setattr(precision.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    if forced is None:
        monkeypatch.delenv("LIT_LLAMA_NATIVE_BF16", raising=False)
    else:
        monkeypatch.setenv("LIT_LLAMA_NATIVE_BF16", forced)
    assert fast_decode.mv_is_fastest() is expected


@pytest.mark.parametrize("native", ["0", "1"], ids=["bf16-not-native", "bf16-native"])
def test_generate_says_which_precision_it_runs_in_and_why(checkpoint, native, monkeypatch):
    monkeypatch.setenv("LIT_LLAMA_NATIVE_BF16", native)
    result = run_script("generate/base.py", "--checkpoint_path", checkpoint, "--prompt", "hello there, a prompt of "
                        "several tokens", "--max_new_tokens", 4, "--temperature", 0, check=True)
    line = next(line for line in result.stderr.splitlines() if line.startswith("precision "))
    assert line.startswith("precision bf16-true") and "threads" in line
    assert ("products of many rows in fp32" in line) == (native == "0")


@pytest.mark.parametrize("native", ["0", "1"], ids=["bf16-not-native", "bf16-native"])
def test_the_demo_recipe_follows_the_precision_training_runs_in(native, monkeypatch):
    """fp32 training (no native bf16) trains fewer tokens a second: its recipe takes fewer, smaller, less padded
    steps to finish in the same minutes. (A bad flag stops the demo right after it says which recipe it chose.)"""
    monkeypatch.setenv("LIT_LLAMA_NATIVE_BF16", native)
    result = run_script("scripts/quickstart.py", "--eval_records", 0)
    assert result.returncode == 2 and "--eval_records (0)" in result.stderr
    expected = "150 steps of 16 samples" if native == "1" else "90 steps of 8 samples, samples of similar length"
    assert expected in result.stdout


@pytest.mark.parametrize(("flags", "slower"), [({"avx2"}, True), ({"avx2", "avx512f"}, False)])
def test_int4_generation_says_where_it_decodes_slower_than_bf16(monkeypatch, flags, slower):
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset(flags))
    assert (quantize.generation_speed_note("int4") is not None) == slower
    assert quantize.generation_speed_note("int8") is None and quantize.generation_speed_note(None) is None
