"""Two CPU processes (gloo) through the FSDP2 path train like one process with the same global batch, also when
interrupted and resumed."""
import csv

import pytest
import torch

from conftest import assert_close, run_script
from tiny_runs import as_args, finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)


def losses(out_dir) -> dict:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(row["step"], "val" if row["val_loss"] else "train"): float(row["val_loss"] or row["train_loss"])
            for row in rows}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_match_one(method, tmp_path, single_thread):
    checkpoint_path, data_dir = make_inputs(tmp_path / "tiny")
    # fp32 and no dropout, so that the two runs differ only in how the sum over samples is split
    options = dict(max_steps=3, eval_interval=3, save_interval=2, learning_rate=0.01, warmup_steps=0)
    if method == "lora":
        options |= dict(lora_dropout=0.0, lora_mlp=True)
    # activation checkpointing inside the FSDP units changes what is kept, not what is computed
    two = settings(checkpoint_path, data_dir, tmp_path / "two", devices=2, activation_checkpointing=method == "full")
    if method == "lora":  # stop after step 2 and resume: sharded weights and optimizer state restored from the files
        run_script("finetune/lora.py", *as_args(two | options | dict(max_steps=2)), check=True)
        two |= dict(resume="auto")
    run_script(f"finetune/{method}.py", *as_args(two | options), check=True)
    finetune_main(method)(**settings(checkpoint_path, data_dir, tmp_path / "one", **options))

    final = f"lit-llama-{method}-finetuned.pth"
    for name in (final, "iter-000002-ckpt.pth", "iter-000003-resume.pth", "loss.png", "finetune_config.json"):
        assert (tmp_path / "two" / name).is_file()
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    two.pop(("2", "val"), None)  # the validation when the first lora run stopped
    assert one.keys() == two.keys() and len(one) == 4
    for key in one:
        assert_close(two[key], one[key], ulps=256)
    weights_one = torch.load(tmp_path / "one" / final, weights_only=True)
    weights_two = torch.load(tmp_path / "two" / final, weights_only=True)
    assert weights_one.keys() == weights_two.keys()  # whole tensors gathered from the shards
    for key in weights_one:
        assert_close(weights_two[key], weights_one[key], ulps=1024)
    earlier = torch.load(tmp_path / "one" / "iter-000002-ckpt.pth", weights_only=True)
    assert not torch.equal(weights_one[key], earlier[key])
