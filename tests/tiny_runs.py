"""A tiny base checkpoint, a prepared dataset it can learn quickly, and the finetune scripts called in-process."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import REPO
from lit_llama.builtin_tasks import WORDS
from lit_llama.data import prepare
from lit_llama.tokenizer import Tokenizer
from tiny_finetunes import make_base


def make_inputs(directory: Path, name: str = "tiny", samples: int = 48) -> tuple[Path, Path]:
    """(checkpoint_path, data_dir): a random tiny model and an echo task (repeat the input twice)."""
    checkpoint_path = make_base(directory / "base", name)
    records = [
        {"instruction": "Repeat the words twice.", "input": f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}",
         "output": " ".join([WORDS[i % len(WORDS)], WORDS[(3 * i) % len(WORDS)]] * 2)}
        for i in range(samples + 8)
    ]
    data_dir = directory / "data"
    prepare(
        records, data_dir, Tokenizer(checkpoint_path.parent), source="test", test_split_size=8, max_seq_length=96,
        seed=0, mask_inputs=True, prompt_style="chatml", skip_long=False,
    )
    return checkpoint_path, data_dir


def settings(checkpoint_path: Path, data_dir: Path, out_dir: Path, **overrides) -> dict:
    """Small, fast settings for the finetune scripts (fp32 so that results are exactly comparable)."""
    return dict(
        checkpoint_path=checkpoint_path, data_dir=data_dir, out_dir=out_dir, batch_size=8, micro_batch_size=2,
        epochs=1, eval_interval=3, eval_iters=2, save_interval=3, log_interval=1, precision="32-true",
    ) | overrides


def as_args(options: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in options.items()]


def finetune_main(method: str):
    """The `main` of finetune/<method>.py, to call in-process (one Python start-up instead of one per run)."""
    spec = importlib.util.spec_from_file_location(f"finetune_{method}", REPO / "finetune" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def single_thread(monkeypatch):
    """One thread per process, here and in subprocesses: tiny models gain nothing from more, and on a busy machine
    oversubscribed threads make them crawl."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
