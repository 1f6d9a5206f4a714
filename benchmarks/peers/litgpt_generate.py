"""Generation speed: lit-llama vs litgpt, bf16 greedy on the same weights and prompt, as benchmarks/generation.py
measures lit-llama vs transformers (fixed pseudo-random prompt, every one of `new_tokens` made, interleaved rounds,
medians). Each round runs each tool in a fresh process: lit-llama with this Python, litgpt with the peers' venv on
the checkpoint benchmarks/lora_training.py converted (run that first, or let this script convert).

    python benchmarks/peers/litgpt_generate.py --rounds 5 --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def prompt_ids(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(0))


def run_lit_llama(args) -> tuple[float, list[int]]:
    from lit_llama.checkpoint import load
    from lit_llama.generation import generate

    model, _ = load(args.model_dir, "cpu", torch.bfloat16)
    prompt = prompt_ids(model.config.vocab_size, args.prompt_length)
    list(generate(model, prompt, 8, temperature=0.0))  # warm-up: allocator, kernels, lazy inits
    start = time.perf_counter()
    tokens = list(generate(model, prompt, args.new_tokens, temperature=0.0))
    return time.perf_counter() - start, tokens


def run_litgpt(args) -> tuple[float, list[int]]:
    """What `litgpt generate` does: Fabric bf16-true, KV cache sized to prompt + new tokens, litgpt's `generate`."""
    import lightning as L
    from litgpt.config import Config
    from litgpt.generate.base import generate
    from litgpt.model import GPT
    from litgpt.utils import load_checkpoint

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    config = Config.from_file(args.model_dir / "model_config.yaml")
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    model = fabric.setup_module(model)
    load_checkpoint(fabric, model, args.model_dir / "lit_model.pth")
    model.eval()
    prompt = prompt_ids(config.vocab_size, args.prompt_length)

    def run(new_tokens: int) -> list[int]:
        total = args.prompt_length + new_tokens
        model.max_seq_length = total
        model.set_kv_cache(batch_size=1)
        out = generate(model, prompt, total, temperature=0.0, eos_id=None, include_prompt=False)
        model.clear_kv_cache()
        return out.tolist()

    run(8)
    start = time.perf_counter()
    tokens = run(args.new_tokens)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/smollm2-135m-instruct"))
    parser.add_argument("--work_dir", type=Path, default=Path("out/benchmarks/lora_training"))
    parser.add_argument("--peers_python", type=Path, default=Path(".venv-peers/bin/python"))
    parser.add_argument("--litgpt_model_name", default="SmolLM2-135M-Instruct")
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("lit-llama", "litgpt"), help="internal: time one tool in this process")
    parser.add_argument("--model_dir", type=Path, help="internal: the worker's weights")
    args = parser.parse_args()

    if args.worker:
        torch.set_num_threads(args.threads)
        seconds, tokens = (run_lit_llama if args.worker == "lit-llama" else run_litgpt)(args)
        print("RESULT " + json.dumps(dict(tokens_per_s=len(tokens) / seconds, tokens=tokens)), flush=True)
        return

    sys.path.insert(0, str(HERE.parent))
    from lora_training import prepare_weights

    model_dirs = prepare_weights(args.checkpoint_dir, args.work_dir, args.peers_python, args.litgpt_model_name,
                                 ["litgpt"])
    speeds, tokens = {"lit-llama": [], "litgpt": []}, {}
    for round_index in range(args.rounds):
        for tool, python in (("lit-llama", sys.executable), ("litgpt", args.peers_python)):
            command = [python, __file__, "--worker", tool, "--model_dir", model_dirs[tool], "--threads", args.threads,
                       "--prompt_length", args.prompt_length, "--new_tokens", args.new_tokens]
            out = subprocess.run([str(c) for c in command], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"error: {tool} worker failed:\n{out.stderr[-2000:]}")
            result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
            speeds[tool].append(result["tokens_per_s"])
            tokens[tool] = result["tokens"]
            print(f"round {round_index + 1}: {tool} {result['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    ours, theirs = statistics.median(speeds["lit-llama"]), statistics.median(speeds["litgpt"])
    agree = next((i for i, (a, b) in enumerate(zip(tokens["lit-llama"], tokens["litgpt"])) if a != b), args.new_tokens)
    print(f"| model | {args.checkpoint_dir.name}, bf16, prompt {args.prompt_length} tokens, {args.new_tokens} new, greedy, "
          f"{args.threads} threads, {args.rounds} rounds |")
    print(f"| lit-llama | {ours:.1f} tok/s (min {min(speeds['lit-llama']):.1f}, max {max(speeds['lit-llama']):.1f}) |")
    print(f"| litgpt | {theirs:.1f} tok/s (min {min(speeds['litgpt']):.1f}, max {max(speeds['litgpt']):.1f}) |")
    print(f"| ratio (medians) | {ours / theirs:.2f}x |")
    print(f"| same greedy tokens | first {agree} of {args.new_tokens} identical |")


if __name__ == "__main__":
    main()
