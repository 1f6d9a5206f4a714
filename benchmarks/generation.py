"""Generation speed on this machine: lit-llama's `generate` vs Hugging Face transformers' `generate`, same weights.

All run greedy on the same prompt and are forced to make every one of `new_tokens` tokens (EOS disabled).
lit-llama runs in the precision it defaults to on this CPU (bf16 weights, whose prefill runs its products in fp32
where bf16 is not native; `--precision 32-true` to force fp32 weights); transformers in fp32 (its default dtype for a model built in code, and
what its users on a CPU without native bf16 run) and in bf16.
lit-llama runs twice: as `generate` runs a frozen model on a CPU (fast_decode's `DecodeStep`), and through the plain
model's modules (as it runs a model with trainable weights, e.g. evaluation during finetuning).
They are interleaved A B C A B C ... for `rounds` rounds so that drifting load on a shared machine hits all alike;
medians (and min-max) are reported. Also measured: the copy bandwidth of a large tensor, and from it the
memory-bandwidth bound of decoding (every weight is read once per token) and how close we get to it.

    python benchmarks/generation.py --checkpoint_dir checkpoints/smollm2-135m-instruct --rounds 5 --threads 2
    python benchmarks/generation.py --quantize int8   # both sides int8 weight-only, through torchao's Int8Tensor

With --quantize int8 lit-llama runs `quantize_for_generation(model, "int8")` and transformers torchao's
`quantize_(model, Int8WeightOnlyConfig())` on the same block linear layers (the tied head stays bf16 on both sides):
the same int8 codes and per-row scales, each library's own decoding loop.

Without the converted checkpoint a random-weight SmolLM2-135M is used (same shapes, so the same speed).
"""
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.checkpoint import load
from lit_llama.cli import run_cli
from lit_llama.convert import config_to_hf, lit_to_hf_name
from lit_llama.generation import generate
from lit_llama.errors import UserError
from lit_llama.model import LLaMA, Config
from lit_llama.precision import describe, resolve_precision, weights_dtype
from lit_llama.quantize import parameter_bytes, quantize_for_generation


def random_model(name: str) -> LLaMA:
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    model.to_empty(device="cpu").reset_parameters()
    return model.requires_grad_(False)  # frozen, as `load` returns a model


def hf_model(model: LLaMA, dtype: torch.dtype = torch.bfloat16):
    """transformers' LlamaForCausalLM holding the same weights as `model`, in `dtype`."""
    import transformers

    config = model.config
    hf_config = {k: v for k, v in config_to_hf(config).items() if k not in ("rope_theta", "rope_scaling")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]
        state_dict[lit_to_hf_name(name)] = tensor
    hf.load_state_dict(state_dict, strict=False)  # a tied head has no key of its own
    hf.generation_config.eos_token_id = None  # make all tokens
    hf.generation_config.pad_token_id = 0
    return hf.to(dtype).eval()


def quantize_int8_like_ours(hf) -> None:
    """transformers' model with the block projections int8 weight-only, as `quantize_for_generation` makes ours."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(hf, Int8WeightOnlyConfig(), filter_fn=lambda module, name: ".layers." in name and
              isinstance(module, torch.nn.Linear))


def time_ours(model: LLaMA, prompt: torch.Tensor, new_tokens: int, fast: bool = True) -> tuple[float, list[int]]:
    """fast=False: the plain model path, which `generate` takes for a model with trainable weights."""
    model.requires_grad_(not fast)
    start = time.perf_counter()
    tokens = list(generate(model, prompt, new_tokens, temperature=0.0))
    seconds = time.perf_counter() - start
    model.requires_grad_(False)
    return seconds, tokens


@torch.inference_mode()
def time_hf(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = model.generate(prompt.unsqueeze(0), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start, out[0, prompt.size(0) :].tolist()


def copy_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes moved per second by copying a large tensor (each byte is read once and written once)."""
    source = torch.ones(megabytes * 2**20, dtype=torch.uint8)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times)


def bytes_per_token(model: LLaMA) -> int:
    """Weights read to decode one token: every matrix once (the embedding only by its one looked-up row, but a tied
    head reads it whole), norms included."""
    total = sum(parameter_bytes(model).values())  # quantized weights: their codes and scales
    if model.lm_head is not None:  # an untied embedding table is only indexed
        weight = model.transformer.wte.weight
        total -= weight.numel() * weight.element_size()
    return total


def main(
    checkpoint_dir: Optional[Path] = Path("checkpoints/smollm2-135m-instruct"),
    prompt_length: int = 16,
    new_tokens: int = 256,
    rounds: int = 5,
    threads: int = 2,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
) -> None:
    """Benchmark greedy generation against transformers.

    Args:
        checkpoint_dir: A converted checkpoint; if it does not exist, a random-weight SmolLM2-135M.
        prompt_length: Tokens in the (fixed, pseudo-random) prompt.
        new_tokens: Tokens each run must generate.
        rounds: Interleaved rounds (each times both implementations once).
        threads: torch.set_num_threads for both.
        quantize: "int8": both sides weight-only int8 (torchao's Int8Tensor, one scale per row).
        precision: lit-llama's precision (default: what generation defaults to on this CPU).
    """
    torch.set_num_threads(threads)
    precision = resolve_precision(precision, decoding=True)
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        model, _ = load(checkpoint_dir, "cpu", torch.float32)
        source = str(checkpoint_dir)
    else:
        torch.manual_seed(0)
        model = random_model("SmolLM2-135M")
        source = "random-weight SmolLM2-135M"
    hf_models = {"transformers fp32": hf_model(model, torch.float32), "transformers bf16": hf_model(model)}
    model = model.to(weights_dtype(precision)).eval()
    if quantize is not None:
        if quantize != "int8":
            raise UserError(f"--quantize {quantize!r}: transformers and lit-llama share int8 (torchao) only")
        quantize_for_generation(model, "int8")
        hf_models = {"transformers bf16 int8": hf_models["transformers bf16"]}
        quantize_int8_like_ours(hf_models["transformers bf16 int8"])
    prompt = torch.randint(0, model.config.vocab_size, (prompt_length,), generator=torch.Generator().manual_seed(0))

    time_ours(model, prompt, 8), time_ours(model, prompt, 8, fast=False)  # warm-up
    for hf in hf_models.values():
        time_hf(hf, prompt, 8)
    ours, plain, theirs = [], [], {name: [] for name in hf_models}
    hf_tokens = {}
    for r in range(rounds):
        seconds, our_tokens = time_ours(model, prompt, new_tokens)
        ours.append(new_tokens / seconds)
        seconds, plain_tokens = time_ours(model, prompt, new_tokens, fast=False)
        plain.append(new_tokens / seconds)
        for name, hf in hf_models.items():
            seconds, hf_tokens[name] = time_hf(hf, prompt, new_tokens)
            theirs[name].append(new_tokens / seconds)
        print(f"round {r + 1}: lit-llama {ours[-1]:.1f} tok/s (plain model {plain[-1]:.1f}), "
              + ", ".join(f"{name} {values[-1]:.1f}" for name, values in theirs.items()), file=sys.stderr)

    def agreement(tokens: list[int]) -> int:
        return next((i for i, (a, b) in enumerate(zip(our_tokens, tokens)) if a != b), len(our_tokens))

    bandwidth = copy_bandwidth()
    bound = bandwidth / bytes_per_token(model)
    median_ours, median_plain = statistics.median(ours), statistics.median(plain)
    print(f"| machine | {describe(precision, torch.device('cpu'))}, {os.cpu_count()} cores |")
    print(f"| versions | python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__} |")
    print(f"| model | {source}, {quantize or precision}, prompt {prompt_length} tokens, {new_tokens} new tokens, "
          f"greedy, {rounds} rounds |")
    print(f"| lit-llama | {median_ours:.1f} tok/s (min {min(ours):.1f}, max {max(ours):.1f}) |")
    print(f"| lit-llama, plain model path | {median_plain:.1f} tok/s (min {min(plain):.1f}, max {max(plain):.1f}) |")
    for name, values in theirs.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} tok/s (min {min(values):.1f}, max {max(values):.1f}); lit-llama "
              f"{median_ours / median:.2f}x; the first {agreement(hf_tokens[name])} of {new_tokens} tokens agree |")
    print(f"| copy bandwidth | {bandwidth / 1e9:.1f} GB/s; "
          f"weights read per token {bytes_per_token(model) / 1e6:.0f} MB |")
    print(f"| bandwidth bound | {bound:.1f} tok/s; lit-llama reaches {100 * median_ours / bound:.0f}% of it |")
    print(f"| same greedy tokens | plain model path: the first {agreement(plain_tokens)} of {new_tokens} |")

if __name__ == "__main__":
    run_cli(main)
