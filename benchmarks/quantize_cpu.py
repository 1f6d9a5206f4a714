"""QLoRA and weight-only generation on this CPU, on random weights of a model's shape (no download):

- peak RSS of one LoRA training step with the frozen base in bf16 vs quantized (each in a fresh process, the model
  built on the meta device and each block weight materialised and quantized one at a time, so it is never whole
  in bf16);
- greedy decode tokens/s of bf16 vs int8 and int4 weight-only, and how many of the greedy tokens agree with bf16.

    python benchmarks/quantize_cpu.py --config_name SmolLM2-135M --rounds 3
"""
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from lit_llama.cli import run_cli
from lit_llama.generation import generate
from lit_llama.lora import add_lora, mark_only_lora_as_trainable
from lit_llama.model import LLaMA, Config
from lit_llama.quantize import block_linear_names, parameter_bytes, quantize_for_generation, quantize_weight

MiB = 2**20


def random_model(config: Config, quantize: Optional[str], generation: bool = False, seed: int = 0) -> LLaMA:
    """Random bf16 weights (uniform +-0.02, norms 1); with `quantize`, each block weight quantized as soon as it is
    written, so the bf16 model never exists whole."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LLaMA(config).to(torch.bfloat16)
    model.to_empty(device="cpu")  # untouched pages: no RSS until written
    quantized_names = set(block_linear_names(model)) if quantize else set()
    with torch.no_grad():
        for name, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                param.fill_(1.0) if "norm" in name else param.uniform_(-0.02, 0.02)
            if name in quantized_names and not generation:
                module.weight = quantize_weight(module.weight, quantize, name)
    return model


def measure_step(config_name: str, quantize: Optional[str], micro_batch: int, seq_length: int) -> dict:
    torch.set_num_threads(1)
    config = Config.from_name(config_name)
    # QLoRA's placement (every block linear) on the same model in both runs, so only the base's format differs
    model = random_model(config, quantize)
    add_lora(model, r=8, alpha=16, dropout=0.0, targets=["query", "key", "value", "projection", "mlp"])
    mark_only_lora_as_trainable(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_length + 1))
    start = time.perf_counter()
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(built=built, peak=peak, seconds=seconds, bytes=parameter_bytes(model), loss=loss.item())


def decode(config_name: str, mode: Optional[str], new_tokens: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    model = random_model(Config.from_name(config_name), None).eval()
    if mode:
        quantize_for_generation(model, mode)
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
    speeds, tokens = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        tokens = list(generate(model, prompt, new_tokens, temperature=0.0))
        speeds.append(len(tokens) / (time.perf_counter() - start))
    return dict(speeds=speeds, tokens=tokens)


def child(command: list) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, command)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(
    config_name: str = "SmolLM2-135M", rounds: int = 3, micro_batch: int = 4, seq_length: int = 256,
    new_tokens: int = 256, role: Optional[str] = None, mode: Optional[str] = None,
) -> None:
    """Args:
        config_name: model shape (lit_llama.model configs).
        rounds: training steps (one per fresh process) and decode rounds per format.
        micro_batch, seq_length: the training step's batch.
        new_tokens: greedy tokens per decode round.
        role, mode: internal (a child process's measurement).
    """
    if role == "step":
        print("RESULT " + json.dumps(measure_step(config_name, mode, micro_batch, seq_length)))
        return
    if role == "decode":
        print("RESULT " + json.dumps(decode(config_name, mode, new_tokens, rounds)))
        return
    print(f"{config_name}, one LoRA step (r=8 on every block linear) of {micro_batch} x {seq_length} tokens, 1 thread")
    steps = {}
    for quantize in ("none", "nf4", "nf4-dq", "int8"):
        args = ["--config_name", config_name, "--role", "step", "--micro_batch", micro_batch, "--seq_length",
                seq_length] + ([] if quantize == "none" else ["--mode", quantize])
        steps[quantize] = [child(args) for _ in range(rounds)]
        peak = statistics.median(r["peak"] for r in steps[quantize])
        ratio = [r["peak"] / b["peak"] for r, b in zip(steps[quantize], steps["none"])]
        print(f"  base {quantize:6}: peak RSS {peak / MiB:7.1f} MiB (built {steps[quantize][0]['built'] / MiB:.1f}), "
              f"step {statistics.median(r['seconds'] for r in steps[quantize]):.2f} s, parameter bytes "
              f"{steps[quantize][0]['bytes']}, peak / bf16 per round {[round(x, 3) for x in ratio]}")
    print(f"{config_name}, greedy decode of {new_tokens} tokens after a 16-token prompt, {rounds} rounds, 1 thread")
    runs = {m: child(["--config_name", config_name, "--role", "decode", "--rounds", rounds, "--new_tokens",
                      new_tokens] + ([] if m == "bf16" else ["--mode", m])) for m in ("bf16", "int8", "int4")}
    for m, r in runs.items():
        reference = runs["bf16"]["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b), None)
        equal = sum(a == b for a, b in zip(r["tokens"], reference))
        print(f"  {m:5}: {statistics.median(r['speeds']):6.1f} tokens/s (rounds {[round(s, 1) for s in r['speeds']]}), "
              f"x{statistics.median(r['speeds']) / statistics.median(runs['bf16']['speeds']):.2f} bf16; "
              f"{equal}/{len(reference)} tokens equal bf16's, first divergence at {first}")


if __name__ == "__main__":
    run_cli(main)
