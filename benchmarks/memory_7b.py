"""Memory of LoRA finetuning a 7B LLaMA: a measured CPU training step, and a memory model for the GPU.

No download: the 7B model is built on the meta device and materialised with random bf16 weights. LoRA r=8 on q and
v is added and made trainable exactly as the training loop does (frozen weights bf16, LoRA A/B fp32), and one
training step (forward, `loss_sum`, backward, AdamW) runs with and without activation checkpointing, each in a
fresh process so its peak RSS is its own.

The memory model: for the parts that depend on tokens it counts the bytes autograd really saves for backward
(with saved-tensor hooks, on a 1- and 2-layer model of 7B width), so it follows the implementation, not a guess.

    python benchmarks/memory_7b.py                 # memory model + measured CPU step (needs ~17 GB free RAM)
    python benchmarks/memory_7b.py --measure false # memory model only (needs ~1 GB)
    python benchmarks/memory_7b.py --config_name Llama-3.1-8B --quantize nf4-dq   # QLoRA's base (~7 GB free RAM)

With --quantize the block linear weights are counted in that format (lit_llama.quantize.bits_per_weight; the
embedding, head and norms stay bf16) plus the largest block matrix dequantized at once inside its layer's forward.
Saved activations are the bf16 model's: a quantized layer saves its input and its quantized weight, as a bf16 layer
saves its input and (already counted) weight. The measured step quantizes each block as it is made (the bf16 model
never exists whole) and dequantizes every matrix in forward and again in backward (and in the recomputation).
"""
import json
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.lora import LORA, LoRAArgs, add_lora
from lit_llama.loss import CHUNK_LOGITS
from lit_llama.method import reset_method_parameters
from lit_llama.model import LLaMA, Config
from lit_llama.training.loop import loss_sum
from lit_llama.quantize import bits_per_weight, block_linear_names, check_training_mode, quantize_linears

GiB = 2**30


def random_lora_model(
    config: Config, lora_r: int, lora_alpha: float, device: str, activation_checkpointing: bool,
    quantize: Optional[str] = None,
) -> torch.nn.Module:
    """A LLaMA with random bf16 weights and LoRA on q, v, set up for training as training.load_model sets it up:
    frozen weights bf16, LoRA A/B fp32, optionally each block recomputed in backward. Wrapped by Fabric like there.
    With `quantize` (nf4, nf4-dq, int8) the block linear weights are quantized block by block as they are made, so
    the bf16 model never exists whole."""
    from lightning.fabric import Fabric

    with torch.device("meta"):
        model = LLaMA(config).to(torch.bfloat16)
    add_lora(model, LoRAArgs(r=lora_r, alpha=lora_alpha, dropout=0.05, targets=["query", "value"]))
    LORA.mark_trainable(model)
    for part in (model.transformer.wte, model.transformer.ln_f, model.lm_head):
        if part is not None:
            materialize_randomly(part, device)
    for index, block in enumerate(model.transformer.h):
        materialize_randomly(block, device)
        if quantize:
            prefix = f"transformer.h.{index}."
            quantize_linears(model, [name for name in block_linear_names(model) if name.startswith(prefix)], quantize)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.activation_checkpointing = activation_checkpointing
    fabric = Fabric(accelerator="cuda" if device.startswith("cuda") else "cpu", devices=1, precision="32-true")
    return fabric.setup_module(model)


def materialize_randomly(module: torch.nn.Module, device: str) -> None:
    """Allocate a meta-device module's tensors on `device`: uniform +-0.02 weights, norms 1, LoRA initialised as it
    is for training (B = 0). Cheap: uniform_ is a single pass, and no weight is left uninitialised."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.fill_(1.0) if "norm" in name else param.uniform_(-0.02, 0.02)
    reset_method_parameters(module)


def train_step(model, optimizer, input_ids: torch.Tensor) -> float:
    """One step as the training loop takes it; every position's label counts (the most memory)."""
    loss = loss_sum(model, input_ids, input_ids) / input_ids[:, 1:].numel()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def saved_activation_bytes(config: Config, n_layer: int, micro_batch: int, seq_length: int) -> int:
    """Bytes autograd keeps for backward in one forward + loss (distinct storages, so views count once)."""
    model = random_lora_model(replace(config, n_layer=n_layer), 8, 16, "cpu", activation_checkpointing=False)
    input_ids = torch.randint(0, config.vocab_size, (micro_batch, seq_length))
    # weights and RoPE tables are saved for backward too, but they exist anyway: not activations
    cos, sin = model.module.rope_tables(input_ids.device)
    existing = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    storages = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum(model, input_ids, input_ids)
    return sum(storages.values())


def memory_model(config: Config, lora_r: int, probe_tokens: int = 64, quantize: Optional[str] = None) -> dict:
    """Per-token activation costs (a_layer, a_head) measured on 1- and 2-layer models, and the fixed costs."""
    one = saved_activation_bytes(config, 1, 1, probe_tokens)
    two = saved_activation_bytes(config, 2, 1, probe_tokens)
    a_layer = (two - one) / probe_tokens
    a_head = (one - a_layer * probe_tokens) / probe_tokens  # embedding output, final norm, head and loss
    with torch.device("meta"):
        meta_model = LLaMA(config)
        n_frozen = sum(p.numel() for p in meta_model.parameters())
        add_lora(meta_model, LoRAArgs(r=lora_r, alpha=2 * lora_r, dropout=0.05, targets=["query", "value"]))
        n_lora = sum(p.numel() for n, p in meta_model.named_parameters() if "lora_" in n)
        block_weights = [meta_model.get_submodule(n).weight for n in block_linear_names(meta_model)]
    weight_bytes = 2 * n_frozen
    dequantized = 0
    if quantize:
        weight_bytes = sum(
            w.numel() * bits_per_weight(quantize, *w.shape) / 8 for w in block_weights
        ) + 2 * (n_frozen - sum(w.numel() for w in block_weights))
        # bf16 values, and torchao's NF4 dequantization builds int64 codes for both halves of each byte first
        dequantized = max(w.numel() for w in block_weights) * (2 + (8 if quantize.startswith("nf4") else 0))
    return dict(n_frozen=n_frozen, n_lora=n_lora, a_layer=a_layer, a_head=a_head, n_layer=config.n_layer,
                weight_bytes=weight_bytes, dequantized=dequantized)


def predict(m: dict, config: Config, tokens: int, activation_checkpointing: bool) -> dict:
    """Peak bytes = weights + LoRA state + saved activations + one chunk of the loss's logits.

    weights         2 * N_frozen                      (bf16; quantized: block weights at their format's bits, plus
                                                       one block matrix dequantized at a time)
    LoRA state     16 * N_lora                         (fp32 weight, gradient, AdamW exp_avg and exp_avg_sq)
    activations    tokens * (L * a_layer + a_head)    without checkpointing
                   tokens * (L * 2 * C + a_layer + a_head)   with it: each block keeps only its bf16 input, and
                                                       one block's activations exist again while it is recomputed
    loss chunk     min(tokens, R) * V * 8             (lit_llama/loss.py: R = CHUNK_LOGITS / V positions' logits in bf16
                                                       and fp32 and their bf16 gradient; the whole N x V never exists)
    """
    per_layer = 2 * config.n_embd if activation_checkpointing else m["a_layer"]
    extra_layer = m["a_layer"] if activation_checkpointing else 0
    parts = dict(
        weights=m["weight_bytes"] + m["dequantized"], lora_state=16 * m["n_lora"],
        activations=tokens * (m["n_layer"] * per_layer + extra_layer + m["a_head"]),
        loss_chunk=min(tokens, max(1, CHUNK_LOGITS // config.vocab_size)) * config.vocab_size * 8,
    )
    return {**parts, "total": sum(parts.values())}


def measure_step(
    config: Config, micro_batch: int, seq_length: int, activation_checkpointing: bool, threads: int,
    quantize: Optional[str] = None,
) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = random_lora_model(config, 8, 16, "cpu", activation_checkpointing, quantize)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    input_ids = torch.randint(0, config.vocab_size, (micro_batch, seq_length))
    loss = train_step(model, optimizer, input_ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(activation_checkpointing=activation_checkpointing, rss_after_build=before, peak_rss=peak, loss=loss)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(
    config_name: str = "7B",
    micro_batch: int = 1,
    seq_length: int = 64,
    measure: bool = True,
    threads: int = 2,
    lora_r: int = 8,
    predict_for: list[str] = ["1x64", "4x256", "4x512"],
    child: Optional[bool] = None,
    quantize: Optional[str] = None,
) -> None:
    """Print the memory model's predictions and (with --measure) the measured peak RSS of one CPU training step.

    Args:
        config_name: Model config (lit_llama.model.configs).
        micro_batch: Samples in the measured step.
        seq_length: Tokens per sample in the measured step.
        measure: Build the full model and run the step (about 2 bytes per parameter of RAM: 14 GB for 7B; nf4
            about 0.55 bytes per block parameter).
        threads: torch threads for the measured step.
        lora_r: LoRA rank (alpha is twice it, as r=8 alpha=16).
        predict_for: micro_batch x seq_length settings to predict the GPU peak for.
        child: Internal: measure one step with activation checkpointing on/off in this process and print JSON.
        quantize: The frozen base in this lit_llama.quantize training format (nf4, nf4-dq, int8).
    """
    config = Config.from_name(config_name)
    if child is not None:
        print("RESULT " + json.dumps(measure_step(config, micro_batch, seq_length, child, threads, quantize)))
        return

    if quantize is not None:
        check_training_mode(quantize, "lora")
    m = memory_model(config, lora_r, quantize=quantize)
    if quantize:
        print(f"base weights in {quantize}: {m['weight_bytes'] / GiB:.2f} GiB (bf16: {2 * m['n_frozen'] / GiB:.2f}), "
              f"largest block matrix dequantized: {m['dequantized'] / GiB:.2f} GiB")
    print(f"{config_name}: N_frozen = {m['n_frozen'] / 1e9:.3f} B parameters, N_lora = {m['n_lora'] / 1e6:.2f} M")
    print(f"saved activations per token: a_layer = {m['a_layer'] / 1024:.1f} KiB per layer "
          f"({m['a_layer'] / config.n_embd:.1f} bytes per hidden unit), a_head = {m['a_head'] / 1024:.1f} KiB")
    print("| micro-batch x tokens | activation checkpointing | weights | LoRA state | activations | loss chunk | "
          "predicted peak |")
    print("|---|---|---|---|---|---|---|")
    for setting in predict_for:
        batch, length = (int(v) for v in setting.split("x"))
        for ac in (False, True):
            p = predict(m, config, batch * length, ac)
            print(f"| {setting} | {'yes' if ac else 'no'} | {p['weights'] / GiB:.2f} | {p['lora_state'] / GiB:.3f} | "
                  f"{p['activations'] / GiB:.2f} | {p['loss_chunk'] / GiB:.2f} | {p['total'] / GiB:.2f} GiB |")
    if not measure:
        return

    need = predict(m, config, micro_batch * seq_length, False)["total"] * 1.15
    if available_memory() < need:
        raise UserError(
            f"measuring needs ~{need / GiB:.0f} GiB of free RAM, {available_memory() / GiB:.1f} GiB is available "
            "(run with --measure false for the memory model only)"
        )
    print(f"measured on CPU, micro-batch {micro_batch} x {seq_length} tokens, one LoRA training step:")
    for ac in (False, True):
        command = [sys.executable, __file__, "--config_name", config_name, "--micro_batch", micro_batch,
                   "--seq_length", seq_length, "--threads", threads, "--child", str(ac).lower()]
        command += ["--quantize", quantize] if quantize else []
        out = subprocess.run([str(c) for c in command], capture_output=True, text=True)
        if out.returncode != 0:
            raise UserError(f"the measuring process failed: {out.stderr.strip().splitlines()[-1:]}")
        r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        p = predict(m, config, micro_batch * seq_length, ac)
        print(f"  activation checkpointing {'on ' if ac else 'off'}: RSS after building {r['rss_after_build'] / GiB:.2f} "
              f"GiB, peak {r['peak_rss'] / GiB:.2f} GiB (step adds {(r['peak_rss'] - r['rss_after_build']) / GiB:.2f} "
              f"GiB); model predicts {p['total'] / GiB:.2f} GiB; loss {r['loss']:.3f}")


if __name__ == "__main__":
    run_cli(main)
