"""An interrupted run, resumed, ends bit-identical to an uninterrupted one (CPU)."""
import csv

import pytest
import torch

from lit_llama.errors import UserError
from tiny_runs import finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize(
    "method, options",
    [
        # dropout draws random numbers every step and the base is bf16: RNG state and mixed dtypes both restored
        ("lora", dict(precision="bf16-true", lora_dropout=0.1, learning_rate=0.01, warmup_steps=5)),
        # bf16-mixed autocast with the whole model's optimizer state
        ("full", dict(precision="bf16-mixed", learning_rate=0.003, warmup_steps=5)),
    ],
)
def test_resumed_run_is_bit_identical(method, options, inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    main = finetune_main(method)
    final = f"lit-llama-{method}-finetuned.pth"
    # 12 steps per epoch (48 samples, batch 4): the interrupted run stops mid-epoch, the resumed one crosses an epoch
    common = dict(batch_size=4, epochs=2, eval_interval=5, save_interval=100) | options
    main(**settings(checkpoint_path, data_dir, tmp_path / "straight", max_steps=15, **common))
    main(**settings(checkpoint_path, data_dir, tmp_path / "resumed", max_steps=7, **common))
    assert (tmp_path / "resumed" / "iter-000007-resume.pth").is_file()
    main(**settings(checkpoint_path, data_dir, tmp_path / "resumed", max_steps=15, resume="auto", **common))

    straight = torch.load(tmp_path / "straight" / final, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / final, weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    at_step_7 = torch.load(tmp_path / "resumed" / "iter-000007-ckpt.pth", weights_only=True)
    assert not all(torch.equal(straight[k], at_step_7[k]) for k in straight)

    # the metrics continue where they stopped: each step logged once, with the uninterrupted run's training losses
    # (the interrupted run also measured validation loss when it stopped at step 7)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")


def train_losses(out_dir) -> list[tuple]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return [(row["step"], row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]]


def test_resume_refuses_a_different_batch_size_and_missing_files(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    main = finetune_main("lora")
    main(**settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=2, eval_interval=100))
    with pytest.raises(UserError, match="--train.batch_size 8"):
        main(**settings(checkpoint_path, data_dir, tmp_path / "out", batch_size=4, max_steps=3, resume="auto"))
    with pytest.raises(UserError, match="no resume checkpoint"):
        main(**settings(checkpoint_path, data_dir, tmp_path / "out", resume=str(tmp_path / "out" / "iter-9-ckpt.pth")))
    # an explicit checkpoint path works as well as "auto"
    explicit = str(tmp_path / "out" / "iter-000002-ckpt.pth")
    main(**settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=3, resume=explicit))
    assert (tmp_path / "out" / "iter-000003-resume.pth").is_file()
