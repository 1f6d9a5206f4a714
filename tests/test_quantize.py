"""Quantized frozen weights (QLoRA) and weight-only generation, lit_llama/quantize.py, against torchao's own
dequantization and the NF4 levels as the QLoRA paper constructs them.

Models are built twice rather than deep-copied: torchao 0.18's NF4Tensor.clone re-quantizes with its default block
sizes."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from lit_llama.adapter import AdapterArgs
from lit_llama.adapter_v2 import ADAPTER_V2, add_adapter_v2
from lit_llama.errors import UserError
from lit_llama.generation import generate
from lit_llama.lora import LORA, LoRAArgs, LoRALinear, add_lora
from lit_llama.model import LLaMA, Config
from lit_llama.quantize import (
    QuantizedLinear, check_generation_mode, check_training_mode, dequantize, dequantize_model, is_quantized,
    merge_into_dequantized, quantize_for_generation, quantize_frozen, quantize_weight, unquantized_parameters,
    unshardable_parameters,
)

torchao = pytest.importorskip("torchao")
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4  # noqa: E402

TRAINING = ["nf4", "nf4-dq", "int8"]
BF16_ULPS = 4  # one bf16 rounding of the output and of a few partial sums, at the outputs' largest magnitude


def tiny(seed: int = 0, dtype=torch.bfloat16, **overrides) -> LLaMA:
    """A tiny model whose widths suit every format (int8's CPU kernel and int4 take multiples of 16 and 32)."""
    torch.manual_seed(seed)
    return LLaMA(Config.from_name("tiny", intermediate_size=192, **overrides)).to(dtype)


def qlora(
    mode: str, dtype=torch.bfloat16, seed: int = 0,
    targets: tuple = ("query", "key", "value", "projection", "mlp"), shards: int = 1,
) -> LLaMA:
    """A tiny LoRA model (on every projection unless `targets` says) with a non-zero B, its base quantized in `mode`
    (to be sharded over `shards` devices)."""
    model = add_lora(tiny(seed, dtype), LoRAArgs(r=4, alpha=8, dropout=0.0, targets=list(targets)))
    LORA.mark_trainable(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    return quantize_frozen(model, mode, shards=shards)


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def nf4_levels_from_the_paper() -> torch.Tensor:
    """QLoRA's NF4 (Dettmers et al. 2023, section 3 and appendix): quantiles of N(0, 1) for 8 positive and 7
    negative levels with offset 0.9677 (the mean of (1 - 1/(2*15) and (1 - 1/(2*16))), exact zero, scaled into
    [-1, 1]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


def test_torchao_nf4_levels_are_the_papers():
    table = to_nf4(torch.randn(256, 64)).nf4.double()
    assert_close(table, nf4_levels_from_the_paper(), ulps=2**-13 / torch.finfo(torch.float64).eps)  # 4 decimals


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq"])
def test_dequantized_nf4_weights_equal_torchaos_reference(mode):
    model = qlora(mode)
    original = tiny()
    for name in ("transformer.h.0.attn.q_proj", "transformer.h.1.mlp.down_proj", "transformer.h.1.attn.k_proj"):
        weight = model.get_submodule(name).weight
        base = original.get_submodule(name).weight.detach()
        assert isinstance(weight, NF4Tensor) and not weight.requires_grad
        reference = to_nf4(base, 64, weight.scaler_block_size)  # torchao's own quantization of the bf16 weight
        assert torch.equal(weight.quantized_data, reference.quantized_data)  # the same 4-bit codes
        dequantized = dequantize(weight)
        assert dequantized.dtype == torch.bfloat16
        assert torch.equal(dequantized, weight.get_original_weight())  # torchao's own dequantization, bit for bit
        if mode == "nf4-dq":
            assert torch.equal(dequantized, reference.get_original_weight())
        else:  # exact absmax scalers: each weight is its code's NF4 level times its block's absmax
            absmax = base.reshape(-1, 64).abs().amax(1, keepdim=True)
            codes = torch.stack([weight.quantized_data >> 4, weight.quantized_data & 15], -1).reshape(-1, 64).long()
            assert torch.equal(dequantized.reshape(-1, 64), reference.nf4[codes] * absmax)
        # the nearest level: off by at most half the widest gap between levels (0.7230 to 1), plus bf16 rounding
        half_gap = reference.nf4.float().diff().max() / 2
        bound = base.float().reshape(-1, 64).abs().amax(1, keepdim=True) * (half_gap + 2**-7)
        assert ((dequantized.float() - base.float()).reshape(-1, 64).abs() <= bound).all()


def test_double_quantization_keeps_the_codes_and_changes_only_the_scalers_slightly():
    torch.manual_seed(0)  # blocks of very different scales, so that int8 scalers lose something
    weight = (torch.randn(256, 64) * torch.logspace(-3, 0, 256)[:, None]).to(torch.bfloat16)
    a, b = quantize_weight(weight, "nf4"), quantize_weight(weight, "nf4-dq")
    assert torch.equal(a.quantized_data, b.quantized_data)
    assert a.quantized_scalers.dtype == torch.bfloat16 and b.quantized_scalers.dtype == torch.int8
    # int8 scalers after subtracting their mean: within one of 256 steps of their range (plus bf16 rounding)
    scalers = a.quantized_scalers.float()
    error = (dequantize(b).float() - dequantize(a).float()).abs().max()
    assert 0 < error <= (scalers.max() - scalers.min()) / 127 + 2**-7 * scalers.max()


@pytest.mark.parametrize("mode", TRAINING)
@pytest.mark.parametrize("method", ["lora", "adapter_v2"])
def test_quantized_forward_equals_the_bf16_model_with_dequantized_weights(mode, method):
    def build():
        if method == "lora":
            return qlora(mode)
        model = add_adapter_v2(tiny(), AdapterArgs(prompt_length=4, start_layer=1))
        ADAPTER_V2.mark_trainable(model)
        torch.manual_seed(2)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        return quantize_frozen(model, mode)

    model, reference = build(), dequantize_model(build())
    assert not any(is_quantized(p) for p in reference.parameters())
    idx = tokens()
    with torch.no_grad():
        assert_close(model(idx), reference(idx), ulps=BF16_ULPS)


@pytest.mark.parametrize("mode", TRAINING)
def test_only_lora_parameters_get_gradients_and_the_input_gradient_is_the_dequantized_models(mode):
    model, reference = qlora(mode, dtype=torch.float32), dequantize_model(qlora(mode, dtype=torch.float32))
    idx = tokens()
    model(idx).logsumexp(-1).mean().backward()
    reference(idx).logsumexp(-1).mean().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {name for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert all(is_quantized(model.get_submodule(n).weight) for n, _ in model.named_modules() if n.endswith("_proj"))
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert_close(param.grad, reference.get_parameter(name).grad, ulps=256)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_loss_falls_in_a_few_optimizer_steps(mode):
    model = qlora(mode, seed=3)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = tokens(4, 32, seed=5)
    losses = []
    for _ in range(8):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_activation_checkpointing_over_nf4_blocks_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    model = qlora("nf4-dq", dtype=torch.float32)
    idx = tokens()
    model(idx).logsumexp(-1).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for block in model.transformer.h:
        forward = block.forward
        block.forward = lambda *args, forward=forward: checkpoint(forward, *args, use_reentrant=False)
    model(idx).logsumexp(-1).mean().backward()
    for name, grad in expected.items():
        assert_close(model.get_parameter(name).grad, grad, ulps=16)


@pytest.mark.parametrize("mode", TRAINING)
def test_merge_into_the_dequantized_base_matches_the_unmerged_quantized_model(mode):
    model = qlora(mode)
    base_keys = set(tiny().state_dict())
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)
        merge_into_dequantized(model, torch.bfloat16)
        merged = model(idx)
    assert set(model.state_dict()) == base_keys
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for p in model.parameters())
    assert not isinstance(model.transformer.h[0].mlp.down_proj, (LoRALinear, QuantizedLinear))
    # the only change: W_dequantized + B A rounded once to bf16 instead of added in the forward
    assert_close(merged, unmerged, ulps=2 * BF16_ULPS)


def test_what_stays_unquantized_is_the_embedding_norms_and_lora():
    model = qlora("nf4-dq", seed=0)
    left = unquantized_parameters(model)
    assert set(left) == {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"} | {
        n for n in left if n.endswith(("norm_1.weight", "norm_2.weight", "lora_A", "lora_B"))
    }
    assert "transformer.h.0.attn.q_proj.weight" not in left


def shard_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = qlora("nf4-dq", torch.float32, targets=("query", "value", "mlp"), shards=world)
    for block in model.transformer.h:
        fully_shard(block, ignored_params=unshardable_parameters(model))
    fully_shard(model)
    sharded = model.transformer.h[0].mlp.up_proj.weight
    assert isinstance(sharded.to_local(), NF4Tensor) and sharded.to_local().size(0) == 192 // world
    idx = tokens(2 * world)[2 * rank : 2 * rank + 2]
    model(idx).logsumexp(-1).mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_two_processes_shard_nf4_weights_with_fsdp2_and_match_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(shard_worker, args=(2, port, str(tmp_path / "grads.pt")), nprocs=2)
    # one process quantizes as two do: the scaler blocks ignore the device count
    model = qlora("nf4-dq", torch.float32, targets=("query", "value", "mlp"))
    idx = tokens(4)
    (model(idx[:2]).logsumexp(-1).mean() + model(idx[2:]).logsumexp(-1).mean()).div(2).backward()
    sharded = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert sharded.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in sharded.items():
        assert_close(grad, model.get_parameter(name).grad, ulps=64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_generation_runs_the_dequantized_function_and_mostly_keeps_bf16s_tokens(mode, capsys):
    bf16 = tiny(seed=7, tie_embeddings=False)
    quantized = quantize_for_generation(tiny(seed=7, tie_embeddings=False), mode)
    assert is_quantized(quantized.lm_head.weight) and is_quantized(quantized.transformer.h[1].mlp.up_proj.weight)
    prompt = tokens(1, 8, seed=9)[0]
    # the kernels compute the dequantized weights' products: within bf16 rounding of a plain model with them
    # (int4's kernel accumulates in its own order: a few more ulps)
    with torch.no_grad():
        expected = dequantize_model(quantize_for_generation(tiny(seed=7, tie_embeddings=False), mode))(prompt[None])
        assert_close(quantized(prompt[None]), expected, ulps=BF16_ULPS if mode == "int8" else 8 * BF16_ULPS)
    greedy = list(generate(quantized, prompt, 32, temperature=0.0))
    reference = list(generate(bf16, prompt, 32, temperature=0.0))
    same = next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b), len(reference))
    with capsys.disabled():
        print(f"\n{mode}: {same} of {len(reference)} greedy tokens equal bf16's before the first divergence")
    assert len(greedy) == len(reference) == 32


def test_bad_quantization_requests_are_one_line_errors():
    with pytest.raises(UserError, match="unknown --quantize 'nf3'.*nf4, nf4-dq, int8"):
        check_training_mode("nf3", "lora")
    with pytest.raises(UserError, match="full finetune trains"):
        check_training_mode("nf4", "full")
    assert check_training_mode(None, "full") is None and check_training_mode("nf4-dq", "adapter") == "nf4-dq"
    with pytest.raises(UserError, match="unknown --quantize 'nf4' for generation.*int8, int4"):
        check_generation_mode("nf4")
    with pytest.raises(UserError, match="transformer.h.0.attn.q_proj.weight trains"):
        quantize_frozen(tiny(), "nf4")  # nothing frozen: a full finetune's model
    with pytest.raises(UserError, match="unknown --quantize 'int4'"):
        quantize_frozen(tiny(), "int4")


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_int8_models_decode_through_the_fast_step_with_the_module_paths_numbers(tie_embeddings):
    from lit_llama.fast_decode import DecodeStep, packed_weight

    model = quantize_for_generation(tiny(seed=3, tie_embeddings=tie_embeddings), "int8").requires_grad_(False)
    reference = quantize_for_generation(tiny(seed=3, tie_embeddings=tie_embeddings), "int8").requires_grad_(False)
    for m in (model, reference):
        m.setup_kv_cache(batch_size=1, max_seq_length=16)
    step = DecodeStep.for_model(model)
    assert step is not None
    attn = model.transformer.h[0].attn
    codes = attn.q_proj.weight.qdata
    assert packed_weight([attn.q_proj, attn.k_proj, attn.v_proj]).data_ptr() == codes.data_ptr()  # moved, not copied
    prompt = tokens(1, 6, seed=4)
    with torch.inference_mode():
        for m in (model, reference):
            m(prompt, input_pos=0)
        for position, token in enumerate([5, 17, 300, 2], start=6):
            idx = torch.tensor([[token]])
            assert_close(step(idx, position).float(), reference(idx, input_pos=position).float(), ulps=BF16_ULPS)
    # int4's kernel has no matrix-vector form here: generation keeps the module path
    int4 = quantize_for_generation(tiny(seed=3), "int4").requires_grad_(False)
    int4.setup_kv_cache(batch_size=1, max_seq_length=16)
    assert DecodeStep.for_model(int4) is None
