from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import lit_llama.loss
from conftest import assert_close
from lit_llama.data import IGNORE_INDEX
from lit_llama.lora import LoRAArgs, add_lora
from lit_llama.model import LLaMA, Config
from lit_llama.training.loop import loss_sum
from tiny_finetunes import randomise_trainable


def tiny(name: str, dtype: torch.dtype, head_trains: bool) -> LLaMA:
    """A tiny model whose vocabulary has padding columns (300 tokens of 320), every weight non-zero."""
    torch.manual_seed(0)
    model = LLaMA(replace(Config.from_name(name), vocab_size=300, padded_vocab_size=320)).to(dtype)
    for param in model.parameters():
        param.requires_grad_(head_trains)
    return model


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (3, 17), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    return input_ids, labels


def full_logits_loss(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: every position's logits kept, then the cross-entropy of the counted ones."""
    logits = model(input_ids)[:, :-1, : model.config.vocab_size]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), reduction="sum")


def loss_and_grads(model: LLaMA, loss_fn, input_ids, labels) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, input_ids, labels)
    (loss / 7).backward()  # a scale, as training's mean over the step's tokens: backward must apply it
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows (the tests' 40-odd positions: many chunks and a short last one)."""
    monkeypatch.setattr(lit_llama.loss, "CPU_CHUNK_LOGITS", 3 * 300)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])  # untied and tied output head
@pytest.mark.parametrize("head_trains", [False, True])
# bf16: the two ways round the head's gradient at different points (before or after the loss's scale) and a dozen
# bf16 products follow: measured up to 1.75 ulps of the largest gradient, 4 allowed
@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 64), (torch.bfloat16, 4)])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logits_cross_entropy(
    small_chunks, name, head_trains, dtype, ulps
):
    model = tiny(name, dtype, head_trains)
    if not head_trains:  # LoRA: the head frozen, gradients reach the trainable weights through the hidden states
        add_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value"]))
        randomise_trainable(model, std=0.02)
    input_ids, labels = batch(model.config.vocab_size)
    ours, our_grads = loss_and_grads(model, loss_sum, input_ids, labels)
    expected, expected_grads = loss_and_grads(model, full_logits_loss, input_ids, labels)
    assert_close(ours, expected, ulps=64)
    assert our_grads.keys() == expected_grads.keys() and our_grads
    head = "transformer.wte.weight" if model.config.tie_embeddings else "lm_head.weight"
    assert (head in our_grads) == head_trains
    for param_name, grad in our_grads.items():
        assert_close(grad, expected_grads[param_name], ulps=ulps, msg=param_name)
    if head_trains:  # the padding columns of the vocabulary are not tokens: no gradient
        assert not expected_grads[head][300:].any() and not our_grads[head][300:].any()


def test_backward_keeps_the_hidden_states_gradient_not_the_logits(small_chunks):
    model = tiny("tiny-gqa", torch.float32, head_trains=False)
    add_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value"]))
    input_ids, labels = batch(model.config.vocab_size)
    positions = int((labels[:, 1:] != IGNORE_INDEX).sum())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss_sum(model, input_ids, labels)
    widths = [shape[-1] for shape in saved if len(shape) == 2 and shape[0] == positions]
    assert widths and max(widths) == model.config.n_embd  # the hidden states' gradient, not (positions, vocabulary)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        full_logits_loss(model, input_ids, labels)
    assert any(shape[-1] == model.config.vocab_size for shape in saved)  # the hook sees them where they are kept


def test_a_lora_head_takes_the_full_logits_path_and_trains(small_chunks):
    model = tiny("tiny", torch.float32, head_trains=False)
    add_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, targets=["query", "value", "head"]))
    randomise_trainable(model, std=0.02)
    assert model.head_weight() is None
    input_ids, labels = batch(model.config.vocab_size)
    ours, our_grads = loss_and_grads(model, loss_sum, input_ids, labels)
    expected, expected_grads = loss_and_grads(model, full_logits_loss, input_ids, labels)
    assert_close(ours, expected)
    assert "lm_head.lora_B" in our_grads
    for param_name, grad in our_grads.items():
        assert_close(grad, expected_grads[param_name], msg=param_name)


def test_without_gradients_the_loss_is_the_same_and_builds_no_graph(small_chunks):
    model = tiny("tiny", torch.float32, head_trains=True)
    input_ids, labels = batch(model.config.vocab_size)
    with torch.no_grad():
        loss = loss_sum(model, input_ids, labels)
        expected = full_logits_loss(model, input_ids, labels)
    assert loss.grad_fn is None
    assert_close(loss, expected)


def test_under_bf16_autocast_the_gradients_match_the_plain_heads(small_chunks):
    model = tiny("tiny-gqa", torch.float32, head_trains=True)
    input_ids, labels = batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = loss_and_grads(model, loss_sum, input_ids, labels)
        expected, expected_grads = loss_and_grads(model, full_logits_loss, input_ids, labels)
    assert_close(ours, expected)
    for param_name, grad in our_grads.items():
        assert grad.dtype == torch.float32
        assert_close(grad, expected_grads[param_name], ulps=4 * 2**16, msg=param_name)  # 4 bf16 ulps in fp32


def test_the_loss_scale_reaches_bf16_gradients_unrounded():
    # 1/3 in bf16 is 0.3320: applied in bf16, every gradient would shrink by 0.4%; in fp32 only each element's own
    # final rounding remains, which averages out over the 2,560 elements
    torch.manual_seed(0)
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(300, 64) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, 300, (40,))

    def grad_sum(scale: float) -> float:
        x.grad = None
        (lit_llama.loss.cross_entropy_sum(x, targets, 300, weight, None) * scale).backward()
        return x.grad.float().abs().sum().item()

    assert grad_sum(1 / 3) * 3 / grad_sum(1.0) == pytest.approx(1.0, abs=1e-3)
