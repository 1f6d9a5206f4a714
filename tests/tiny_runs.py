"""A tiny base checkpoint, a prepared dataset it can learn quickly, and the finetune scripts called in-process.

Tests describe a run with flat settings (`batch_size=8, lora_mlp=True, eval_interval=3`); `as_args` spells them as
the scripts' flags (`--train.batch_size=8 --lora.targets=[query,value,mlp] --eval.interval=3`), and `finetune_main`
parses those flags in-process exactly as the command line does."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import REPO
from lit_llama.builtin_tasks import WORDS
from lit_llama.data import prepare
from lit_llama.lora import LORA_TARGETS
from lit_llama.training import TrainArgs
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


TRAIN_KEYS = {field.name for field in dataclasses.fields(TrainArgs)}


def as_args(options: dict) -> list[str]:
    """Flat test settings as the finetune scripts' flags. `lora_<target>=True/False` adds a target to (or drops it
    from) the default query and value."""
    args, targets = [], ["query", "value"]
    for key, value in options.items():
        name = key.split("_", 1)[-1]
        if key.startswith("lora_") and name in LORA_TARGETS:
            targets = [t for t in LORA_TARGETS if (t == name and str(value).lower() == "true") or (t in targets and t != name)]
            continue
        if key in TRAIN_KEYS:
            key = f"train.{key}"
        elif key.startswith(("eval_", "lora_", "adapter_")):
            key = key.replace("_", ".", 1)
        args.append(f"--{key}={value}")
    if any(key.startswith("lora_") for key in options):
        args.append(f"--lora.targets=[{','.join(targets)}]")
    return args


def finetune_main(method: str):
    """finetune/<method>.py run in-process on flat settings (one Python start-up instead of one per run)."""
    from jsonargparse import CLI

    spec = importlib.util.spec_from_file_location(f"finetune_{method}", REPO / "finetune" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings_class = next(iter(module.main.__annotations__.values()))
    return lambda **options: module.main(CLI(settings_class, args=as_args(options), as_positional=False))


@pytest.fixture
def single_thread(monkeypatch):
    """One thread per process, here and in subprocesses: tiny models gain nothing from more, and on a busy machine
    oversubscribed threads make them crawl."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
