"""7B LoRA finetuning and generation on one GPU: peak memory, tokens/s, MFU; bf16 generation tokens/s.

Random bf16 weights (no download), the seed's LoRA settings: r=8, alpha=16, dropout 0.05 on q and v, micro-batch 4
of 256 tokens, frozen weights bf16 and LoRA A/B fp32 as the training loop holds them, AdamW. A bounded number of
steps: on an H200 the whole script takes a few minutes (most of it torch.compile for the compiled generation).

Model FLOPs of one training step (MFU counts these, not recomputation from activation checkpointing):
    tokens * (4 * N_mm + 6 * N_lora)  +  L * 6 * B * T^2 * C
N_mm: parameters of the frozen matmuls (all linear layers and the head; not the embedding lookup): 2 FLOPs each per
token forward, 2 more backward for the activation gradient (frozen weights get no weight gradient); LoRA weights
also get their weight gradient (6 per parameter). Attention: QK^T and PV are 4*T*C per token and layer forward,
halved by the causal mask, and backward costs twice the forward.

    python benchmarks/gpu_lora_7b.py                              # on a CUDA machine
    python benchmarks/gpu_lora_7b.py --quantize nf4 --compile false   # QLoRA: the same workload over an NF4 base
    python benchmarks/gpu_lora_7b.py --config_name tiny --device cpu --compile false   # smoke test anywhere
"""
import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.generation import generate
from lit_llama.method import merge
from lit_llama.model import Config
from lit_llama.quantize import check_training_mode, merge_into_dequantized

sys.path.insert(0, str(Path(__file__).parent))
from memory_7b import random_lora_model, train_step  # noqa: E402

H200_BF16_DENSE_FLOPS = 989e12
SEED_MICRO_STEPS_PER_S = 62_400 / (192 * 60)  # the seed's 7B LoRA run on an A100: 62,400 micro-steps in 192 minutes


def step_flops(model, micro_batch: int, seq_length: int) -> float:
    config = model.config
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_mm = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    n_mm += config.padded_vocab_size * config.n_embd  # the output head (tied or not, it is one matmul)
    tokens = micro_batch * seq_length
    attention = config.n_layer * 6 * micro_batch * seq_length**2 * config.n_embd
    return tokens * (4 * n_mm + 6 * n_lora) + attention


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> float:
    """GiB: the CUDA allocator's peak, or the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def benchmark_training(model, device: str, micro_batch: int, seq_length: int, warmup: int, steps: int) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    batches = torch.randint(0, model.config.vocab_size, (warmup + steps, micro_batch, seq_length), device=device)
    for i in range(warmup):
        train_step(model, optimizer, batches[i])
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = train_step(model, optimizer, batches[i])
    synchronize(device)
    seconds = time.perf_counter() - start
    flops = step_flops(model, micro_batch, seq_length) * steps
    return dict(
        micro_steps_per_s=steps / seconds, tokens_per_s=steps * micro_batch * seq_length / seconds,
        model_tflops_per_s=flops / seconds / 1e12, mfu=flops / seconds / H200_BF16_DENSE_FLOPS,
        peak_memory_gib=peak_memory(device), loss=loss,
    )


def benchmark_generation(model, device: str, prompt_length: int, new_tokens: int) -> float:
    """New tokens per second of one greedy generation (prefill included), after an untimed warm-up run."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_length,), device=device)
    for timed in (False, True):
        synchronize(device)
        start = time.perf_counter()
        produced = sum(1 for _ in generate(model, prompt, new_tokens, temperature=0.0))
        synchronize(device)
        if timed:
            return produced / (time.perf_counter() - start)


def main(
    config_name: str = "7B",
    device: str = "cuda",
    micro_batch: int = 4,
    seq_length: int = 256,
    lora_r: int = 8,
    lora_alpha: float = 16,
    activation_checkpointing: bool = False,
    warmup: int = 3,
    steps: int = 20,
    prompt_length: int = 16,
    new_tokens: int = 128,
    compile: bool = True,
    quantize: Optional[str] = None,
) -> None:
    """Train a few LoRA steps and generate with a random-weight model; print the numbers (and one JSON line).

    Args:
        config_name: Model config (lit_llama.model.configs); "tiny" for a smoke test.
        device: "cuda" (the benchmark) or "cpu" (smoke test of the script itself).
        micro_batch: Samples per training step.
        seq_length: Tokens per sample (every position's label counts).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        activation_checkpointing: Recompute each block in backward (less memory, about a third slower).
        warmup: Untimed training steps.
        steps: Timed training steps.
        prompt_length: Prompt tokens for the generation benchmark.
        new_tokens: Tokens to generate.
        compile: Also measure generation with the model torch.compile'd (as generate/base.py --compile does).
        quantize: QLoRA: the frozen block weights in this lit_llama.quantize training format (nf4, nf4-dq, int8),
            quantized block by block as they are made; generation then runs the merged, dequantized bf16 model.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA device: run on a GPU machine, or smoke-test with --config_name tiny --device cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    check_training_mode(quantize, "lora")
    config = Config.from_name(config_name)
    if max(seq_length, prompt_length + new_tokens) > config.block_size:
        raise UserError(f"--seq_length / prompt + new tokens exceed {config_name}'s block_size {config.block_size}")
    torch.manual_seed(0)
    clock = time.perf_counter()
    model = random_lora_model(config, lora_r, lora_alpha, device, activation_checkpointing, quantize)
    results = dict(config=config_name, device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
                   torch=torch.__version__, micro_batch=micro_batch, seq_length=seq_length,
                   activation_checkpointing=activation_checkpointing, quantize=quantize, build_seconds=time.perf_counter() - clock)
    model.train()
    results.update(benchmark_training(model, device, micro_batch, seq_length, warmup, steps))
    results["speedup_vs_seed"] = results["micro_steps_per_s"] / SEED_MICRO_STEPS_PER_S
    print(f"training: {results['micro_steps_per_s']:.2f} micro-steps/s ({results['speedup_vs_seed']:.2f}x the seed's "
          f"{SEED_MICRO_STEPS_PER_S:.2f}), {results['tokens_per_s']:,.0f} tokens/s, {results['model_tflops_per_s']:.0f} "
          f"TFLOP/s = MFU {results['mfu']:.1%} of 989 TFLOP/s, peak memory {results['peak_memory_gib']:.2f} GiB",
          flush=True)

    # generation runs the plain bf16 model, as after finetuning: LoRA merged into the weights, no recomputation
    module = (merge_into_dequantized if quantize else merge)(model.module).eval().requires_grad_(False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results["generate_eager_tokens_per_s"] = benchmark_generation(module, device, prompt_length, new_tokens)
    print(f"generation, eager: {results['generate_eager_tokens_per_s']:.1f} tokens/s", flush=True)
    if compile:
        clock = time.perf_counter()
        compiled = torch.compile(module, dynamic=True)
        results["generate_compiled_tokens_per_s"] = benchmark_generation(compiled, device, prompt_length, new_tokens)
        results["compile_and_generate_seconds"] = time.perf_counter() - clock
        print(f"generation, compiled: {results['generate_compiled_tokens_per_s']:.1f} tokens/s", flush=True)
    results["generate_peak_memory_gib"] = peak_memory(device)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    run_cli(main)
