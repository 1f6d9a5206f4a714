"""Exact-match evaluation: greedy answers on a held-out split, scored per task against the reference outputs.

Works for a base checkpoint (`--checkpoint_path` alone) and for LoRA, adapter and full finetunes
(`--finetuned_path`, whose finetune_config.json names the method and its settings).
"""
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from lit_llama.checkpoint import checkpoint_dir, load
from lit_llama.files import check_outputs, read_json_object, save_json
from lit_llama.data import load_records, parse_json, parse_jsonl
from lit_llama.cli import OutputPath, run_cli
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import generate_batch, setup_runtime
from lit_llama.chat_data import load_conversations
from lit_llama.errors import UserError
from lit_llama.prompts import resolve_prompt_style

DEFAULT_CHECKPOINT = Path("checkpoints/smollm2-135m-instruct/lit-llama.pth")
ANSWER_SLACK_TOKENS = 4  # room for a different tokenization of the same text, and for the stop token


def main(
    checkpoint_path: Optional[Path] = None,
    finetuned_path: Optional[Path] = None,
    data_dir: Path = Path("data/builtin"),
    data_file: Optional[Path] = None,
    prompt_style: Optional[str] = None,
    max_records: Optional[int] = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    precision: Optional[str] = None,
    output_json: OutputPath = OutputPath("out/evaluation.json"),
    overwrite: bool = False,
) -> None:
    """Generate greedily for each held-out record and report exact match per task and overall.

    Args:
        checkpoint_path: the base model's lit-llama.pth (default: with --finetuned_path the base recorded at
            finetuning time, else checkpoints/smollm2-135m-instruct/lit-llama.pth).
        finetuned_path: a LoRA, adapter or full finetuning checkpoint (finetune_config.json beside it); omit
            to evaluate the base model.
        data_dir: a prepared dataset; its test.json holds the held-out records.
        data_file: instead of data_dir, your own JSON, JSONL or CSV records with instruction, input (optional),
            output and task (optional) fields, or conversations ({"messages": [...]}; the last assistant turn is
            the reference answer).
        prompt_style: the prompt template; default: the finetuning's, else the dataset's, else the checkpoint's own
            chat template, else alpaca.
        max_records: evaluate only the first N records.
        max_new_tokens: the longest answer generated (generation also stops a few tokens past the reference's
            length, where an exact match is no longer possible).
        batch_size: how many records with prompts of equal length are answered together.
        precision: Fabric precision name; default bf16 where bf16 is native, else fp32 (batches of answers are
            bound by arithmetic, as training is: lit_llama/precision.py).
        output_json: where the per-record answers and the scores are written.
        overwrite: replace an existing --output_json.
    """
    for flag, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("max_records", max_records)):
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    # before the long work, not after it
    models = [checkpoint_dir(path) for path in (checkpoint_path, finetuned_path) if path is not None]
    inputs = [*models, data_file, data_dir / "test.json"]
    check_outputs("--output_json", [output_json], inputs, overwrite)
    records = evaluation_records(data_file or data_dir / "test.json")[:max_records]
    runtime = setup_runtime(precision, batched=True)
    device, dtype = runtime.device, runtime.dtype
    if finetuned_path is None:
        checkpoint_path = checkpoint_path or DEFAULT_CHECKPOINT
        model, tokenizer = load(checkpoint_path, device=device, dtype=dtype)
        trained_style = None
    else:
        model, tokenizer, finetune_config = load_finetuned(finetuned_path, checkpoint_path, device=device, dtype=dtype)
        checkpoint_path = checkpoint_path or finetune_config["base_checkpoint"]
        trained_style = finetune_config.get("prompt_style")
    runtime.announce()
    style = resolve_prompt_style(
        prompt_style or trained_style or dataset_prompt_style(data_dir, data_file), tokenizer.path.parent
    )

    # records whose prompts have the same token length are answered together, one decode step for the whole group
    prompts = [
        style.conversation_ids(tokenizer, r["messages"]) if "messages" in r
        else style.prompt_ids(tokenizer, r["instruction"], r.get("input", ""))
        for r in records
    ]
    # an answer much longer than the reference cannot match it: stop there instead of letting the model ramble
    budgets = [
        min(max_new_tokens, len(tokenizer.encode(r["output"], bos=False, eos=False)) + ANSWER_SLACK_TOKENS)
        for r in records
    ]
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[prompt.size(0)].append(i)
    groups = [same[k : k + batch_size] for same in by_length.values() for k in range(0, len(same), batch_size)]
    answers = {}
    start = time.perf_counter()
    with tqdm(total=len(records), desc="evaluating", unit="record", file=sys.stderr) as bar, runtime.autocast():
        for group in groups:
            steps = generate_batch(model, torch.stack([prompts[i] for i in group]), max(budgets[i] for i in group),
                                   temperature=0, stop_ids=tokenizer.stop_ids)
            rows = torch.stack(list(steps), dim=1).tolist()
            for i, row in zip(group, rows):
                row = row[: budgets[i]]
                cut = next((n for n, token in enumerate(row) if token in tokenizer.stop_ids), len(row))
                answers[i] = tokenizer.decode(row[:cut]).strip()
            bar.update(len(group))

    results = []
    correct_by_task, total_by_task = defaultdict(int), defaultdict(int)
    for i, record in enumerate(records):
        exact = answers[i] == record["output"].strip()
        task = record.get("task", "all")
        correct_by_task[task] += exact
        total_by_task[task] += 1
        shown = record.get("input", "") if "messages" not in record else record["messages"][-1]["content"]
        results.append({"task": task, "input": shown, "expected": record["output"], "answer": answers[i], "exact": exact})

    scores = {task: 100.0 * correct_by_task[task] / total_by_task[task] for task in sorted(total_by_task)}
    overall = 100.0 * sum(correct_by_task.values()) / len(records)
    summary = {
        "checkpoint_path": str(checkpoint_path),
        "finetuned_path": str(finetuned_path) if finetuned_path else None,
        "records": len(records),
        "exact_match": overall,
        "exact_match_by_task": scores,
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    for task, score in scores.items():  # the scores first: they survive a failing write
        print(f"{task:>24}: {score:5.1f}% exact match ({total_by_task[task]} records)")
    print(f"{'overall':>24}: {overall:5.1f}% exact match ({len(records)} records)  -> {output_json}")
    save_json(summary, output_json)


def evaluation_records(path: Path) -> list[dict]:
    """Instruction records (instruction, input, output, task), or conversations ({"messages": [...]}: the model
    answers the last assistant turn from what comes before it)."""
    if not is_conversation_file(path):
        return load_records(path)
    records = []
    for messages in load_conversations(path):
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError(f"{path}: a conversation has no assistant turn to evaluate")
        records.append({"messages": messages[:last], "output": messages[last]["content"]})
    return records


def is_conversation_file(path: Path) -> bool:
    """Whether the first record of a .json/.jsonl file is a conversation (messages or ShareGPT conversations)."""
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        return False
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = parse_json(text, path) if path.suffix.lower() == ".json" else parse_jsonl(text, path)
    return bool(rows) and isinstance(rows[0], dict) and ("messages" in rows[0] or "conversations" in rows[0])



def dataset_prompt_style(data_dir: Path, data_file: Optional[Path]) -> Optional[str]:
    """The prepared dataset's prompt style (None: the checkpoint's own template, else alpaca)."""
    meta_file = data_dir / "meta.json"
    if data_file is None and meta_file.is_file():
        return read_json_object(meta_file).get("prompt_style")
    return None


if __name__ == "__main__":
    run_cli(main)
