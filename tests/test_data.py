import importlib.util
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from lit_llama.builtin_tasks import TASKS, generate
from lit_llama import data
from lit_llama.cli import run_cli
from lit_llama.data import IGNORE_INDEX, check_prepared_tokenizer, load_prepared, load_records, prepare, tokenize
from lit_llama.errors import UserError
from lit_llama.prompts import PromptStyle, prompt_styles, register
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import make_byte_level_bpe, make_sentencepiece

ALPACA = [
    {"instruction": f"Name item {i}.", "input": "" if i % 2 else f"a list of {i} things", "output": f"It is thing {i}."}
    for i in range(30)
]
DOLLY = [
    {"instruction": f"Summarise text {i}.", "context": "" if i % 3 else f"Some context {i}.",
     "response": f"Summary {i}.", "category": "summarization"}
    for i in range(20)
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return make_sentencepiece(tmp_path_factory.mktemp("sp")).parent


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_byte_level_bpe(tmp_path_factory.mktemp("bpe")).parent


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def prepare_records(records, destination, tokenizer, **overrides):
    options = dict(test_split_size=5, max_seq_length=256, seed=42, mask_inputs=True, prompt_style="alpaca",
                   skip_long=False)
    options.update(overrides)
    return prepare(records, destination, tokenizer, "test records", **options)


def assert_masked_over_prompt(samples, records, tokenizer, style):
    for sample, record in zip(samples, records):
        prompt = tokenizer.encode(style.apply(record["instruction"], record["input"])).tolist()
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.dtype == labels.dtype == torch.long
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()
        assert labels[len(prompt) :].tolist() == ids[len(prompt) :].tolist()  # nothing of the response is masked
        assert ids[-1] == tokenizer.eos_id


def test_prompt_styles():
    alpaca = PromptStyle.from_name("alpaca")
    assert alpaca.apply("Do it.", "this").endswith("### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Response:\n")
    assert alpaca.apply("Do it.").endswith("### Instruction:\nDo it.\n\n### Response:\n")
    assert "### Input" not in alpaca.apply("Do it.")
    chatml = PromptStyle.from_name("chatml")
    assert chatml.apply("Do it.") == "<|im_start|>user\nDo it.<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.apply("Do it.", "this") == "<|im_start|>user\nDo it.\nthis<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.apply("{input} {x}") == "<|im_start|>user\n{input} {x}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserError, match="unknown prompt style 'nope'"):
        PromptStyle.from_name("nope")
    register(PromptStyle("test-qa", with_input="Q: {instruction} ({input})\nA: ",
                         without_input="Q: {instruction}\nA: "))
    try:
        assert PromptStyle.from_name("test-qa").apply("Why?", "now") == "Q: Why? (now)\nA: "
    finally:
        del prompt_styles["test-qa"]


def test_prepare_alpaca_script_sentencepiece(tmp_path, sp_dir, script):
    data_file = write_json(tmp_path / "alpaca.json", ALPACA)
    out = tmp_path / "out"
    result = script("scripts/prepare_alpaca.py", "--data_file", data_file, "--destination_path", out,
                    "--tokenizer_path", sp_dir / "tokenizer.model", "--test_split_size", 6, check=True)
    assert "24 train and 6 test samples" in result.stdout
    train, test, meta = load_prepared(out)
    test_records = json.loads((out / "test.json").read_text())
    tokenizer = Tokenizer(sp_dir / "tokenizer.model")
    assert (len(train), len(test), len(test_records)) == (24, 6, 6)
    assert meta["tokenizer"] == tokenizer.identity and meta["prompt_style"] == "alpaca" and meta["truncated"] == 0
    assert meta["train_size"] == 24 and meta["test_size"] == 6 and meta["mask_inputs"] is True
    assert all(sample["input_ids"][0] == tokenizer.bos_id for sample in train + test)  # SentencePiece: BOS first
    assert_masked_over_prompt(test, test_records, tokenizer, PromptStyle.from_name("alpaca"))
    assert sorted(r["output"] for r in test_records) != sorted(r["output"] for r in ALPACA[:6])  # shuffled
    check_prepared_tokenizer(meta, tokenizer, out)
    # test.pt holds the held-out tokens only, not storage shared with the training samples
    assert test[0]["input_ids"].untyped_storage().nbytes() == 8 * sum(len(s["input_ids"]) for s in test)


def test_prepare_dolly_script_bpe_from_checkpoint_dir(tmp_path, bpe_dir, script):
    data_file = tmp_path / "dolly.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in DOLLY) + "\n")
    out = tmp_path / "out"
    script("scripts/prepare_dolly.py", "--data_file", data_file, "--destination_path", out, "--checkpoint_dir",
           bpe_dir, "--test_split_size", 4, "--prompt_style", "chatml", "--mask_inputs", "false", check=True)
    train, test, meta = load_prepared(out)
    records = json.loads((out / "test.json").read_text())
    tokenizer = Tokenizer(bpe_dir)
    assert len(train) == 16 and len(records) == 4 and meta["mask_inputs"] is False
    by_instruction = {r["instruction"]: r for r in DOLLY}
    for sample, record in zip(test, records):
        original = by_instruction[record["instruction"]]
        assert record == {"instruction": original["instruction"], "input": original["context"],
                          "output": original["response"], "task": "summarization"}
        assert torch.equal(sample["labels"], sample["input_ids"])  # unmasked
        assert tokenizer.decode(sample["input_ids"]) == PromptStyle.from_name("chatml").apply(
            record["instruction"], record["input"]) + record["output"] + "<|im_end|>"


def test_truncation_keeps_eos_and_skip_long_drops(tmp_path, bpe_dir):
    tokenizer = Tokenizer(bpe_dir)
    records = [dict(r, output=r["output"] * (20 if i % 2 else 1)) for i, r in enumerate(ALPACA)]
    lengths = [len(s["input_ids"]) for s in tokenize(records, tokenizer, prompt_styles["alpaca"], 10**6, True)[0]]
    limit = sorted(lengths)[len(lengths) // 2]  # half the records are longer
    long_count = sum(n > limit for n in lengths)
    meta = prepare_records(records, tmp_path / "cut", tokenizer, max_seq_length=limit)
    train, test, _ = load_prepared(tmp_path / "cut")
    assert meta["truncated"] == long_count > 0 and meta["skipped"] == 0 and len(train) + len(test) == len(records)
    assert all(len(s["input_ids"]) <= limit and s["input_ids"][-1] == tokenizer.eos_id for s in train + test)
    assert all(s["labels"][-1] == tokenizer.eos_id for s in train + test if len(s["input_ids"]) == limit)

    meta = prepare_records(records, tmp_path / "skip", tokenizer, max_seq_length=limit, skip_long=True)
    train, test, _ = load_prepared(tmp_path / "skip")
    test_records = json.loads((tmp_path / "skip" / "test.json").read_text())
    assert meta["skipped"] == long_count and meta["truncated"] == 0
    assert len(train) + len(test) == len(records) - long_count and len(test) == len(test_records)
    assert all(len(s["input_ids"]) <= limit for s in train + test)
    assert_masked_over_prompt(test, test_records, tokenizer, prompt_styles["alpaca"])


def test_split_is_deterministic_and_seeded(tmp_path, bpe_dir):
    tokenizer = Tokenizer(bpe_dir)
    held_out = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_records(ALPACA, tmp_path / name, tokenizer, seed=seed, test_split_size=8)
        held_out[name] = json.loads((tmp_path / name / "test.json").read_text())
    assert held_out["a"] == held_out["b"] != held_out["c"]
    train_a = load_prepared(tmp_path / "a")[0]
    train_b = load_prepared(tmp_path / "b")[0]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(train_a, train_b))


def test_check_tokenizer_rejects_another_tokenizer(tmp_path, bpe_dir, sp_dir):
    prepare_records(ALPACA, tmp_path, Tokenizer(bpe_dir))
    meta = load_prepared(tmp_path)[2]
    check_prepared_tokenizer(meta, Tokenizer(bpe_dir), tmp_path)
    with pytest.raises(UserError, match="prepared with a different tokenizer"):
        check_prepared_tokenizer(meta, Tokenizer(sp_dir), tmp_path)
    with pytest.raises(UserError, match="no meta.json"):
        load_prepared(tmp_path / "missing")
    (tmp_path / "test.pt").unlink()
    with pytest.raises(UserError, match="has meta.json but no test.pt"):
        load_prepared(tmp_path)


def test_a_failed_write_leaves_nothing_and_a_failed_rewrite_keeps_the_old_dataset(tmp_path, bpe_dir, monkeypatch):
    from lit_llama import files

    saved = []

    def disk_full_at_the_second_file(obj, path):
        saved.append(path)
        if len(saved) == 2:  # train.pt is written, then test.pt fails
            raise OSError(28, "No space left on device")
        torch.save(obj, path)

    monkeypatch.setattr(files.torch, "save", disk_full_at_the_second_file)
    with pytest.raises(UserError, match="No space left on device"):
        prepare_records(ALPACA, tmp_path / "new", Tokenizer(bpe_dir))
    assert list((tmp_path / "new").iterdir()) == []

    monkeypatch.undo()
    prepare_records(ALPACA, tmp_path / "old", Tokenizer(bpe_dir))
    before = {path.name: path.read_bytes() for path in (tmp_path / "old").iterdir()}
    saved.clear()
    monkeypatch.setattr(files.torch, "save", disk_full_at_the_second_file)
    with pytest.raises(UserError, match="No space left on device"):
        prepare_records(ALPACA[:20], tmp_path / "old", Tokenizer(bpe_dir))
    assert {path.name: path.read_bytes() for path in (tmp_path / "old").iterdir()} == before


def test_download_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(UserError, match=r"cannot download https://x/a.json \(Name or service not known\).*--data_file"):
        data.download("https://x/a.json", tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []


def test_load_records_formats(tmp_path):
    csv_file = tmp_path / "data.csv"
    csv_file.write_text('question,answer\n"Say hi, please",hi\nCount,"1,2"\n', encoding="utf-8")
    records = load_records(csv_file, instruction_field="question", output_field="answer")
    assert records == [{"instruction": "Say hi, please", "input": "", "output": "hi"},
                       {"instruction": "Count", "input": "", "output": "1,2"}]
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text(
        '{"instruction": "a", "output": "b", "task": "t"}\n\n{"instruction": "c", "output": "d", "input": null}\n'
    )
    assert load_records(jsonl_named_json) == [{"instruction": "a", "input": "", "output": "b", "task": "t"},
                                              {"instruction": "c", "input": "", "output": "d"}]


def test_builtin_tasks_deterministic_distinct_and_balanced():
    records = generate(400, seed=7)
    assert records == generate(400, seed=7) != generate(400, seed=8)
    assert len({(r["instruction"], r["input"]) for r in records}) == 400
    assert {r["task"] for r in records} == set(TASKS) and all(isinstance(r["output"], str) for r in records)
    per_task = [sum(r["task"] == task for r in records) for task in TASKS]
    assert max(per_task) - min(per_task) <= 1
    by_task = {r["task"]: r for r in records}
    assert by_task["reverse_words"]["output"].split() == by_task["reverse_words"]["input"].split()[::-1]
    assert by_task["sort_words"]["output"].split() == sorted(by_task["sort_words"]["input"].split())
    assert by_task["uppercase"]["output"] == by_task["uppercase"]["input"].upper()
    assert str(eval(by_task["arithmetic"]["input"])) == by_task["arithmetic"]["output"]
    assert json.loads(by_task["to_json"]["output"])["name"] in by_task["to_json"]["input"]


def test_prepare_builtin_script_splits_are_disjoint(tmp_path, bpe_dir, script):
    out = tmp_path / "builtin"
    script("scripts/prepare_builtin.py", "--destination_path", out, "--checkpoint_dir", bpe_dir,
           "--num_records", 200, "--test_split_size", 40, "--max_seq_length", 512, check=True)
    everything = json.loads((out / "builtin.json").read_text())
    held_out = json.loads((out / "test.json").read_text())
    train, test, meta = load_prepared(out)
    assert everything == generate(200, seed=42)
    assert len(train) == 160 and len(test) == 40 and meta["truncated"] == 0
    assert meta["prompt_style"] == "alpaca"  # the default of a checkpoint without a chat template
    held_keys = {(r["instruction"], r["input"]) for r in held_out}
    train_keys = {(r["instruction"], r["input"]) for r in everything} - held_keys
    assert len(held_keys) == 40 and len(train_keys) == 160  # no record in both splits
    assert all("task" in r for r in held_out)


BAD_INPUTS = {
    "not a data file": ("data.txt", b"instruction,output\nx,y\n", "unsupported file type '.txt'"),
    "invalid json": ("data.json", b'[{"instruction": "x",', "is not valid JSON"),
    "invalid utf-8": ("data.json", b'[{"instruction": "caf\xe9", "output": "y"}]', "is not UTF-8"),
    "missing field": ("data.json", b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
                      "record 2 has no 'output'"),
    "non-string field": ("data.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n',
                         "record 2: field 'output' must be a string, not int"),
    "null field": ("data.json", b'[{"instruction": null, "output": "b"}]',
                   "record 1: field 'instruction' must be a string, not null"),
    "not an object": ("data.json", b'[{"instruction": "a", "output": "b"}, ["a", "b"]]', "record 2 is a list"),
    "empty dataset": ("data.json", b"[]", "holds no records"),
    "empty csv": ("data.csv", b"instruction,output\n", "holds no records"),
    "test split too large": ("data.json", b'[{"instruction": "a", "output": "b"}]',
                             "--test_split_size 1 must be below"),
    "bad tokenizer path": ("data.json", b'[{"instruction": "a", "output": "b"}]', "tokenizer file not found"),
}


def bad_input_args(case, tmp_path, bpe_dir):
    name, content, _ = BAD_INPUTS[case]
    data_file = tmp_path / name
    data_file.write_bytes(content)
    tokenizer = tmp_path / "missing" / "tokenizer.json" if case == "bad tokenizer path" else bpe_dir / "tokenizer.json"
    culprit = tokenizer if case == "bad tokenizer path" else data_file
    args = ["--data_file", data_file, "--destination_path", tmp_path / "out", "--tokenizer_path", tokenizer,
            "--test_split_size", 1]
    return list(map(str, args)), str(culprit)


def assert_one_line_error(returncode, stderr, case, culprit, out):
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and BAD_INPUTS[case][2] in lines[0], stderr
    assert culprit in lines[0]
    assert not (out / "train.pt").exists() and not (out / "meta.json").exists()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(case, tmp_path, bpe_dir, capsys, monkeypatch):
    # in-process through the same CLI runner the script uses (a subprocess per case would cost seconds each)
    spec = importlib.util.spec_from_file_location("prepare_json", REPO / "scripts" / "prepare_json.py")
    prepare_json = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_json)
    args, culprit = bad_input_args(case, tmp_path, bpe_dir)
    monkeypatch.setattr(sys, "argv", ["prepare_json.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prepare_json.main)
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, case, culprit, tmp_path / "out")


@pytest.mark.parametrize("case", ["invalid utf-8", "bad tokenizer path"])
def test_bad_input_from_the_command_line(case, tmp_path, bpe_dir, script):
    args, culprit = bad_input_args(case, tmp_path, bpe_dir)
    result = script("scripts/prepare_json.py", *args)
    assert_one_line_error(result.returncode, result.stderr, case, culprit, tmp_path / "out")


text = st.text(max_size=40)
record = st.fixed_dictionaries({"instruction": text, "input": text, "output": text})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=2, max_size=6), max_seq_length=st.integers(2, 64), mask=st.booleans())
def test_prepare_never_crashes_on_valid_records(records, max_seq_length, mask, bpe_dir, sp_dir):
    for tokenizer_dir in (bpe_dir, sp_dir):
        tokenizer = Tokenizer(tokenizer_dir)
        with tempfile.TemporaryDirectory() as out:
            prepare_records(records, Path(out), tokenizer, test_split_size=1, max_seq_length=max_seq_length,
                            mask_inputs=mask)
            train, test, _ = load_prepared(out)
        assert len(train) == len(records) - 1 and len(test) == 1
        for sample in train + test:
            assert 0 < len(sample["input_ids"]) <= max_seq_length and sample["input_ids"][-1] == tokenizer.eos_id


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=1, max_size=4))
def test_response_round_trips_through_byte_level_bpe(records, bpe_dir):
    tokenizer = Tokenizer(bpe_dir)
    samples, _ = tokenize(records, tokenizer, prompt_styles["chatml"], 10**6, True)
    for sample, r in zip(samples, records):
        response = sample["input_ids"][sample["labels"] != IGNORE_INDEX][:-1]  # the labelled part, minus EOS
        assert tokenizer.decode(response) == r["output"]
