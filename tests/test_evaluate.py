"""scripts/evaluate_tasks.py scores base and finetuned checkpoints of every method with exact match per task."""
import json

import pytest

from conftest import run_script
from lit_llama.adapter import AdapterArgs
from lit_llama.adapter_v2 import add_adapter_v2
from lit_llama.finetuned import METHODS, load_finetuned
from lit_llama.method import reset_method_parameters
from lit_llama.generation import generate
from lit_llama.prompts import PromptStyle
from lit_llama.tokenizer import Tokenizer
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned

RECORDS = [
    {"instruction": "Sort these words.", "input": "pear apple", "task": "sort"},
    {"instruction": "Reverse the order of these words.", "input": "one two three", "task": "reverse"},
]
MAX_NEW_TOKENS = 6


def greedy_answer(model, tokenizer, record) -> str:
    prompt = tokenizer.encode(PromptStyle.from_name("alpaca").apply(record["instruction"], record["input"]))
    tokens = list(generate(model, prompt, MAX_NEW_TOKENS, temperature=0, stop_ids=tokenizer.stop_ids))
    return tokenizer.decode([t for t in tokens if t not in tokenizer.stop_ids]).strip()


@pytest.mark.parametrize("method", ["base", "adapter_v2", "full"])
def test_scores_each_method_per_task(method, tmp_path):
    base_path = make_base(tmp_path / "base", "tiny-gqa")
    args = ["--checkpoint_path", base_path]
    model = load_base(base_path)
    if method != "base":
        if method == "adapter_v2":
            add_adapter_v2(model, AdapterArgs(prompt_length=4, start_layer=1))
            reset_method_parameters(model)
        METHODS[method].mark_trainable(model)
        randomise_trainable(model)
        options = dict(prompt_length=4, start_layer=1) if method == "adapter_v2" else {}
        args += ["--finetuned_path", save_finetuned(model, method, tmp_path / "out", base_path, **options)]
        model, _, _ = load_finetuned(args[-1], base_path)  # merged, as the script evaluates it
    tokenizer = Tokenizer(base_path.parent)

    # the first reference is what the model answers (an exact match), the second cannot be
    records = [dict(RECORDS[0], output=greedy_answer(model, tokenizer, RECORDS[0])), dict(RECORDS[1], output="nope")]
    (tmp_path / "records.json").write_text(json.dumps(records))
    result = run_script(
        "scripts/evaluate_tasks.py", *args, "--data_file", tmp_path / "records.json", "--prompt_style", "alpaca",
        "--max_new_tokens", MAX_NEW_TOKENS, "--precision", "32-true", "--output_json", tmp_path / "eval.json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["exact_match_by_task"] == {"reverse": 0.0, "sort": 100.0}
    assert scores["exact_match"] == 50.0
    assert [r["exact"] for r in scores["results"]] == [True, False]
    assert "overall:  50.0% exact match (2 records)" in result.stdout


def test_malformed_records_give_one_line(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    (tmp_path / "records.json").write_text(json.dumps([{"instruction": "Say hi."}]))
    result = run_script("scripts/evaluate_tasks.py", "--checkpoint_path", base_path,
                        "--data_file", tmp_path / "records.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'records.json'}, record 1 has no 'output' "
                                                  "field (it has: instruction)"]
