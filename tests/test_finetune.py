"""The four finetune scripts end to end on a tiny model, the shared batching and loss, and bad input."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from conftest import HANG_SECONDS, REPO, assert_close, run_script
from lit_llama.batching import collate, epoch_steps
from lit_llama.checkpoint import load
from lit_llama.data import IGNORE_INDEX, load_prepared
from lit_llama.errors import UserError
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import generate
from lit_llama.training.loop import loss_sum
from tiny_runs import as_args, finetune_main, make_inputs, settings, single_thread  # noqa: F401 (fixture)

FINAL = {
    "lora": "lit-llama-lora-finetuned.pth",
    "adapter": "lit-llama-adapter-finetuned.pth",
    "adapter_v2": "lit-llama-adapter-v2-finetuned.pth",
    "full": "lit-llama-full-finetuned.pth",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("tiny"))


def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def base_loss(checkpoint_path: Path, samples: list[dict]) -> float:
    """Mean next-token cross-entropy over the label tokens, from the full logits: the reference for loss_sum."""
    model, _ = load(checkpoint_path)
    input_ids, labels = collate(samples)
    with torch.no_grad():
        logits = model(input_ids)[:, :-1, : model.config.vocab_size]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)).item()


def check_run(method: str, out_dir: Path, checkpoint_path: Path, data_dir: Path, steps: int, save_interval: int):
    """Loss went down, checkpoints, metrics, the plot and finetune_config.json are there, and the result loads."""
    _, test, _ = load_prepared(data_dir)
    rows = read_metrics(out_dir)
    val_loss = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    # validation covers the first eval_iters=2 micro-batches of 2 test samples; the run starts at the base model
    assert len(val_loss) == 1 and val_loss[0] < base_loss(checkpoint_path, test[:4]) - 0.01
    assert [int(r["step"]) for r in rows if r["train_loss"]] == list(range(1, steps + 1))
    assert all(float(r["tokens_per_sec"]) > 0 for r in rows if r["train_loss"])
    for name in (FINAL[method], f"iter-{save_interval:06d}-ckpt.pth", f"iter-{steps:06d}-resume.pth", "loss.png"):
        assert (out_dir / name).is_file(), name
    assert not (out_dir / f"iter-{save_interval:06d}-resume.pth").exists()  # only the newest resume state is kept
    assert json.loads((out_dir / "finetune_config.json").read_text())["method"] == method

    weights = torch.load(out_dir / FINAL[method], weights_only=True)
    assert weights.keys() == torch.load(out_dir / f"iter-{steps:06d}-ckpt.pth", weights_only=True).keys()
    model, tokenizer, _ = load_finetuned(out_dir / FINAL[method], method=method)
    prompt = tokenizer.encode("<|im_start|>user\nRepeat the words twice.\nred fox<|im_end|>\n<|im_start|>assistant\n")
    assert len(list(generate(model, prompt, max_new_tokens=3, temperature=0))) >= 1
    return weights


def test_lora_script_from_the_command_line(inputs, tmp_path, single_thread):
    """All six targets, default precision (bf16 base with fp32 LoRA weights), through the CLI."""
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    options = settings(checkpoint_path, data_dir, out_dir, max_steps=6, eval_interval=6, save_interval=4)
    del options["precision"]
    targets = "--lora.targets=[query,key,value,projection,mlp,head]"
    run_script("finetune/lora.py", *as_args(options), "--train.learning_rate=0.02", "--train.warmup_steps=0", targets,
               check=True)
    weights = check_run("lora", out_dir, checkpoint_path, data_dir, steps=6, save_interval=4)
    assert {k.rsplit(".", 1)[-1] for k in weights} == {"lora_A", "lora_B"}
    layers = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert {k.split(".")[-2] for k in weights} == layers
    assert all(w.dtype == torch.float32 for w in weights.values())
    if (REPO / "generate" / "lora.py").is_file():  # the generate script reads what the finetune script wrote
        result = run_script(
            "generate/lora.py", "--finetuned_path", out_dir / FINAL["lora"], "--max_new_tokens=4", "--temperature=0",
            check=True,
        )
        assert "tokens/sec" in result.stderr


@pytest.mark.parametrize(
    "method, options",
    [
        ("adapter", dict(learning_rate=0.1, warmup_steps=0, adapter_start_layer=1)),
        ("adapter_v2", dict(learning_rate=0.05, warmup_steps=0, adapter_start_layer=1, group_by_length=True)),
        ("full", dict(learning_rate=0.003, warmup_steps=0)),
    ],
)
def test_adapter_and_full_scripts(method, options, inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    run = settings(checkpoint_path, data_dir, out_dir, max_steps=4, eval_interval=4, save_interval=2)
    finetune_main(method)(**run, **options)
    weights = check_run(method, out_dir, checkpoint_path, data_dir, steps=4, save_interval=2)
    if method == "full":
        assert weights.keys() == load(checkpoint_path)[0].state_dict().keys()


def test_lora_on_a_grouped_query_model_with_tied_embeddings(tmp_path, single_thread):
    checkpoint_path, data_dir = make_inputs(tmp_path / "gqa", name="tiny-gqa")
    targets = dict(lora_key=True, lora_projection=True, lora_mlp=True, learning_rate=0.02, warmup_steps=0)
    run = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=4, eval_interval=4, save_interval=2)
    finetune_main("lora")(**run, **targets)
    weights = check_run("lora", tmp_path / "out", checkpoint_path, data_dir, steps=4, save_interval=2)
    assert weights["transformer.h.0.attn.k_proj.lora_B"].shape == (32, 8)  # 2 KV groups of 16: narrower than q
    with pytest.raises(UserError, match="tied"):
        finetune_main("lora")(**settings(checkpoint_path, data_dir, tmp_path / "head"), lora_head=True)


def test_masked_loss_equals_the_full_logits_loss(inputs, single_thread):
    checkpoint_path, data_dir = inputs
    train, _, _ = load_prepared(data_dir)
    samples = train[:3]
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = fabric.setup_module(load(checkpoint_path)[0])
    input_ids, labels = collate(samples)
    counted = (labels[:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        ours = loss_sum(model, input_ids, labels) / counted
    assert_close(ours, base_loss(checkpoint_path, samples))


def test_epochs_visit_each_sample_at_most_once_in_a_seeded_order():
    lengths = [5 + (i * 7) % 40 for i in range(1000)]
    for group_by_length in (False, True):
        steps = epoch_steps(lengths, 4, 8, seed=3, epoch=0, group_by_length=group_by_length)
        seen = [i for step in steps for batch in step for i in batch]
        assert len(steps) == 1000 // 32 and len(seen) == len(set(seen)) == len(steps) * 32
        assert all(len(step) == 8 and all(len(b) == 4 for b in step) for step in steps)
        assert steps == epoch_steps(lengths, 4, 8, seed=3, epoch=0, group_by_length=group_by_length)
        assert steps != epoch_steps(lengths, 4, 8, seed=3, epoch=1, group_by_length=group_by_length)

    def padding(steps):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for s in steps for b in s)

    plain = epoch_steps(lengths, 4, 8, seed=3, epoch=0, group_by_length=False)
    assert padding(epoch_steps(lengths, 4, 8, seed=3, epoch=0, group_by_length=True)) < padding(plain) / 3


def test_collate_pads_each_micro_batch_to_its_longest_sample():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    input_ids, labels = collate(samples)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_bad_input_is_one_line_and_exit_2(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    result = run_script("finetune/lora.py", *as_args(settings(checkpoint_path, data_dir, out_dir, micro_batch_size=16)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --train.micro_batch_size 16 must be")

    lora = finetune_main("lora")
    with pytest.raises(UserError, match="nothing"):
        lora(**settings(checkpoint_path, tmp_path / "nothing", out_dir))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to --out_dir .*a_file"):
        lora(**settings(checkpoint_path, data_dir, blocker / "out"))
    with pytest.raises(UserError, match="batch_size 6 must be a multiple"):
        lora(**settings(checkpoint_path, data_dir, out_dir, batch_size=6, micro_batch_size=4))

    other = make_inputs(tmp_path / "other", name="tiny-gqa")[0]
    tokenizer_file = other.parent / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"<|im_end|>"', '"<|the_end|>"'))
    with pytest.raises(UserError, match="different tokenizer"):
        finetune_main("full")(**settings(other, data_dir, out_dir))
    assert not out_dir.exists()


def test_nan_loss_stops_naming_the_step_and_the_last_checkpoint_whose_loss_was_finite(inputs, tmp_path, monkeypatch,
                                                                                       single_thread):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=5, save_interval=1, eval_interval=100)
    # the weights after step 1 (saved, finite) are what give the NaN of step 2: no checkpoint is good
    with pytest.raises(UserError, match=r"at step 2: stopping \(no checkpoint before it gave a finite loss\)"):
        finetune_main("full")(**options, learning_rate=1e30, warmup_steps=0)
    # steps 1-3 leave the weights as they are, step 4 ruins them: the loss of step 5 is the first not finite
    monkeypatch.setattr("lit_llama.training.loop.lr_at", lambda step, *_: 0.0 if step < 3 else 1e30)
    options = settings(checkpoint_path, data_dir, tmp_path / "out2", max_steps=6, save_interval=1, eval_interval=100)
    with pytest.raises(UserError, match=r"at step 5: stopping \(the last good checkpoint is .*iter-000003-ckpt.pth\)"):
        finetune_main("full")(**options)
    assert (tmp_path / "out2" / "iter-000004-ckpt.pth").is_file()  # saved, finite, and not named


def test_sigterm_saves_a_resumable_checkpoint(inputs, tmp_path, single_thread):
    checkpoint_path, data_dir = inputs
    out_dir = tmp_path / "out"
    options = settings(checkpoint_path, data_dir, out_dir, epochs=50, eval_interval=1000, save_interval=1000)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "finetune/lora.py"), *as_args(options)], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    metrics = out_dir / "logs" / "metrics.csv"
    deadline = time.time() + HANG_SECONDS
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume auto" in stderr
    resume_files = list(out_dir.glob("iter-*-resume.pth"))
    assert len(resume_files) == 1
    state = torch.load(resume_files[0], weights_only=True)
    assert state["step"] >= 1 and (out_dir / state["weights"]).is_file()


def test_a_warmup_longer_than_the_run_is_warned_about_with_the_rate_it_reaches(inputs, tmp_path, capfd, single_thread):
    checkpoint_path, data_dir = inputs
    options = settings(checkpoint_path, data_dir, tmp_path / "out", max_steps=3, eval_interval=100)
    finetune_main("lora")(**options, warmup_steps=100, learning_rate=3e-4)
    err = capfd.readouterr().err
    assert "warning: --train.warmup_steps 100 is longer than the run's 3 steps" in err and "9.00e-06" in err


def test_evaluation_answers_the_first_held_out_prompt_and_can_skip_the_final_pass(inputs, tmp_path, capfd,
                                                                                   single_thread):
    checkpoint_path, data_dir = inputs
    first = json.loads((data_dir / "test.json").read_text())[0]
    finetune_main("lora")(**settings(checkpoint_path, data_dir, tmp_path / "a", max_steps=2, eval_interval=1000))
    err = capfd.readouterr().err
    assert err.count("validation loss") == 1 and f"{first['instruction']}\n{first['input']}\n> " in err
    assert "Recommend a movie" not in err
    finetune_main("lora")(**settings(checkpoint_path, data_dir, tmp_path / "b", max_steps=2, eval_interval=1000),
                          eval_final=False)
    assert "validation loss" not in capfd.readouterr().err
