"""Base generation: KV-cache decoding equals full recomputation, sampling respects its limits, EOS stops, the text
streams, and generate/base.py behaves as a command-line tool."""
import copy
import io

import pytest
import torch

from conftest import assert_close
from lit_llama.checkpoint import save_config
from lit_llama.files import save_torch
from lit_llama.generation import Runtime, generate, generate_batch, sample, stream_text
from lit_llama.fast_decode import DecodeStep, mv_is_fastest, packed_weight
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import make_byte_level_bpe, make_sentencepiece


def tiny_model(name: str = "tiny", seed: int = 0) -> LLaMA:
    """Random weights wider than the usual 0.02 init, so greedy decoding wanders instead of repeating one token.
    Frozen and in eval mode, as `lit_llama.checkpoint.load` returns a model (so generation takes fast_decode)."""
    torch.manual_seed(seed)
    model = LLaMA(Config.from_name(name))
    for parameter in model.parameters():
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.2)
    return model.eval().requires_grad_(False)


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
    # the same tokens through the plain modules (a trainable model gets no fast step)
    assert list(generate(model.requires_grad_(True), prompt, max_new_tokens=24, temperature=0.0)) == with_cache


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


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_logits_at_returns_the_full_forwards_rows_in_row_major_order(name):
    model = tiny_model(name)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(4)) < 0.4
    mask[1] = False  # a row with no logits at all
    # the head multiplies fewer rows: bit for bit the same on an Intel Xeon with AMX, but a matrix kernel may pick its
    # summation order by the number of rows; a row out of place would be off by far more than these ulps
    with torch.inference_mode():
        full = model(ids)
        assert_close(model(ids, logits_at=mask), full[mask], ulps=4)
        last = torch.zeros_like(mask)
        last[:, -1] = True  # the prefill's question: one row per sequence
        assert_close(model(ids, logits_at=last), full[:, -1], ulps=4)
    assert model(ids, logits_at=mask).shape == (int(mask.sum()), model.config.padded_vocab_size)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    model, recomputing = tiny_model(name).requires_grad_(True), tiny_model(name).requires_grad_(True)
    recomputing.activation_checkpointing = True
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    for m in (model, recomputing):
        m(ids).logsumexp(-1).sum().backward()
    for (name, plain), recomputed in zip(model.named_parameters(), recomputing.parameters()):
        assert torch.equal(recomputed.grad, plain.grad), name
    with torch.no_grad():  # without gradients nothing is recomputed: the plain path
        assert torch.equal(recomputing(ids), model(ids))


def test_a_trainable_model_gets_no_fast_step_and_keeps_its_weights_storage():
    # evaluation generates mid-training: the optimizer's tensors must stay where they are
    model = tiny_model("tiny-gqa").requires_grad_(False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.endswith("q_proj.weight")  # one trainable weight is enough
    storages = {name: p.untyped_storage().data_ptr() for name, p in model.named_parameters()}
    model.setup_kv_cache(batch_size=1, max_seq_length=8)
    assert DecodeStep.for_model(model) is None
    prompt = torch.tensor([5, 17, 42])
    reference = list(generate(tiny_model("tiny-gqa").requires_grad_(True), prompt, 8, temperature=0.0))
    assert list(generate(model, prompt, 8, temperature=0.0)) == reference
    assert {name: p.untyped_storage().data_ptr() for name, p in model.named_parameters()} == storages


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
    model.setup_kv_cache(batch_size=1, max_seq_length=12)
    assert DecodeStep.for_model(model) is not None
    model.clear_kv_cache()
    assert [id(p) for p in model.parameters()] == parameters_before  # the same tensors
    for layers in block_projections(model):
        assert packed_weight(layers) is not None
        assert len({layer.weight.untyped_storage().data_ptr() for layer in layers}) == 1  # one block, no copy
    assert packed_weight(block_projections(reference)[0]) is None
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))
        assert torch.equal(model(ids[:1, :1]), reference(ids[:1, :1]))
    prompt = ids[0]
    assert list(generate(model, prompt, 10, temperature=0.0)) == greedy_without_cache(reference, prompt, 10)


def test_packed_weights_train_and_unpack_correctly():
    model, reference = tiny_model("tiny"), tiny_model("tiny")
    model.setup_kv_cache(batch_size=1, max_seq_length=8)
    DecodeStep.for_model(model)
    model.clear_kv_cache()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    for m in (model, reference):  # a model unfrozen after generating trains as one never packed
        m.requires_grad_(True)
        m(ids).logsumexp(-1).sum().backward()
    for (name, packed), plain in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(packed.grad, plain.grad), name
    # a replaced weight (as LoRA merging does) leaves the block; the next step packs it again
    model.requires_grad_(False)
    attn = model.transformer.h[0].attn
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() * 2, requires_grad=False)
    assert packed_weight([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    model.setup_kv_cache(batch_size=1, max_seq_length=8)
    DecodeStep.for_model(model)
    assert packed_weight([attn.q_proj, attn.k_proj, attn.v_proj]) is not None
    model.to(torch.bfloat16)  # new tensors for every weight: nothing is packed any more
    assert all(packed_weight(layers) is None for layers in block_projections(model))


# the step multiplies through torch.mv (or F.linear on a packed matrix) where the module path calls F.linear on one
# row: bit for bit the same on an Intel Xeon with AMX, but another CPU's kernels may sum in another order (last bits
# of bf16, rounding of fp32)
STEP_ULPS = {torch.float32: 64, torch.bfloat16: 4}


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])  # MHA with its own head; GQA with a tied head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mv", [True, False])  # both kernels on any CPU, whichever the step picks here
def test_decode_step_gives_the_module_path_numbers(name, dtype, mv):
    model = tiny_model(name).to(dtype)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.setup_kv_cache(batch_size=1, max_seq_length=12)
    assert DecodeStep.for_model(model).mv == mv_is_fastest()
    step = DecodeStep(model, mv=mv)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        for m in (model, reference):
            m(prompt, input_pos=0)
        for position, token in enumerate([7, 3, 11, 2, 300, 9, 0], start=5):
            idx = torch.tensor([[token]])
            expected = reference(idx, input_pos=position)
            actual = step(idx, position)
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            assert_close(actual.float(), expected.float(), ulps=STEP_ULPS[dtype])
    for block, reference_block in zip(model.transformer.h, reference.transformer.h):
        assert_close(block.attn.kv_cache.k.float(), reference_block.attn.kv_cache.k.float(), ulps=STEP_ULPS[dtype])
        assert_close(block.attn.kv_cache.v.float(), reference_block.attn.kv_cache.v.float(), ulps=STEP_ULPS[dtype])


def test_decode_step_only_where_it_gives_the_same_numbers():
    from lit_llama.adapter import AdapterArgs, add_adapter
    from lit_llama.adapter_v2 import add_adapter_v2
    from lit_llama.lora import LoRAArgs, add_lora

    def step_for(model, batch_size=1):
        model.setup_kv_cache(batch_size=batch_size, max_seq_length=8)
        return DecodeStep.for_model(model)

    assert step_for(tiny_model()) is not None
    assert DecodeStep.for_model(tiny_model()) is None  # no KV cache
    assert step_for(tiny_model(), batch_size=2) is None
    assert step_for(tiny_model().requires_grad_(True)) is None
    for with_method in (
        lambda m: add_lora(m, LoRAArgs(r=2, alpha=4, dropout=0.0, targets=["query", "value"])),
        lambda m: add_adapter(m, AdapterArgs(prompt_length=2, start_layer=1)),
        lambda m: add_adapter_v2(m, AdapterArgs(prompt_length=2, start_layer=1)),
    ):
        assert step_for(with_method(tiny_model()).requires_grad_(False)) is None
    hooked = tiny_model()
    hooked.transformer.h[1].mlp.register_forward_hook(lambda module, args, output: output * 2)
    assert step_for(hooked) is None
    compiled = torch.compile(tiny_model())
    assert step_for(compiled) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_for(tiny_model()) is None


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
