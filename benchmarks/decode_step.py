"""One decode step of one sequence, several ways, on the same weights, interleaved in one process (so load on a shared
machine hits them alike), with a check that each makes the same greedy tokens.

    python benchmarks/decode_step.py --baseline fb5f633 --rounds 9 --threads 1

Variants:
- `baseline`: lit_llama/model.py at `--baseline`, as generation ran it then (`prepare_decoding` where it exists).
- `plain model`: the current model through its modules, `model(token, input_pos=position)`.
- `fast_decode, torch.mv` and `fast_decode, F.linear`: lit_llama/fast_decode.py's `DecodeStep` with either
  matrix-vector kernel, as `generate` runs a frozen model on a CPU (the first on Intel CPUs, the second elsewhere).
- `compiled static`: `torch.compile` of one token through the plain model's modules over the whole static KV cache,
  the position a tensor and the cache beyond it masked: every call has the same shapes, so one compile serves every
  position (the gpt-fast route). It attends over the whole cache at every position (here: the timed position is
  the cache's last, where the others attend over as many keys).
- `compiled static, freezing`: the same with Inductor's `freezing` (weights taken as constants and prepacked for
  oneDNN; the compile takes several times longer and the prepacked copy of the weights is extra memory).
"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lit_llama import model as current_model  # noqa: E402
from lit_llama.files import load_torch  # noqa: E402
from lit_llama.cli import run_cli  # noqa: E402
from lit_llama.fast_decode import DecodeStep  # noqa: E402
from lit_llama.model import LLaMA, apply_rope  # noqa: E402
from lit_llama.precision import cpu_summary  # noqa: E402


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


def build(module, config_name: str, state_dict: dict, cache_length: int):
    model = module.LLaMA(module.Config.from_name(config_name))
    model.load_state_dict(state_dict)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    model.setup_kv_cache(batch_size=1, max_seq_length=cache_length)
    return model


def static_step(model: LLaMA, freezing: bool = False):
    """One token (1, 1) at `position` (a 0-d tensor) through `model`'s modules over its whole KV cache."""
    config, length = model.config, model.max_seq_length
    cos_table, sin_table = (table[:length].to(model.transformer.wte.weight.dtype) for table in model.rope_tables("cpu"))
    keys = torch.arange(length)
    gqa = config.n_query_groups != config.n_head

    def step(idx: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        x = model.transformer.wte(idx)
        cos, sin = cos_table.index_select(0, position.view(1)), sin_table.index_select(0, position.view(1))
        visible = (keys <= position).view(1, length)  # (query, key)
        for block in model.transformer.h:
            attn, h = block.attn, block.norm_1(x)
            q, k, v = (layer(h).view(1, 1, -1, config.head_size) for layer in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            attn.kv_cache.k.index_copy_(2, position.view(1), k.transpose(1, 2))
            attn.kv_cache.v.index_copy_(2, position.view(1), v.transpose(1, 2))
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), attn.kv_cache.k, attn.kv_cache.v, attn_mask=visible, enable_gqa=gqa
            )
            x = x + attn.o_proj(y.view(1, 1, -1))
            x = x + block.mlp(block.norm_2(x))
        x = model.transformer.ln_f(x)
        return F.linear(x, model.transformer.wte.weight) if model.lm_head is None else model.lm_head(x)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, options={"freezing": freezing})
    return lambda idx, position: compiled(idx, torch.tensor(position))


def main(
    baseline: str = "fb5f633",
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    config_name: str = "SmolLM2-135M",
    position: int = 150,
    greedy_tokens: int = 32,
    steps_per_round: int = 5,
    rounds: int = 9,
    threads: int = 1,
    compile: bool = True,
) -> None:
    """Time a bf16 one-token decode step at `position` (the KV cache filled before it).

    Args:
        baseline: The git revision whose lit_llama/model.py is the "before".
        checkpoint_dir: Converted weights; a random-weight model of `config_name` if the directory is absent.
        config_name: The model config.
        position: Tokens already in the KV cache when the timed step runs (the cache holds one more).
        greedy_tokens: Greedy tokens each variant makes (up to `position`) and must agree on.
        steps_per_round: Decode steps per variant per round.
        rounds: Interleaved rounds (the first is a warm-up and not counted).
        threads: torch.set_num_threads.
        compile: Include the `compiled static` variants (a compile takes a minute or more).
    """
    torch.set_num_threads(threads)
    if (checkpoint_dir / "lit-llama.pth").is_file():
        state_dict = load_torch(checkpoint_dir / "lit-llama.pth")
    else:
        torch.manual_seed(0)
        state_dict = current_model.LLaMA(current_model.Config.from_name(config_name)).state_dict()
    old = model_module_at(baseline)
    cache_length = position + 1
    variants = ["plain model", "fast_decode, torch.mv", "fast_decode, F.linear"]
    variants += ["compiled static", "compiled static, freezing"] if compile else []
    models = {name: build(current_model, config_name, state_dict, cache_length) for name in variants}
    models["baseline"] = build(old, config_name, state_dict, cache_length)
    if hasattr(models["baseline"], "prepare_decoding"):
        models["baseline"].prepare_decoding()
    steps = {
        name: lambda idx, pos, model=models[name]: model(idx, input_pos=pos) for name in ("baseline", "plain model")
    }
    steps["fast_decode, torch.mv"] = DecodeStep(models["fast_decode, torch.mv"], mv=True)
    steps["fast_decode, F.linear"] = DecodeStep(models["fast_decode, F.linear"], mv=False)
    if compile:
        steps["compiled static"] = static_step(models["compiled static"])
        steps["compiled static, freezing"] = static_step(models["compiled static, freezing"], freezing=True)
    vocab_size = models["plain model"].config.vocab_size
    start = position + 1 - greedy_tokens
    prompt = (torch.arange(100, 100 + start) % vocab_size).view(1, -1)
    tokens, times = {}, {name: [] for name in steps}
    with torch.inference_mode():
        for name, step in steps.items():  # greedy tokens up to `position` (this also warms up and compiles)
            logits = models[name](prompt, input_pos=0)[:, -1:]
            tokens[name] = []
            for pos in range(start, position + 1):
                tokens[name].append(int(logits[0, -1, :vocab_size].argmax()))
                logits = step(torch.tensor([[tokens[name][-1]]]), pos)
        token = torch.tensor([[tokens["plain model"][-1]]])
        for round_index in range(rounds):
            for name, step in steps.items():
                begin = time.perf_counter()
                for _ in range(steps_per_round):
                    step(token, position)
                if round_index:
                    times[name].append((time.perf_counter() - begin) / steps_per_round * 1e3)
    plain = statistics.median(times["plain model"])
    print(f"{cpu_summary()}, bf16, {torch.get_num_threads()} threads")
    print(f"| variant | ms per decode step, median of {rounds - 1} (min-max) | speed-up vs plain model "
          f"| same {greedy_tokens} greedy tokens as plain model |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        same = tokens[name] == tokens["plain model"]
        print(f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {plain / median:.2f}x | {same} |")


if __name__ == "__main__":
    run_cli(main)
