"""Keeping a run's --out_dir safe: one run at a time (a lock held while the run lives), no fresh run over an
earlier one, no resume with settings other than the run's own, and no temporary file left by a killed save."""
import fcntl
import os
import sys
from pathlib import Path
from typing import IO, Optional

from lit_llama.errors import UserError
from lit_llama.files import TEMPORARY_SUFFIX, read_json_object
from lit_llama.finetuned import FINETUNE_CONFIG_NAME
from lit_llama.training.resume import find_resume

LOCK_NAME = ".lock"
# what may change when a run is resumed (how long it runs, how often it logs or saves) is not in the record
COMPARED = (
    "method", "lora", "adapter", "model_config", "prompt_style", "tokenizer", "data_dir", "precision", "quantize"
)
def claim(out_dir: Path, resume: Optional[str], record: dict, final_name: str) -> IO:
    """Lock `out_dir` for this run and check that the run may use it; raises UserError naming the problem. Returns
    the open lock file: the lock holds until it is closed, or the process ends (a killed run leaves no stale lock)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_NAME, "a+")
    except OSError as error:
        raise UserError(f"cannot write to --out_dir {out_dir}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        message = f"another run (pid {owner}) is using --out_dir {out_dir}: wait for it or choose another"
        raise UserError(message) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        check_out_dir(out_dir, resume, record, final_name)
    except BaseException:
        lock.close()
        if created:  # a refused run leaves no trace
            (out_dir / LOCK_NAME).unlink()
            if not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    return lock


def check_out_dir(out_dir: Path, resume: Optional[str], record: dict, final_name: str) -> None:
    earlier = earlier_run(out_dir, final_name)
    if earlier and resume is None:
        raise UserError(
            f"--out_dir {out_dir} holds a run ({earlier}): pass --resume auto to continue it, or choose another "
            "--out_dir (nothing was changed)"
        )
    if resume not in (None, "auto"):
        find_resume(resume, out_dir)  # a path that names no checkpoint: refused now, not after the model loads
    config_path = out_dir / FINETUNE_CONFIG_NAME
    if resume is not None and config_path.is_file():
        check_same_settings(read_record(config_path), record, config_path)
    leftovers = list(out_dir.glob(f".*{TEMPORARY_SUFFIX}"))
    for path in leftovers:
        path.unlink()
    if leftovers:
        print(f"removed {len(leftovers)} temporary file(s) an interrupted save left in {out_dir}", file=sys.stderr)


def earlier_run(out_dir: Path, final_name: str) -> Optional[str]:
    """What says that a run already used `out_dir`, or None."""
    checkpoints = sorted(out_dir.glob("iter-*-ckpt.pth"))
    if checkpoints:
        return f"checkpoints up to {checkpoints[-1].name}"
    for name in (final_name, FINETUNE_CONFIG_NAME, "logs/metrics.csv"):
        if (out_dir / name).is_file():
            return name
    return None


def read_record(path: Path) -> dict:
    try:
        return read_json_object(path)
    except UserError as error:
        raise UserError(f"cannot resume: {error}") from None


def check_same_settings(before: dict, now: dict, source: Path) -> None:
    differences = [
        f"{key} {describe(before.get(key))} -> {describe(now.get(key))}"
        for key in COMPARED if before.get(key) != now.get(key)
    ]
    if differences:
        raise UserError(
            f"cannot resume: {source} records other settings ({'; '.join(differences)}): resume with the run's own "
            "settings, or start a new run in another --out_dir"
        )


def describe(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items() if k != "sha256") + "}"
    return str(value)
