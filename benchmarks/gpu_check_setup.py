"""The first two steps of benchmarks/gpu_check.py (the machine's facts, a random checkpoint), run as scripts.

    python benchmarks/gpu_check_setup.py environment --device cuda --output OUT/environment.json
    python benchmarks/gpu_check_setup.py base --device cuda --output WORK/base --model TinyLlama-1.1B ...

`environment`: GPU, memory, CUDA/torch versions, bf16, copy bandwidth (the CPU model on a CPU) and the packages the
scripts need, named when missing. `base`: a random-weight checkpoint written with lit_llama's API and a tokenizer
trained for it.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from gpu_check_runner import GiB, REPO, write_json

REQUIRED_PACKAGES = ("torch", "lightning", "jsonargparse", "docstring_parser", "typeshed_client", "tokenizers",
                     "sentencepiece", "safetensors", "tqdm", "numpy", "matplotlib")


def environment(device: str, output: Path) -> None:
    """Facts about the machine; on a GPU the device-to-device copy bandwidth (read + write bytes per second)."""
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
             "cpu_count": os.cpu_count()}
    packages, missing = {}, []
    for name in REQUIRED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    facts["packages"] = packages
    if missing:
        facts["missing_packages"] = missing
        write_json(output, facts)
        sys.exit(f"error: missing packages the scripts need: {', '.join(missing)} (pip install -e . installs them)")
    import torch

    from lit_llama.model import LLaMA, Config

    facts.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    with torch.device("meta"):
        model = LLaMA(Config.from_name("7B"))
    # a decode step reads every weight once, except the embedding table (one row of it) when the head is separate
    read = sum(p.numel() for n, p in model.named_parameters() if model.lm_head is None or "wte" not in n)
    facts["decode_bytes_per_token_7b"] = 2 * read  # bf16
    if device == "cuda":
        if not torch.cuda.is_available():
            write_json(output, facts)
            sys.exit("error: no CUDA device: run on a GPU machine, or the CPU smoke test with --cpu --tiny")
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / GiB,
                     capability=f"{properties.major}.{properties.minor}",
                     multiprocessors=properties.multi_processor_count,
                     bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count(),
                     flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                     mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
                     driver=nvidia_smi_driver(), copy_bandwidth_gb_s=copy_bandwidth_gb_s())
    else:
        from lit_llama.precision import bf16_supported

        facts.update(bf16_supported=bf16_supported(), torch_threads=torch.get_num_threads())
    write_json(output, facts)
    print(json.dumps(facts, indent=2))


def copy_bandwidth_gb_s() -> float:
    import torch

    source = torch.empty(GiB // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() / (start.elapsed_time(end) / 1000) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def nvidia_smi_driver() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def base(device: str, output: Path, model: str, block_size: int, tokenizer_vocab: int, dtype: str) -> None:
    """A random-weight checkpoint directory as users have one: lit-llama.pth, model_config.json, tokenizer files.
    The tokenizer is a byte-level BPE (SmolLM2-like: ChatML, no BOS) trained on the built-in tasks' own text, so the
    prepared data tokenizes compactly; the model's vocabulary is the tokenizer's (the shape is otherwise the
    config's)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from lit_llama.builtin_tasks import generate
    from lit_llama.checkpoint import CHECKPOINT_NAME, save_config
    from lit_llama.files import save_torch
    from lit_llama.model import LLaMA, Config
    from lit_llama.prompts import prompt_styles
    from lit_llama.tokenizer import Tokenizer

    records = generate(600, seed=7)
    styles = prompt_styles.values()
    text = [style.apply(r["instruction"], r["input"]) + r["output"] for r in records for style in styles]
    tokenizer = ByteLevelBPETokenizer()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(text, vocab_size=tokenizer_vocab, min_frequency=1, special_tokens=special,
                                  show_progress=False)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    write_json(output / "tokenizer_config.json",
               {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False})

    overrides = dict(vocab_size=Tokenizer(output).vocab_size)
    if block_size:
        overrides["block_size"] = block_size
    config = Config.from_name(model, **overrides)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        weights = LLaMA(config).to(getattr(torch, dtype)).state_dict()
    save_torch({k: v.cpu() for k, v in weights.items()}, output / CHECKPOINT_NAME)
    save_config(config, output)
    parameters = sum(v.numel() for v in weights.values())
    print(f"{model}: {parameters:,} parameters ({dtype}), vocabulary {config.vocab_size}, "
          f"made and saved in {time.perf_counter() - start:.1f} s -> {output / CHECKPOINT_NAME}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("environment", "base"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--model", help="base: the config name")
    parser.add_argument("--block_size", type=int, default=0, help="base: 0 keeps the config's")
    parser.add_argument("--tokenizer_vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.what == "environment":
        environment(args.device, args.output)
    else:
        base(args.device, args.output, args.model, args.block_size, args.tokenizer_vocab, args.dtype)


if __name__ == "__main__":
    main()
