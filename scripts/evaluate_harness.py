"""Standard benchmarks through EleutherAI's lm-evaluation-harness (hellaswag, arc_easy, mmlu, ...): a base checkpoint
or any finetune, scored by the harness's own task definitions with our batching and KV cache. Needs
`pip install -e ".[harness]"`; see howto/evaluate.md."""
import sys
from pathlib import Path
from typing import Optional

from lit_llama.checkpoint import checkpoint_dir
from lit_llama.cli import OutputPath, run_cli
from lit_llama.errors import UserError
from lit_llama.files import check_outputs, save_json

DEFAULT_CHECKPOINT = Path("checkpoints/smollm2-135m-instruct/lit-llama.pth")


def main(
    tasks: str,
    checkpoint_path: Optional[Path] = None,
    finetuned_path: Optional[Path] = None,
    include_path: Optional[Path] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 16,
    precision: Optional[str] = None,
    log_samples: bool = False,
    seed: int = 0,
    output_json: OutputPath = OutputPath("out/harness.json"),
    overwrite: bool = False,
) -> dict:
    """Run lm-evaluation-harness tasks on a lit-llama model and print the harness's table of scores.

    Args:
        tasks: harness task, group or tag names, comma-separated: `--tasks hellaswag,arc_easy,mmlu`.
        checkpoint_path: the base model's lit-llama.pth (default: with --finetuned_path the base recorded at
            finetuning time, else checkpoints/smollm2-135m-instruct/lit-llama.pth).
        finetuned_path: a LoRA, adapter or full finetuning checkpoint (finetune_config.json beside it); omit to
            evaluate the base model.
        include_path: a directory of your own task YAML files (lm-eval's task format).
        num_fewshot: examples shown before each question (default: each task's own).
        limit: evaluate only the first N documents of each task (a fraction below 1: that share of them).
        batch_size: requests per forward pass (loglikelihoods) or per generation batch.
        precision: Fabric precision name; default bf16 where bf16 is native, else fp32 (scoring whole sequences
            is bound by arithmetic, as training is: lit_llama/precision.py).
        log_samples: also write every request's prompt, model answer and score to the output JSON.
        seed: seed for the few-shot example choice and any sampling.
        output_json: where the harness's results are written.
        overwrite: replace an existing --output_json.
    """
    from lit_llama import harness

    harness.require_lm_eval()
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks names no task")
    # before the long work, not after it
    models = [checkpoint_dir(path) for path in (checkpoint_path, finetuned_path) if path is not None]
    check_outputs("--output_json", [output_json], [*models, include_path], overwrite)
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    limit = int(limit) if limit is not None and limit >= 1 else limit
    manager = harness.task_manager(names, include_path)  # an unknown name fails before the model loads
    model, tokenizer, runtime, name = harness.load_model(checkpoint_path, finetuned_path, precision, DEFAULT_CHECKPOINT)
    lm = harness.HarnessLM(model, tokenizer, runtime, batch_size)
    results = harness.evaluate(lm, names, manager, num_fewshot, limit, log_samples, seed)
    results["model"] = name

    from lm_eval.utils import make_table

    print(make_table(results))  # the scores first: they survive a failing write
    save_json(results, output_json)
    print(f"-> {output_json}", file=sys.stderr)
    return results



if __name__ == "__main__":
    run_cli(main)
