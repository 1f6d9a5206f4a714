"""Base generation: KV-cache decoding equals full recomputation, sampling respects its limits, EOS stops, the text
streams, and generate/base.py behaves as a command-line tool."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from lit_llama.checkpoint import save_config
from lit_llama.files import save_torch
from lit_llama.generation import Runtime, generate, generate_batch, sample, stream_text
from lit_llama.model import LLaMA, Config, linear, matvec_by_linear, packed_weight
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import make_byte_level_bpe, make_sentencepiece


def tiny_model(name: str = "tiny", seed: int = 0) -> LLaMA:
    """Random weights wider than the usual 0.02 init, so greedy decoding wanders instead of repeating one token."""
    torch.manual_seed(seed)
    model = LLaMA(Config.from_name(name))
    for parameter in model.parameters():
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


@torch.inference_mode()
def greedy_without_cache(model: LLaMA, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The reference: rerun the whole sequence through the model for every new token."""
    ids = prompt.tolist()
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1, : model.config.vocab_size]
        ids.append(int(logits.argmax()))
    return ids[prompt.size(0) :]


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("prompt_length", [1, 13])
def test_kv_cache_generation_equals_full_recompute(name, prompt_length):
    model = tiny_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_length,), generator=torch.Generator().manual_seed(1))
    with_cache = list(generate(model, prompt, max_new_tokens=24, temperature=0.0))
    assert with_cache == greedy_without_cache(model, prompt, 24)
    assert len(set(with_cache)) > 1  # a degenerate model repeating one token would prove little
    assert all(block.attn.kv_cache is None for block in model.transformer.h)  # the cache is released afterwards
    assert model.decode_step is None


def test_batched_generation_equals_one_prompt_at_a_time():
    model = tiny_model("tiny-gqa")
    prompts = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    alone = [list(generate(model, prompt, 12, temperature=0.0)) for prompt in prompts]
    stop = alone[1][4]  # row 1 stops early (at its 5th token); the others run on
    batched = torch.stack(list(generate_batch(model, prompts, 12, temperature=0.0, stop_ids={stop}))).T.tolist()
    assert len(batched[0]) == 12 or stop in batched[0]
    for row, reference in zip(batched, alone):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert row[:end] == reference[:end]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_linear_is_f_linear_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(3)
    for rows, columns in [(64, 64), (172, 64), (320, 64), (192, 576)]:
        weight = torch.randn(rows, columns, generator=generator).to(dtype)
        bias = torch.randn(rows, generator=generator).to(dtype)
        x = torch.randn(1, 1, columns, generator=generator).to(dtype)
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
        assert linear(x, weight).shape == (1, 1, rows)


def assert_same_numbers(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit in bf16 (torch's own matrix-vector kernel); within rounding in fp32, where MKL's sgemv sums a
    taller matrix in a different order."""
    if a.dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        assert_close(a, b)


def block_projections(model: LLaMA) -> list[list[torch.nn.Linear]]:
    groups = []
    for block in model.transformer.h:
        groups += [[block.attn.q_proj, block.attn.k_proj, block.attn.v_proj], [block.mlp.gate_proj, block.mlp.up_proj]]
    return groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_change_no_number_and_add_no_memory(dtype):
    model = tiny_model("tiny-gqa").to(dtype)
    reference = copy.deepcopy(model)
    parameters_before = [id(p) for p in model.parameters()]
    model.prepare_decoding()
    assert [id(p) for p in model.parameters()] == parameters_before  # the same tensors (an optimizer's hold them)
    for layers in block_projections(model):
        assert packed_weight(layers) is not None
        assert len({layer.weight.untyped_storage().data_ptr() for layer in layers}) == 1  # one block, no copy
    assert packed_weight(block_projections(reference)[0]) is None
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))  # many rows: layer by layer
        assert_same_numbers(model(ids[:1, :1]), reference(ids[:1, :1]))  # one row: one torch.mv per group
    prompt = ids[0]
    assert list(generate(model, prompt, 10, temperature=0.0)) == greedy_without_cache(reference, prompt, 10)


def test_packed_weights_train_and_unpack_correctly():
    model, reference = tiny_model("tiny"), tiny_model("tiny")
    model.prepare_decoding()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    for m in (model, reference):  # gradients flow to every weight, packed or not
        m(ids).logsumexp(-1).sum().backward()
    for (name, packed), plain in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(packed.grad, plain.grad, msg=name)
    # a replaced weight (as LoRA merging does) leaves the block: its group is computed layer by layer again
    attn = model.transformer.h[0].attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() * 2)
    reference.transformer.h[0].attn.k_proj.weight.data *= 2
    assert packed_weight([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    with torch.inference_mode():
        assert_same_numbers(model(ids[:1, :1]), reference(ids[:1, :1]))
    model.to(torch.bfloat16)  # new tensors for every weight: nothing is packed any more
    assert all(packed_weight(layers) is None for layers in block_projections(model))


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])  # MHA with its own head; GQA with a tied head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_gives_the_module_path_numbers(name, dtype):
    model = tiny_model(name).to(dtype)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.setup_kv_cache(batch_size=1, max_seq_length=12)
        m.prepare_decoding()
    assert model.decode_step is not None
    reference.decode_step = None  # the same packed weights, through the modules
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        for m in (model, reference):
            m(prompt, input_pos=0)
        for position, token in enumerate([7, 3, 11, 2, 300, 9, 0], start=5):
            idx = torch.tensor([[token]])
            assert torch.equal(model(idx, input_pos=position), reference(idx, input_pos=position))
    for block, reference_block in zip(model.transformer.h, reference.transformer.h):
        assert torch.equal(block.attn.kv_cache.k, reference_block.attn.kv_cache.k)
        assert torch.equal(block.attn.kv_cache.v, reference_block.attn.kv_cache.v)


def test_decode_step_product_off_a_cpu_is_the_linear_one():
    # off a CPU the step multiplies through F.linear, as `linear` does there; on a CPU F.linear and torch.mv agree
    # bit for bit on these shapes (test_one_row_linear_is_f_linear_bit_for_bit), so the plumbing can be tried here
    model = tiny_model("tiny-gqa").to(torch.bfloat16)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.setup_kv_cache(batch_size=1, max_seq_length=8)
        m.prepare_decoding()
    assert model.decode_step.matvec is torch.mv
    model.decode_step.matvec = matvec_by_linear
    reference.decode_step = None
    with torch.inference_mode():
        for m in (model, reference):
            m(torch.tensor([[1, 2, 3]]), input_pos=0)
        for position, token in enumerate([7, 3, 11], start=3):
            idx = torch.tensor([[token]])
            assert torch.equal(model(idx, input_pos=position), reference(idx, input_pos=position))


def test_decode_step_only_where_it_gives_the_same_numbers():
    from lit_llama.adapter import add_adapter
    from lit_llama.adapter_v2 import add_adapter_v2
    from lit_llama.lora import add_lora

    def prepared(model, batch_size=1):
        model.setup_kv_cache(batch_size=batch_size, max_seq_length=8)
        model.prepare_decoding()
        return model.decode_step

    assert prepared(tiny_model()) is not None
    assert prepared(tiny_model(), batch_size=2) is None
    assert prepared(add_lora(tiny_model(), r=2, alpha=4, dropout=0.0, targets=["query", "value"])) is None
    assert prepared(add_adapter(tiny_model(), prompt_length=2, start_layer=1)) is None
    assert prepared(add_adapter_v2(tiny_model(), prompt_length=2, start_layer=1)) is None
    hooked = tiny_model()
    hooked.transformer.h[1].mlp.register_forward_hook(lambda module, args, output: output * 2)
    assert prepared(hooked) is None
    model = tiny_model()
    step = prepared(model)
    token = torch.tensor([[4]])
    assert not step.applies(token, 0)  # gradients on
    with torch.inference_mode():
        assert step.applies(token, 7) and not step.applies(token, 8)  # past the cache: the module path's error
        assert not step.applies(torch.tensor([[4, 5]]), 0) and not step.applies(token, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not step.applies(token, 0)
    model.setup_kv_cache(batch_size=1, max_seq_length=8)  # new caches: the step over the old ones is dropped
    assert model.decode_step is None


def test_compiled_generation_agrees_with_eager():
    model = tiny_model("tiny")
    prompt = torch.tensor([5, 17, 42])
    eager = list(generate(model, prompt, 10, temperature=0.0))
    assert list(generate(torch.compile(model, dynamic=True), prompt, 10, temperature=0.0)) == eager


def test_greedy_settings_agree():
    model = tiny_model("tiny-gqa")
    prompt = torch.tensor([5, 17, 42])
    greedy = list(generate(model, prompt, 10, temperature=0.0))
    torch.manual_seed(3)
    assert list(generate(model, prompt, 10, temperature=1.0, top_k=1)) == greedy
    assert list(generate(model, prompt, 10, temperature=1.0, top_k=None, top_p=1e-6)) == greedy


def test_sampling_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(50)
    assert int(sample(logits, temperature=1.0, top_k=1)) == int(logits.argmax())
    assert int(sample(logits, temperature=0.0, top_k=50)) == int(logits.argmax())
    assert int(sample(logits, temperature=1.0, top_k=None, top_p=1e-6)) == int(logits.argmax())

    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn = {int(sample(logits, temperature=1.0, top_k=5)) for _ in range(400)}
    assert drawn <= top5 and len(drawn) > 1

    # probabilities 0.4, 0.3, 0.2, 0.1: the first two hold 0.7 >= 0.5, so the nucleus is tokens 0 and 1
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    drawn = {int(sample(probs.log(), temperature=1.0, top_k=None, top_p=0.5)) for _ in range(400)}
    assert drawn == {0, 1}


def test_generation_stops_at_eos():
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    free = list(generate(model, prompt, 20, temperature=0.0))
    eos = free[4]
    stopped = list(generate(model, prompt, 20, temperature=0.0, eos_id=eos))
    assert stopped == free[: free.index(eos) + 1]
    assert stopped[-1] == eos and len(stopped) < 20
    assert list(generate(model, prompt, 20, temperature=0.0, stop_ids={free[2]})) == free[: free.index(free[2]) + 1]


def test_mixed_precision_autocasts():
    model = tiny_model()
    with Runtime(torch.device("cpu"), "bf16-mixed").autocast():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert model.transformer.wte.weight.dtype == torch.float32 and logits.dtype == torch.bfloat16


class RecordingOutput(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("make_tokenizer", [make_sentencepiece, make_byte_level_bpe])
def test_stream_text_prints_each_token_as_it_arrives(tmp_path, make_tokenizer):
    tokenizer = Tokenizer(make_tokenizer(tmp_path))
    prompt = tokenizer.encode("The quick brown")
    continuation = tokenizer.encode(" fox jumps over the lazy dog, naïve 😀 café!", bos=False).tolist()
    out = RecordingOutput()

    def tokens():
        for i, token in enumerate(continuation):
            yield token
            # by the time the next token is asked for, the text so far is out (a split character may wait)
            assert len(out.getvalue()) > 0 or i == 0

    returned = stream_text(iter(tokens()), tokenizer, prompt.tolist(), out)
    assert returned == continuation
    full = tokenizer.decode(prompt.tolist() + continuation)
    assert tokenizer.decode(prompt.tolist()) + out.getvalue() == full  # word-boundary spaces kept
    assert "\ufffd" not in out.getvalue() and "😀" in out.getvalue()  # multi-byte characters never split
    assert len([w for w in out.writes if w]) > 5  # streamed piece by piece, not printed once at the end


def test_stream_text_does_not_print_the_stop_token(tmp_path):
    tokenizer = Tokenizer(make_byte_level_bpe(tmp_path))
    ids = tokenizer.encode("over the lazy dog").tolist()
    out = io.StringIO()
    assert stream_text(iter(ids + [tokenizer.eos_id]), tokenizer, [], out) == ids + [tokenizer.eos_id]
    assert out.getvalue() == "over the lazy dog"


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random model saved as a checkpoint dir, with a byte-level BPE tokenizer beside it."""
    directory = tmp_path / "tiny"
    tokenizer = Tokenizer(make_byte_level_bpe(directory))
    config = Config.from_name("tiny-gqa", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = LLaMA(config)
    model.reset_parameters()
    save_torch(model.state_dict(), directory / "lit-llama.pth")
    save_config(config, directory)
    return directory / "lit-llama.pth"


def test_script_streams_text_to_stdout_and_stats_to_stderr(checkpoint, script):
    from lit_llama.checkpoint import load

    prompt = "The quick brown fox"
    result = script(
        "generate/base.py", "--checkpoint_path", checkpoint, "--prompt", prompt, "--temperature", "0",
        "--max_new_tokens", "12", "--num_samples", "2", "--precision", "32-true", check=True,
    )
    model, tokenizer = load(checkpoint)
    prompt_ids = tokenizer.encode(prompt)
    tokens = [t for t in generate(model, prompt_ids, 12, temperature=0.0) if t not in tokenizer.stop_ids]
    expected = prompt + tokenizer.decode(prompt_ids.tolist() + tokens)[len(tokenizer.decode(prompt_ids.tolist())) :]
    assert result.stdout == f"{expected}\n{expected}\n"
    assert result.stderr.count("Time for inference:") == 2 and "tokens/sec" in result.stderr
    assert "Peak" in result.stderr and "Time for inference" not in result.stdout


def test_script_refuses_a_prompt_longer_than_the_context(checkpoint, script):
    result = script("generate/base.py", "--checkpoint_path", checkpoint, "--prompt", "lazy dog " * 200)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the prompt has")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_script_reports_a_missing_checkpoint(tmp_path, script):
    result = script("generate/base.py", "--checkpoint_path", tmp_path / "nothing/lit-llama.pth")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'nothing/lit-llama.pth'}"]


def test_script_help_lists_options_with_defaults(script):
    result = script("generate/base.py", "-h", check=True)
    options = " ".join(result.stdout.split("options:", 1)[1].split()).replace("- ", "-")  # undo line wrapping
    for option, default in [
        ("--checkpoint_path", "checkpoints/lit-llama/7B/lit-llama.pth"), ("--prompt", "Hello, my name is"),
        ("--num_samples", "1"), ("--max_new_tokens", "50"), ("--top_k", "200"), ("--top_p", "1.0"),
        ("--temperature", "0.8"), ("--seed", "1234"), ("--compile", "False"),
    ]:
        entry = options.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"default: {default})" in entry, option
    assert "--precision" in options and "--tokenizer_path" in options
