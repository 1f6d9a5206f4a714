"""scripts/evaluate_harness.py scores lm-evaluation-harness tasks per sample as the harness's own `hf` model scores
the same weights converted to Hugging Face format, offline, on tasks the test writes as local JSON files."""
import json
from pathlib import Path

import pytest
import torch

from conftest import HF_ULPS, assert_close
from lit_llama.lora import LORA, LoRAArgs, add_lora
from tiny_finetunes import load_base, make_base, randomise_trainable, save_finetuned
from tiny_tokenizers import make_byte_level_bpe, make_llama2_sentencepiece

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = ["red", "blue", "green", "cold", "warm", "one", "two", "three"]

# Multiple choice (loglikelihood of each choice), greedy generation until a stop string (letters the random model
# writes in some answers, not in others), and perplexity (rolling loglikelihood over windows of the context): the
# harness's three kinds of request.
TASKS = {
    "tiny_choice": """
task: tiny_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/choice.json"}}, cache_dir: "{data}/cache"}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "tiny_generate": """
task: tiny_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/generate.json"}}, cache_dir: "{data}/cache"}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["e", "o"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
    "tiny_perplexity": """
task: tiny_perplexity
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}/text.json"}}, cache_dir: "{data}/cache"}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""",
}


def write_tasks(directory: Path) -> Path:
    """The three task YAMLs and their JSON data (varied lengths, so batches are padded) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())

    # odd questions: letter choices as MMLU's (equal but for their last token, so they share one row); even ones:
    # longer, uneven choices
    choice = [{"question": words(2 + i % 5), "label": i % 3,
               "choices": ["A", "B", "C"] if i % 2 else [words(1 + i % 3), words(2), " " + words(3)]}
              for i in range(9)]
    generate = [{"prompt": words(1 + i % 4), "target": words(1)} for i in range(7)]
    text = [{"text": words(5 + 40 * i)} for i in range(4)]  # the longest needs several windows
    for name, rows in (("choice", choice), ("generate", generate), ("text", text)):
        (directory / f"{name}.json").write_text(json.dumps(rows))
    for name, template in TASKS.items():
        (directory / f"{name}.yaml").write_text(template.format(data=directory))
    return directory


def hf_samples(hf_dir: Path, include_path: Path, tasks: list[str], peft_dir=None) -> dict:
    """The harness's own `hf` model (transformers, fp32, one request at a time) on the same tasks."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    model_args = {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "batch_size": 1}
    if peft_dir is not None:
        model_args["peft"] = str(peft_dir)
    results = simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, log_samples=True,
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
    )
    return json.loads(json.dumps(results["samples"], default=handle_non_serializable))  # as our script writes them


def assert_same_samples(ours: dict, theirs: dict, task: str) -> None:
    ours = sorted(ours[task], key=lambda s: s["doc_id"])
    theirs = sorted(theirs[task], key=lambda s: s["doc_id"])
    assert len(ours) == len(theirs) > 0
    for mine, reference in zip(ours, theirs):
        assert mine["arguments"] == reference["arguments"]
        if task == "tiny_generate":
            assert mine["resps"] == reference["resps"] and mine["exact_match"] == reference["exact_match"]
            continue
        if task == "tiny_choice":
            logprobs = [[r[0][0] for r in sample["resps"]] for sample in (mine, reference)]
            greedy = [[r[0][1] for r in sample["resps"]] for sample in (mine, reference)]
            assert greedy[0] == greedy[1]
            assert (mine["acc"], mine["acc_norm"]) == (reference["acc"], reference["acc_norm"])
        else:
            logprobs = [[r[0] for r in sample["resps"]] for sample in (mine, reference)]
        assert_close(torch.tensor(logprobs[0]), torch.tensor(logprobs[1]), ulps=HF_ULPS)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_ours(script, tmp_path: Path, include_path: Path, tasks: list[str], *model_flags) -> dict:
    output = tmp_path / "harness.json"
    result = script("scripts/evaluate_harness.py", *model_flags, "--tasks", ",".join(tasks), "--include_path",
                    include_path, "--precision", "32-true", "--batch_size", 4, "--log_samples", "true",
                    "--output_json", output, check=True)
    assert "tiny_choice" in result.stdout and "acc" in result.stdout  # the harness's table
    return json.loads(output.read_text())["samples"]


@pytest.mark.parametrize("make_tokenizer", [make_byte_level_bpe, make_llama2_sentencepiece],
                         ids=["byte-level-no-bos", "sentencepiece-bos"])
def test_harness_scores_each_sample_of_a_base_as_the_harness_hf_model_does(make_tokenizer, tmp_path, script, offline):
    base_path = make_base(tmp_path / "base", make_tokenizer=make_tokenizer)
    hf_dir = tmp_path / "hf"
    script("scripts/convert_lit_checkpoint.py", "--checkpoint_path", base_path, "--output_dir", hf_dir, check=True)
    include_path = write_tasks(tmp_path / "tasks")
    tasks = list(TASKS)
    ours = run_ours(script, tmp_path, include_path, tasks, "--checkpoint_path", base_path)
    theirs = hf_samples(hf_dir, include_path, tasks)
    for task in tasks:
        assert_same_samples(ours, theirs, task)
    answers = [sample["resps"][0][0] for sample in ours["tiny_generate"]]
    assert any(len(answer) < 3 for answer in answers) and any(len(answer) > 6 for answer in answers), answers


def test_harness_scores_a_lora_finetune_as_the_hf_model_with_its_peft_adapter(tmp_path, script, offline):
    base_path = make_base(tmp_path / "base")
    model = add_lora(load_base(base_path), LoRAArgs(r=4, alpha=16, dropout=0.0, targets=["query", "value", "mlp"]))
    LORA.mark_trainable(model)
    torch.manual_seed(2)
    randomise_trainable(model, std=0.1)
    lora_path = save_finetuned(model, "lora", tmp_path / "out", base_path, r=4, alpha=16, dropout=0.0,
                               targets=["query", "value", "mlp"])
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    script("scripts/convert_lit_checkpoint.py", "--checkpoint_path", base_path, "--output_dir", hf_dir, check=True)
    script("scripts/convert_lora_to_peft.py", "--finetuned_path", lora_path, "--output_dir", peft_dir,
           "--base_model_name_or_path", hf_dir, check=True)
    include_path = write_tasks(tmp_path / "tasks")
    tasks = ["tiny_choice", "tiny_generate"]
    ours = run_ours(script, tmp_path, include_path, tasks, "--finetuned_path", lora_path)
    theirs = hf_samples(hf_dir, include_path, tasks, peft_dir=peft_dir)
    for task in tasks:
        assert_same_samples(ours, theirs, task)
    base_scores = hf_samples(hf_dir, include_path, ["tiny_choice"])["tiny_choice"]
    assert base_scores[0]["resps"] != theirs["tiny_choice"][0]["resps"]  # the adapter changes the scores


def test_an_unknown_task_name_is_one_line(tmp_path, script, offline):
    base_path = make_base(tmp_path / "base")
    result = script("scripts/evaluate_harness.py", "--checkpoint_path", base_path, "--tasks", "hellaswag,hellaswg",
                    "--output_json", tmp_path / "harness.json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown lm-eval task hellaswg (did you mean hellaswag")
