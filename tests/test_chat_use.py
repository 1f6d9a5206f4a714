"""A finetune of a checkpoint with a chat template answers the next assistant turn of a conversation, in generation
(generate/finetuned.py --messages) and in evaluation (scripts/evaluate_tasks.py on {"messages": ...} records)."""
import json

import pytest

from conftest import run_script
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import generate
from lit_llama.prompts import resolve_prompt_style
from tiny_finetunes import make_chat_lora

PREFIX = [{"role": "system", "content": "You sort words."}, {"role": "user", "content": "Sort: stone tree"}]
NEW_TOKENS = 6


@pytest.fixture
def chat_finetune(tmp_path):
    path, base_path = make_chat_lora(tmp_path)
    merged, tokenizer, _ = load_finetuned(path)
    style = resolve_prompt_style("chat_template", base_path.parent)
    prompt = style.conversation_ids(tokenizer, PREFIX)
    tokens = list(generate(merged, prompt, NEW_TOKENS, temperature=0, stop_ids=tokenizer.stop_ids))
    answer = tokenizer.decode([t for t in tokens if t not in tokenizer.stop_ids])
    return path, answer


def test_generate_answers_the_next_assistant_turn_of_a_conversation(chat_finetune, tmp_path):
    path, answer = chat_finetune
    (tmp_path / "chat.json").write_text(json.dumps(PREFIX))
    result = run_script("generate/finetuned.py", "--finetuned_path", path, "--messages", tmp_path / "chat.json",
                        "--max_new_tokens", NEW_TOKENS, "--temperature", 0, "--precision", "32-true", check=True)
    assert result.stdout == answer + "\n"


def test_evaluate_scores_conversation_records_on_their_last_assistant_turn(chat_finetune, tmp_path):
    path, answer = chat_finetune
    records = [{"messages": PREFIX + [{"role": "assistant", "content": answer}]},
               {"messages": PREFIX + [{"role": "assistant", "content": "certainly not this"}]}]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    result = run_script("scripts/evaluate_tasks.py", "--finetuned_path", path, "--data_file", tmp_path / "chats.jsonl",
                        "--max_new_tokens", NEW_TOKENS, "--precision", "32-true",
                        "--output_json", tmp_path / "eval.json", check=True)
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert [r["exact"] for r in scores["results"]] == [True, False] and scores["records"] == 2


def test_evaluation_scores_survive_an_unwritable_output_and_bad_batch_sizes_are_refused(chat_finetune, tmp_path):
    path, _ = chat_finetune
    records = [{"messages": PREFIX + [{"role": "assistant", "content": "x"}]}]
    (tmp_path / "chats.json").write_text(json.dumps(records))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = ["--finetuned_path", path, "--data_file", tmp_path / "chats.json", "--precision", "32-true"]
    early = run_script("scripts/evaluate_tasks.py", *args, "--output_json", blocker / "eval.json")
    assert early.returncode == 2 and early.stderr.strip().splitlines()[-1].startswith("error: cannot write --output_json")
    assert "evaluating" not in early.stderr  # refused before the long work
    zero = run_script("scripts/evaluate_tasks.py", *args, "--batch_size", 0)
    assert zero.returncode == 2 and "error: --batch_size must be at least 1, got 0" in zero.stderr
