"""Serving throughput and latency: scripts/serve.py (continuous batching) vs transformers' `generate` in a loop that
serves one request at a time, at 1, 4 and 16 concurrent clients.

Each client sends `requests_per_client` chat requests one after another (greedy, `max_tokens` each, different
questions) and times each from send to full reply. Throughput is the completion tokens of all clients over the
wall time of the level; latencies are per request (p50, p90, max). Both sides run the same weights in the same
precision with the same number of torch threads, and stop at EOS the same way.

    python benchmarks/serve.py --checkpoint_dir checkpoints/smollm2-135m-instruct --threads 2

With --refused_request_bytes N, each level of the server runs once more while another client sends, once a second,
a chat request of N bytes that the server must refuse (too long for the context): the clients' latencies then show
whether huge requests hold the others up, and the refusals' own times are printed.

Without a converted checkpoint, convert the shipped one first: python scripts/convert_gguf_checkpoint.py.
"""
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generation import hf_model  # noqa: E402

from lit_llama.checkpoint import load, load_config  # noqa: E402
from lit_llama.cli import run_cli
from lit_llama.precision import cpu_summary  # noqa: E402
from lit_llama.errors import UserError  # noqa: E402
from lit_llama.prompts import resolve_prompt_style  # noqa: E402

TOPICS = ["llamas", "the sea", "bread", "rain", "mountains", "chess", "bees", "winter", "trains", "music", "paper",
          "rivers", "salt", "clocks", "maps", "glass"]


def questions(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(count)]


def run_clients(clients: int, per_client: int, ask) -> tuple[float, list[float], int]:
    """`clients` threads each asking `per_client` questions in turn; returns (wall seconds, latencies, tokens)."""
    asked = questions(clients * per_client)

    def client(index: int):
        results = []
        for messages in asked[index * per_client : (index + 1) * per_client]:
            start = time.perf_counter()
            tokens = ask(messages)
            results.append((time.perf_counter() - start, tokens))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def refusing(url: str, model: str, size: int, seconds: list[float]):
    """A client sending, once a second until the block ends, chat requests of `size` bytes that the server refuses;
    the time each refusal took goes into `seconds`."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * (size // 5)}]}).encode()
    done, answered = threading.Event(), []

    def send():
        while not done.is_set():
            start = time.perf_counter()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            try:
                answered.append(urllib.request.urlopen(request, timeout=600).read())
            except urllib.error.HTTPError as error:
                error.read()
            seconds.append(time.perf_counter() - start)
            done.wait(max(0.0, 1.0 - seconds[-1]))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        done.set()
        sender.join()
    if answered:
        raise UserError(f"a {size:,}-byte request was answered, not refused: give a larger --refused_request_bytes")


def start_server(checkpoint_dir: Path, port: int, max_batch_size: int, precision: str, threads: int,
                 context_length: int, log: Path):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts/serve.py"), "--checkpoint_path", str(checkpoint_dir), "--port", str(port),
         "--max_batch_size", str(max_batch_size), "--precision", precision, "--context_length", str(context_length)],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise UserError(f"the server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


def main(
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    concurrency: list[int] = (1, 4, 16),
    requests_per_client: int = 2,
    max_tokens: int = 32,
    precision: str = "bf16-true",
    threads: int = 2,
    port: int = 8765,
    context_length: int = 1024,
    skip_transformers: bool = False,
    refused_request_bytes: int = 0,
) -> None:
    """Benchmark the server against transformers' generate serving one request at a time.

    Args:
        checkpoint_dir: A converted checkpoint (scripts/convert_gguf_checkpoint.py).
        concurrency: Numbers of concurrent clients, one level each.
        requests_per_client: Requests each client sends, one after another.
        max_tokens: The longest reply (greedy; EOS ends one earlier).
        precision: bf16-true or 32-true, for both.
        threads: torch threads for both (the server through OMP_NUM_THREADS).
        port: The server's port on 127.0.0.1.
        context_length: The server's context per request (its KV cache per slot).
        skip_transformers: Measure the server only.
        refused_request_bytes: Also run each server level beside a client sending requests of this many bytes.
    """
    if not (checkpoint_dir / "lit-llama.pth").is_file():
        raise UserError(f"no converted checkpoint in {checkpoint_dir}: run scripts/convert_gguf_checkpoint.py")
    concurrency = list(concurrency)
    rows = []
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "lit_llama_serve_benchmark.log"
    context_length = min(context_length, load_config(checkpoint_dir).block_size)
    process, url = start_server(checkpoint_dir, port, max(concurrency), precision, threads, context_length, log)
    try:
        models = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]
        name = models[0]["id"]

        def ask_server(messages) -> int:
            body = {"model": name, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
            return post_json(url + "/v1/chat/completions", body)["usage"]["completion_tokens"]

        ask_server(questions(1)[0])  # warm-up
        for clients in concurrency:
            rows.append(("lit-llama serve", clients, *run_clients(clients, requests_per_client, ask_server)))
            print(f"lit-llama serve, {clients} clients: done", file=sys.stderr)
            if refused_request_bytes:
                refusals = []
                with refusing(url + "/v1/chat/completions", name, refused_request_bytes, refusals):
                    measured = run_clients(clients, requests_per_client, ask_server)
                label = f"lit-llama serve beside {refused_request_bytes:,}-byte requests"
                rows.append((label, clients, *measured))
                print(f"{label}: {len(refusals)} refused, median {statistics.median(refusals):.3f} s each",
                      file=sys.stderr)
    finally:
        process.terminate()
        process.wait(timeout=30)

    if not skip_transformers:
        torch.set_num_threads(threads)
        model, tokenizer = load(checkpoint_dir, "cpu", torch.float32)
        hf = hf_model(model)
        if precision == "32-true":
            hf = hf.float()
        del model
        style = resolve_prompt_style(None, checkpoint_dir)
        stops = sorted(set(tokenizer.stop_ids) | {tokenizer.eos_id})
        one_at_a_time = threading.Lock()

        @torch.inference_mode()
        def ask_transformers(messages) -> int:
            prompt = style.conversation_ids(tokenizer, messages).unsqueeze(0)
            with one_at_a_time:
                out = hf.generate(prompt, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                  pad_token_id=stops[0])
            return out.size(1) - prompt.size(1)

        ask_transformers(questions(1)[0])  # warm-up
        for clients in concurrency:
            rows.append(("transformers generate loop", clients, *run_clients(clients, requests_per_client,
                                                                              ask_transformers)))
            print(f"transformers, {clients} clients: done", file=sys.stderr)

    import transformers

    print(f"| machine | {cpu_summary()}, {os.cpu_count()} cores, torch threads {threads} (shared machine) |")
    print(f"| versions | python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__} |")
    print(f"| workload | {checkpoint_dir.name}, {precision}, greedy chat replies of at most {max_tokens} tokens, "
          f"{requests_per_client} requests per client |")
    print("| server | clients | requests | tokens | tokens/s (all clients) | latency p50 | p90 | max |")
    print("|---|---|---|---|---|---|---|---|")
    for label, clients, seconds, latencies, tokens in rows:
        print(f"| {label} | {clients} | {len(latencies)} | {tokens} | {tokens / seconds:.1f} | "
              f"{percentile(latencies, 0.5):.2f} s | {percentile(latencies, 0.9):.2f} s | {max(latencies):.2f} s |")


if __name__ == "__main__":
    run_cli(main)
