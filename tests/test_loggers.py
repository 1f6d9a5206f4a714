"""`--logger tensorboard|wandb` on the finetune scripts: the metrics (and the settings, once) also go there, while
logs/metrics.csv and loss.png stay."""
import csv
from pathlib import Path

import pytest

from conftest import assert_close, run_script
from lit_llama.errors import UserError
from lit_llama.training.metrics import make_loggers
from tiny_runs import as_args, finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


def csv_train_losses(out_dir: Path) -> dict[int, float]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]}


def tiny_run(inputs, out_dir: Path, logger: str) -> None:
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, out_dir, max_steps=3, eval_interval=3, save_interval=3)
    finetune_main("lora")(**options, logger=logger, lora_r=4)
    assert (out_dir / "loss.png").is_file()


def test_tensorboard_gets_the_train_loss_of_metrics_csv_and_the_settings(inputs, tmp_path, single_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out_dir = tmp_path / "out"
    tiny_run(inputs, out_dir, "tensorboard")
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train_loss")}
    expected = csv_train_losses(out_dir)
    assert sorted(logged) == sorted(expected) == [1, 2, 3]
    assert_close([logged[step] for step in (1, 2, 3)], [expected[step] for step in (1, 2, 3)], ulps=1)  # float32
    assert {"val_loss", "learning_rate", "tokens_per_sec"} <= set(events.Tags()["scalars"])

    hparams = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = hparams.session_start_info.hparams
    assert values["lora/r"].number_value == 4 and values["train/max_steps"].number_value == 3
    assert values["method"].string_value == "lora" and values["data_dir"].string_value == str(inputs[1])


def test_wandb_offline_writes_its_run_directory(inputs, tmp_path, monkeypatch, single_thread):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written outside the test
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    out_dir = tmp_path / "out"
    tiny_run(inputs, out_dir, "wandb")
    records = list((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # what `wandb sync` uploads
    assert len(records) == 1
    content = records[0].read_bytes()  # protobuf records: the keys are plain text in them
    assert b"train_loss" in content and b"max_steps" in content and b"query" in content
    assert sorted(csv_train_losses(out_dir)) == [1, 2, 3]


def test_an_unknown_logger_is_one_line(inputs, tmp_path):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=1)
    result = run_script("finetune/adapter.py", *as_args(options), "--logger=mlflow")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown --logger 'mlflow'; choose one of csv, tensorboard, wandb"]
    assert not (tmp_path / "out").exists()


def test_a_logger_whose_package_is_missing_is_named(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"^--logger wandb needs the wandb package: pip install wandb$"):
        make_loggers("wandb", tmp_path)
