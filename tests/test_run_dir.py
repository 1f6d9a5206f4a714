"""An --out_dir holds one run: never trained over by a fresh run, never shared by two runs at once, resumed only with
its own settings, and cleaned of what a killed save left."""
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script
from lit_llama.errors import UserError
from lit_llama.training.resume import check_finite
from tiny_runs import as_args, finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


def one_line_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def run_files(out_dir) -> dict:
    """Every file of a run and its bytes (the lock file holds whichever process had it last)."""
    return {path: path.read_bytes() for path in out_dir.rglob("*") if path.is_file() and path.name != ".lock"}


def test_a_fresh_run_over_an_earlier_one_is_refused_and_changes_nothing(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=2, eval_interval=100)
    finetune_main("lora")(**options)
    before = run_files(tmp_path / "out")
    error = one_line_error(run_script("finetune/lora.py", *as_args(options)))
    assert "holds a run (checkpoints up to iter-000002-ckpt.pth)" in error and "--resume auto" in error
    after = run_files(tmp_path / "out")
    assert after == before


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_runs(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    # a run far longer than the test: it is killed below
    options = settings(checkpoint_path, data_dir, out_dir, epochs=100_000, eval_interval=10**9, save_interval=10**9)
    first = subprocess.Popen([sys.executable, str(REPO / "finetune/lora.py"), *as_args(options)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out_dir / "finetune_config.json").is_file() and time.time() < deadline:
            time.sleep(0.1)
        error = one_line_error(run_script("finetune/lora.py", *as_args(options | dict(resume="auto"))))
        assert f"another run (pid {first.pid}) is using --out_dir" in error
    finally:
        first.kill()
        first.wait()
    # the lock went with the killed process: the run can be continued
    resumed = run_script("finetune/lora.py", *as_args(options | dict(resume="auto", epochs=1, max_steps=1)))
    assert resumed.returncode == 0, resumed.stderr


def test_resume_with_other_settings_is_refused_naming_them(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=2, eval_interval=100)
    finetune_main("lora")(**options)
    with pytest.raises(UserError, match=r"cannot resume: .*lora \{r: 8.*-> \{r: 4"):
        finetune_main("lora")(**options, lora_r=4, resume="auto")
    with pytest.raises(UserError, match=r"precision 32-true -> bf16-true"):
        finetune_main("lora")(**options | dict(precision="bf16-true"), resume="auto")
    # what may change: how long it runs
    finetune_main("lora")(**options | dict(max_steps=3), resume="auto")
    assert (tmp_path / "out" / "iter-000003-resume.pth").is_file()


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(inputs, tmp_path, capsys, single_thread):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=2, eval_interval=100)
    finetune_main("lora")(**options)
    leftover = tmp_path / "out" / ".iter-000003-ckpt.pth.a1b2c3.tmp"
    leftover.write_bytes(b"half a checkpoint")
    finetune_main("lora")(**options | dict(max_steps=3), resume="auto")
    assert not leftover.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().err


def test_a_checkpoint_with_nan_weights_is_never_saved_as_good(tmp_path):
    good = tmp_path / "iter-000001-ckpt.pth"
    check_finite({"a": torch.ones(3)}, 1, None)
    with pytest.raises(UserError, match=r"NaN or inf after step 2 \(b\): not saved \(the last good checkpoint is .*"
                                        r"iter-000001-ckpt.pth\)"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, 2, good)
