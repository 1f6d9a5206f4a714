"""scripts/serve.py, started on 127.0.0.1 (a free port) over a tiny base with two LoRA adapters of different ranks and
targets, and queried with the real `openai` client: greedy replies equal generate's (the adapter merged) for every
model, whether requests come alone, in a mixed batch or 32 at once; bad requests get OpenAI's error JSON."""
import functools
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, assert_close, run_script
from lit_llama.checkpoint import load
from lit_llama.errors import UserError
from lit_llama.finetuned import FINETUNE_CONFIG_NAME, load_finetuned
from lit_llama.generation import generate
from lit_llama.lora import LORA, LoRAArgs, add_lora
from lit_llama.prompts import resolve_prompt_style
from lit_llama.serving import parse_adapters
from lit_llama.serving.multi_lora import add_adapters
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned
from tiny_tokenizers import QWEN, with_template

openai = pytest.importorskip("openai")

ADAPTERS = {"sorter": dict(r=4, alpha=8, targets=["query", "value"]),
            "counter": dict(r=2, alpha=8, targets=["query", "key", "projection", "mlp"])}
QUESTION = [{"role": "system", "content": "You sort words."}, {"role": "user", "content": "Sort: stone tree"}]
NEW_TOKENS = 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_adapters(base_path, directory, adapters: dict, std: float) -> dict:
    """LoRA finetunes of `base_path` with random non-zero updates, recorded with the checkpoint's chat template."""
    paths = {}
    for seed, (name, options) in enumerate(adapters.items(), start=1):
        model = add_lora(load_base(base_path), LoRAArgs(**options))
        LORA.mark_trainable(model)
        torch.manual_seed(seed)
        randomise_trainable(model, std=std)
        path = save_finetuned(model, "lora", directory / name, base_path, **options)
        config_path = path.parent / FINETUNE_CONFIG_NAME
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prompt_style": "chat_template"}))
        paths[name] = path
    return paths


class Served:
    """scripts/serve.py over `base_path` (default: a tiny base with a Qwen-style template) and random adapters."""

    def __init__(self, directory, base_path=None, adapters=ADAPTERS, std=0.2):
        if base_path is None:
            base_path = make_base(directory / "base", "tiny")
            with_template(base_path.parent, QWEN)
        self.paths = make_adapters(base_path, directory, adapters, std)
        self.tokenizer = load(base_path)[1]
        self.style = resolve_prompt_style(None, base_path.parent)
        self.base_path = base_path
        self.port = free_port()
        self.log = directory / "server.log"
        lora = [arg for name, path in self.paths.items() for arg in ("--lora", f"{name}={path}")]
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts/serve.py"), "--checkpoint_path", str(base_path), *lora,
             "--port", str(self.port), "--max_batch_size", "8", "--precision", "32-true", "--base_name", "base"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                self.health()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the server did not start: {self.log.read_text()}")
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    @functools.cached_property
    def models(self) -> dict:
        """The reference models: the base, and each adapter merged by load_finetuned."""
        return {"base": load(self.base_path)[0], **{name: load_finetuned(p)[0] for name, p in self.paths.items()}}

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())

    def greedy(self, model: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> str:
        stops, reference = set(self.tokenizer.stop_ids), self.models[model]  # loaded outside inference mode
        with torch.inference_mode():
            tokens = generate(reference, torch.tensor(prompt), max_tokens, temperature=0, stop_ids=stops)
            return self.tokenizer.decode([t for t in tokens if t not in stops])

    def greedy_chat(self, model: str, messages: list[dict], max_tokens: int = NEW_TOKENS) -> str:
        return self.greedy(model, self.style.conversation_ids(self.tokenizer, messages).tolist(), max_tokens)

    def chat(self, model: str, messages: list[dict], **options):
        options = {"temperature": 0, "max_tokens": NEW_TOKENS, **options}
        return self.client.chat.completions.create(model=model, messages=messages, **options)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = Served(tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()


def test_models_lists_the_base_and_every_adapter(served):
    assert [m.id for m in served.client.models.list().data] == ["base", "sorter", "counter"]


def test_a_reply_and_a_streamed_reply_equal_generate_finetuned_for_the_same_adapter(served, tmp_path):
    (tmp_path / "chat.json").write_text(json.dumps(QUESTION))
    script = run_script("generate/finetuned.py", "--finetuned_path", served.paths["sorter"], "--messages",
                        tmp_path / "chat.json", "--max_new_tokens", NEW_TOKENS, "--temperature", 0,
                        "--precision", "32-true", check=True)
    expected = script.stdout.removesuffix("\n")
    reply = served.chat("sorter", QUESTION)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(served.style.conversation_ids(served.tokenizer, QUESTION))
    chunks = list(served.chat("sorter", QUESTION, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert expected != served.greedy_chat("base", QUESTION)  # the adapter changes the answer


def test_completions_continue_raw_text_as_generate_base_does(served):
    prompt = "The quick brown fox"
    expected = served.greedy("base", served.tokenizer.encode(prompt).tolist())
    assert served.client.completions.create(model="base", prompt=prompt, temperature=0,
                                            max_tokens=NEW_TOKENS).choices[0].text == expected
    streamed = served.client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=NEW_TOKENS,
                                                stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected


def test_two_adapters_in_one_batch_each_get_their_own_answer(served):
    expected = {name: served.greedy_chat(name, QUESTION, 40) for name in ADAPTERS}
    assert len(set(expected.values())) == 2
    mixed_before = served.health()["mixed_steps"]
    with ThreadPoolExecutor(2) as pool:
        replies = pool.map(lambda name: served.chat(name, QUESTION, max_tokens=40).choices[0].message.content,
                           list(ADAPTERS))
    assert dict(zip(ADAPTERS, replies)) == expected
    assert served.health()["mixed_steps"] > mixed_before  # decoded together, each row through its own adapter


def test_32_concurrent_clients_all_get_complete_correct_answers(served):
    models = ["base", *ADAPTERS]
    jobs = [(models[i % 3], [{"role": "user", "content": f"Sort: {i} stone tree {i * 7}"}]) for i in range(32)]
    expected = [served.greedy_chat(model, messages) for model, messages in jobs]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda job: served.chat(*job).choices[0].message.content, jobs))
    assert replies == expected
    health = served.health()
    assert health["peak_batch"] == 8 and health["active"] == 0  # --max_batch_size 8: the rest waited their turn


def test_stop_strings_cut_the_reply_and_a_seed_repeats_a_sampled_one(served):
    full = served.greedy_chat("counter", QUESTION)
    stop = full[4:6]
    expected = full[: full.find(stop)]
    assert served.chat("counter", QUESTION, stop=[stop]).choices[0].message.content == expected
    chunks = served.chat("counter", QUESTION, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    sampled = [served.client.chat.completions.create(model="counter", messages=QUESTION, temperature=1.0, top_p=0.9,
                                                     seed=7, max_tokens=NEW_TOKENS).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def post(served, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(served.url + path, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_requests_get_openai_error_json_with_the_right_status(served):
    with pytest.raises(openai.BadRequestError) as too_long:
        served.chat("sorter", [{"role": "user", "content": "stone tree " * 400}])
    assert too_long.value.status_code == 400 and too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        served.chat("sorter", QUESTION, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError) as unknown:
        served.chat("no-such-adapter", QUESTION)
    assert unknown.value.code == "model_not_found" and "no-such-adapter" in unknown.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        served.client.chat.completions.create(model="base", messages=QUESTION, temperature=5)
    status, body = post(served, "/v1/chat/completions", b'{"model": "base", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(served, "/v1/chat/completions", json.dumps({"model": "base"}).encode())
    assert status == 422 and body["error"]["param"] == "messages"
    assert served.health()["active"] == 0


def reference_logprobs(served, model: str, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy reply's tokens and the log_softmax of the reference model's logits at each of its steps."""
    reference, stops = served.models[model], set(served.tokenizer.stop_ids)
    with torch.inference_mode():
        tokens = [t for t in generate(reference, torch.tensor(prompt), max_tokens, temperature=0, stop_ids=stops)
                  if t not in stops]
        logits = reference(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    return tokens, logits[:, : served.tokenizer.vocab_size].float().log_softmax(-1)


def test_logprobs_are_the_models_own_for_chat_and_completions(served):
    prompt = served.style.conversation_ids(served.tokenizer, QUESTION).tolist()
    reply = served.chat("sorter", QUESTION, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    tokens, expected = reference_logprobs(served, "sorter", prompt, NEW_TOKENS)
    assert [entry.token for entry in content] == [served.tokenizer.decode([t]) for t in tokens]
    for step, (entry, token) in enumerate(zip(content, tokens)):
        assert_close(torch.tensor(entry.logprob), expected[step, token])
        top = expected[step].topk(3)
        assert [t.token for t in entry.top_logprobs] == [served.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    streamed = served.chat("sorter", QUESTION, logprobs=True, stream=True)
    streamed_tokens = [e.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
                       for e in chunk.choices[0].logprobs.content]
    assert streamed_tokens == [entry.token for entry in content]

    completion = served.client.completions.create(model="base", prompt="Sort: stone tree", max_tokens=6, temperature=0,
                                                  logprobs=2)
    legacy = completion.choices[0].logprobs
    prompt = served.tokenizer.encode("Sort: stone tree").tolist()
    tokens, expected = reference_logprobs(served, "base", prompt, 6)
    assert len(legacy.tokens) == len(tokens) and legacy.text_offset[0] == 0
    assert_close(torch.tensor(legacy.token_logprobs), expected[torch.arange(len(tokens)), tokens])
    assert all(len(alternatives) <= 2 for alternatives in legacy.top_logprobs)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        served.chat("base", QUESTION, top_logprobs=2)


HOSTILE = {  # body -> (status, param or None): each answered with OpenAI's error JSON, never plain text
    "seed-2**70": ({"model": "base", "messages": QUESTION, "seed": 2**70}, 422, "seed"),
    "five-stop-strings": ({"model": "base", "messages": QUESTION, "stop": list("abcde")}, 422, "stop"),
    "tools": ({"model": "base", "messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools"),
    "json-mode": ({"model": "base", "messages": QUESTION, "response_format": {"type": "json_object"}}, 400,
                  "response_format"),
    "top_logprobs-21": ({"model": "base", "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, 422,
                        "top_logprobs"),
    "best_of": ({"model": "base", "prompt": "Sort", "best_of": 3}, 400, "best_of"),
    "1-MB-prompt": ({"model": "base", "prompt": "stone " * 166_000}, 400, "prompt"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_request_gets_one_openai_error_and_the_server_goes_on(served, case):
    body, status, param = HOSTILE[case]
    body = dict(body)
    model = body.pop("model")
    if "prompt" in body:
        create, required = served.client.completions.create, {"prompt": body.pop("prompt")}
    else:
        create, required = served.client.chat.completions.create, {"messages": body.pop("messages")}
    with pytest.raises(openai.APIStatusError) as refused:  # what the client raises, with the reply's error fields
        create(model=model, **required, extra_body=body)
    assert (refused.value.status_code, refused.value.param) == (status, param), refused.value.body
    assert refused.value.type == "invalid_request_error" and refused.value.message
    assert served.chat("base", QUESTION).choices[0].message.content == served.greedy_chat("base", QUESTION)


def test_text_that_is_not_unicode_an_oversized_body_and_unknown_paths_get_error_json(served):
    surrogate = b'{"model": "base", "messages": [{"role": "user", "content": "caf\\ud800"}]}'
    status, reply = post(served, "/v1/chat/completions", surrogate)
    assert status == 400 and reply["error"]["param"] == "messages.0.content" and "surrogate" in reply["error"]["message"]
    status, reply = post(served, "/v1/completions", b'{"model": "\\udfff", "prompt": "x"}')
    assert status == 400 and reply["error"]["param"] == "model"
    start = time.monotonic()
    status, reply = post(served, "/v1/completions", b'{"model": "base", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413 and "1,048,576 bytes" in reply["error"]["message"]
    print(f"a 2 MiB body refused in {time.monotonic() - start:.3f} s")
    request = urllib.request.Request(served.url + "/v1/nowhere")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=30)
    assert missing.value.code == 404 and json.loads(missing.value.read())["error"]["type"] == "invalid_request_error"
    request = urllib.request.Request(served.url + "/v1/chat/completions")  # GET on a POST route
    with pytest.raises(urllib.error.HTTPError) as wrong_method:
        urllib.request.urlopen(request, timeout=30)
    assert wrong_method.value.code == 405 and "error" in json.loads(wrong_method.value.read())
    assert served.health()["active"] == 0


def test_16_clients_are_answered_while_a_1_mb_request_is_refused(served):
    jobs = [[{"role": "user", "content": f"Sort: {i} stone tree"}] for i in range(16)]
    expected = [served.greedy_chat("base", messages) for messages in jobs]

    def timed(messages):
        start = time.monotonic()
        return served.chat("base", messages).choices[0].message.content, time.monotonic() - start

    def huge():
        return post(served, "/v1/chat/completions", json.dumps(
            {"model": "base", "messages": [{"role": "user", "content": "stone " * 166_000}]}).encode())

    with ThreadPoolExecutor(17) as pool:
        refused = pool.submit(huge)
        answers = list(pool.map(timed, jobs))
    status, reply = refused.result()
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert [text for text, _ in answers] == expected
    latencies = sorted(seconds for _, seconds in answers)
    print(f"16 clients beside a refused 1 MB request: median {latencies[8]:.3f} s, slowest {latencies[-1]:.3f} s")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    messages = [{"role": "user", "content": "Tell a long story"}]
    long_reply = served.greedy_chat("sorter", messages, 400)
    assert len(served.tokenizer.encode(long_reply)) > 300  # would run for a while if not cancelled
    cancelled_before = served.health()["cancelled"]
    stream = served.chat("sorter", messages, stream=True, max_tokens=400)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while (health := served.health())["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == cancelled_before + 1


def test_the_batched_lora_layer_gives_each_row_its_own_adapters_update(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    lora_models, paths = {}, {}
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        model = add_lora(load_base(base_path), LoRAArgs(**options))
        LORA.mark_trainable(model)
        torch.manual_seed(seed)
        randomise_trainable(model, std=0.2)
        lora_models[name], paths[name] = model, save_finetuned(model, "lora", tmp_path / name, base_path, **options)
    model, tokenizer = load(base_path)
    routing, _ = add_adapters(model, base_path, tokenizer, paths)
    routing.rows = torch.tensor([2, 0, 1])  # counter, the base, sorter
    for layer in ("transformer.h.0.attn.q_proj", "transformer.h.1.mlp.down_proj", "transformer.h.1.attn.v_proj"):
        x = torch.randn(3, 5, model.get_submodule(layer).weight.size(1))
        batched = model.get_submodule(layer)(x)
        references = [lora_models["counter"], load_base(base_path), lora_models["sorter"]]
        with torch.no_grad():
            for row, reference in enumerate(references):
                assert_close(batched[row], reference.get_submodule(layer).eval()(x[row]))


def test_an_adapter_of_another_base_or_method_is_refused_in_one_line(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    other_base = make_base(tmp_path / "other", "tiny-gqa")
    model = add_lora(load_base(other_base), LoRAArgs(r=2))
    LORA.mark_trainable(model)
    other = save_finetuned(model, "lora", tmp_path / "other_lora", other_base, r=2)
    base, tokenizer = load(base_path)
    with pytest.raises(UserError, match="finetuned from a different base model"):
        add_adapters(base, base_path, tokenizer, {"other": other})
    full = save_finetuned(load_base(base_path).requires_grad_(True), "full", tmp_path / "full", base_path)
    with pytest.raises(UserError, match="only LoRA adapters can be served"):
        add_adapters(base, base_path, tokenizer, {"full": full})
    with pytest.raises(UserError, match="--lora takes name=path"):
        parse_adapters(["just-a-path"])


@pytest.mark.slow
def test_the_shipped_smollm2_serves_a_lora_as_generate_finetuned_answers(tmp_path, smollm2_checkpoint):
    served = Served(tmp_path, smollm2_checkpoint / "lit-llama.pth",
                    {"demo": dict(r=8, alpha=16, targets=["query", "value", "mlp"])}, std=0.01)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        (tmp_path / "chat.json").write_text(json.dumps(messages))
        script = run_script("generate/finetuned.py", "--finetuned_path", served.paths["demo"], "--messages",
                            tmp_path / "chat.json", "--max_new_tokens", NEW_TOKENS, "--temperature", 0,
                            "--precision", "32-true", check=True)
        with ThreadPoolExecutor(2) as pool:  # the adapter and the base in one batch
            demo, base = pool.map(lambda name: served.chat(name, messages).choices[0].message.content, ["demo", "base"])
        assert demo == script.stdout.removesuffix("\n")
        assert "Paris" in base
    finally:
        served.stop()


def test_the_serving_benchmark_runs_and_prints_its_table(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    with_template(base_path.parent, QWEN)
    result = run_script("benchmarks/serve.py", "--checkpoint_dir", base_path.parent, "--concurrency", "[1,2]",
                        "--requests_per_client", 1, "--max_tokens", 4, "--precision", "32-true", "--threads", 1,
                        "--port", free_port(), check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| lit-llama serve", "| transformers g"))]
    assert len(rows) == 4 and all(float(row.split("|")[5]) > 0 for row in rows)
