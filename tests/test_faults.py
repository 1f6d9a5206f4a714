"""Writes that fail half-way (a file-size limit in a child process, or a writer that dies mid-file) and processes
killed at random moments while saving: the previous good state is intact and loadable every time, and no temporary
file survives the next run."""
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from lit_llama.checkpoint import load
from lit_llama.data import load_prepared
from lit_llama.errors import UserError
from lit_llama.files import TEMPORARY_SUFFIX, load_torch
from lit_llama.training.run_dir import check_out_dir
from tiny_runs import finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


def contents(directory: Path) -> dict:
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def temporaries(directory: Path) -> list:
    return list(directory.rglob(f"*{TEMPORARY_SUFFIX}"))


def run_with_file_size_limit(limit: int, script: str, *args) -> subprocess.CompletedProcess:
    """`script` in a child that may write no file larger than `limit` bytes: a write past it fails with EFBIG, as
    on a full disk (SIGXFSZ ignored so that the process sees the error instead of dying of it)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, preexec_fn=limit_file_size, timeout=300)


def assert_failed_in_one_line(result) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr


def test_a_re_prepare_that_runs_out_of_space_keeps_the_old_dataset(inputs, tmp_path):
    checkpoint_path, data_dir = inputs
    before = contents(data_dir)
    records = tmp_path / "records.json"
    records.write_text(str([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                            for i in range(400)]).replace("'", '"'))
    result = run_with_file_size_limit(32_000, "scripts/prepare_json.py", "--data_file", records, "--checkpoint_dir",
                                      checkpoint_path.parent, "--destination_path", data_dir, "--test_split_size", 10,
                                      "--overwrite", "true")
    assert_failed_in_one_line(result)
    assert "cannot write" in result.stderr
    assert contents(data_dir) == before and not temporaries(data_dir)
    train, test, meta = load_prepared(data_dir)
    assert len(train) == meta["train_size"] and len(test) == meta["test_size"]


def run_script_ok(script: str, *args) -> None:
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ["scripts/merge_lora.py", "scripts/convert_lit_checkpoint.py",
                                    "scripts/convert_hf_checkpoint.py"])
def test_a_merge_or_conversion_that_runs_out_of_space_keeps_the_earlier_output(inputs, tmp_path, script, single_thread):
    checkpoint_path, data_dir = inputs
    if "merge" in script:
        out_dir = tmp_path / "run"
        finetune_main("lora")(**settings(checkpoint_path, data_dir, out_dir, max_steps=1, eval_interval=100))
        args = ["--finetuned_path", out_dir / "lit-llama-lora-finetuned.pth"]
    elif "lit" in script:
        args = ["--checkpoint_path", checkpoint_path]
    else:
        run_script_ok("scripts/convert_lit_checkpoint.py", "--checkpoint_path", checkpoint_path, "--output_dir",
                      tmp_path / "hf")
        args = ["--checkpoint_dir", tmp_path / "hf"]
    args += ["--output_dir", tmp_path / "output"]
    run_script_ok(script, *args)
    before = contents(tmp_path / "output")
    result = run_with_file_size_limit(20_000, script, *args, "--overwrite", "true")
    assert_failed_in_one_line(result)
    assert "cannot write" in result.stderr
    assert contents(tmp_path / "output") == before and not temporaries(tmp_path / "output")
    if "lit" not in script:
        load(tmp_path / "output" / "lit-llama.pth")


def test_a_checkpoint_save_that_fails_half_way_keeps_the_last_good_one(inputs, tmp_path, monkeypatch, single_thread):
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    options = settings(checkpoint_path, data_dir, out_dir, max_steps=2, eval_interval=100, save_interval=1)
    finetune_main("lora")(**options)
    good = {name: load_torch(out_dir / name) for name in ("iter-000002-ckpt.pth", "iter-000002-resume.pth")}
    real_save = torch.save

    def dies_mid_file(obj, f, *args, **kwargs):
        if "iter-000003" in str(f):
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_mid_file)
    with pytest.raises(UserError, match="cannot write .*No space left on device"):
        finetune_main("lora")(**options | dict(max_steps=3), resume="auto")
    monkeypatch.undo()
    assert not temporaries(out_dir) and not list(out_dir.glob("iter-000003-*"))
    for name, state in good.items():
        assert_same(load_torch(out_dir / name), state)
    finetune_main("lora")(**options | dict(max_steps=3), resume="auto")  # and the run goes on from there
    assert (out_dir / "iter-000003-resume.pth").is_file()


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


SAVE_LOOP = """
import sys, torch
from lit_llama.files import save_torch
out = sys.argv[1]
for step in range(1, 10**6):
    # each checkpoint is consistent within itself: every value equals its step
    save_torch({"step": torch.tensor(step), "weights": torch.full((512, 1024), float(step))},
               f"{out}/iter-{step % 3:06d}-ckpt.pth")
    print(step, flush=True)
"""


def test_kill_9_at_random_moments_of_a_save_loop_never_loses_the_last_good_checkpoint(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rng = random.Random(0)
    leftovers = 0
    for attempt in range(6):
        child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(out_dir)], stdout=subprocess.PIPE, text=True,
                                 cwd=REPO)
        assert child.stdout.readline()  # one save done: a good state exists to protect
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.wait()
        checkpoints = sorted(out_dir.glob("iter-*-ckpt.pth"))
        assert checkpoints
        for path in checkpoints:  # every file under a real name is whole
            state = load_torch(path)
            assert torch.equal(state["weights"], torch.full((512, 1024), float(state["step"])))
        leftovers += len(temporaries(out_dir))
        # the next start of a run in that out_dir removes what the killed save left
        check_out_dir(out_dir, "auto", {}, "lit-llama-lora-finetuned.pth")
        assert not temporaries(out_dir)
    print(f"{leftovers} temporary file(s) left by 6 kills, all removed at the next start")
