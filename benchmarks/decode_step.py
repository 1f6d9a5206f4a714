"""Before/after for a change to the model: time one decode step of lit_llama/model.py as it is in the working tree
against the same file at an earlier git revision, on the same weights, interleaved in one process (so load on a
shared machine hits both alike), and check that both give the same logits.

    python benchmarks/decode_step.py --baseline 707968e --rounds 15

Variants: `baseline` (the old model.py), `module path` (the current model.py through its modules: packed weights but
no `DecodeStep`) and `current` (everything `LLaMA.prepare_decoding` sets up, as `generate` runs it).
"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lit_llama import model as current_model  # noqa: E402
from lit_llama.files import load_torch  # noqa: E402
from lit_llama.cli import run_cli  # noqa: E402


def model_module_at(revision: str):
    """lit_llama/model.py as it was at `revision`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:lit_llama/model.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(module, config_name: str, state_dict: dict, cache_length: int, prepare: bool, decode_step: bool = False):
    model = module.LLaMA(module.Config.from_name(config_name))
    model.load_state_dict(state_dict)
    model = model.to(torch.bfloat16).eval()
    model.setup_kv_cache(batch_size=1, max_seq_length=cache_length)
    if prepare:
        model.prepare_decoding()
        if not decode_step:
            model.decode_step = None
    return model


def main(
    baseline: str = "707968e",
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    config_name: str = "SmolLM2-135M",
    position: int = 150,
    steps_per_round: int = 5,
    rounds: int = 15,
    threads: int = 2,
) -> None:
    """Time a bf16 one-token decode step at `position` (the KV cache filled by a prefill before it).

    Args:
        baseline: The git revision whose lit_llama/model.py is the "before".
        checkpoint_dir: Converted weights; a random-weight model of `config_name` if the directory is absent.
        config_name: The model config.
        position: Tokens already in the KV cache when the timed step runs.
        steps_per_round: Decode steps per variant per round.
        rounds: Interleaved rounds (the first is a warm-up and not counted).
        threads: torch.set_num_threads.
    """
    torch.set_num_threads(threads)
    if (checkpoint_dir / "lit-llama.pth").is_file():
        state_dict = load_torch(checkpoint_dir / "lit-llama.pth")
    else:
        torch.manual_seed(0)
        state_dict = current_model.LLaMA(current_model.Config.from_name(config_name)).state_dict()
    old = model_module_at(baseline)
    cache_length = position + 1
    models = {
        "baseline": build(old, config_name, state_dict, cache_length, prepare=False),
        "module path": build(current_model, config_name, state_dict, cache_length, prepare=True),
        "current": build(current_model, config_name, state_dict, cache_length, prepare=True, decode_step=True),
    }
    vocab_size = models["current"].config.vocab_size
    prompt = (torch.arange(100, 100 + position) % vocab_size).view(1, -1)
    token = torch.tensor([[504 % vocab_size]])
    times, logits = {name: [] for name in models}, {}
    with torch.inference_mode():
        for model in models.values():
            model(prompt, input_pos=0)
        for round_index in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    logits[name] = model(token, input_pos=position)
                if round_index:
                    times[name].append((time.perf_counter() - start) / steps_per_round * 1e3)
    base = statistics.median(times["baseline"])
    print(f"| variant | ms per decode step, median of {rounds - 1} (min-max) | speed-up vs baseline | same logits |")
    print("|---|---|---|---|")
    for name, values in times.items():
        same = torch.equal(logits[name], logits["baseline"])
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {base / median:.2f}x | {same} |")


if __name__ == "__main__":
    run_cli(main)
