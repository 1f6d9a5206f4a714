"""Checkpoints that a run resumes from bit-exactly: `iter-<step>-ckpt.pth` holds the trained weights (what
generate/*.py loads), `iter-<step>-resume.pth` the optimizer, step, data position, RNG states and settings."""
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric import Fabric
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lit_llama.errors import UserError
from lit_llama.files import load_torch, save_torch
from lit_llama.training.args import TrainArgs

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# settings that decide the data order the saved position refers to: a resumed run must keep them
ORDER_SETTINGS = ("batch_size", "seed", "group_by_length")


def trainable_state_dict(model) -> dict:
    """The trained weights as whole CPU tensors (gathered from the FSDP shards onto rank 0; other ranks get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model.module, options=options)


def check_finite(weights: dict, step: int, last_saved: Optional[Path]) -> None:
    """A checkpoint is only named good if every trained weight is a finite number."""
    bad = next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
        raise UserError(f"the weights hold NaN or inf after step {step} ({bad}): not saved ({where})")


def last_good_checkpoint(out_dir: Path, step: int) -> str:
    """Where to go back to when the loss of step `step + 1` is not finite. That loss was computed with the weights
    after step `step`, so their checkpoint is not good, however finite its numbers: only an earlier one is."""
    earlier = [path for path in out_dir.glob("iter-*-ckpt.pth") if checkpoint_step(path) < step]
    if not earlier:
        return "no checkpoint before it gave a finite loss"
    return f"the last good checkpoint is {max(earlier, key=checkpoint_step)}"


def checkpoint_step(path: Path) -> int:
    digits = path.name.removeprefix("iter-").split("-", 1)[0]
    return int(digits) if digits.isdigit() else -1


def rng_states(fabric: Fabric) -> dict:
    """Every rank's RNG state (dropout), as uint8 tensors of shape (world_size, n)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if fabric.world_size == 1:
        return {k: v[None] for k, v in states.items()}
    return {k: fabric.all_gather(v.to(fabric.device)).cpu() for k, v in states.items()}


def save_checkpoint(
    fabric: Fabric, model, optimizer, train: TrainArgs, progress: dict, out_dir: Path, last_saved: Optional[Path]
) -> Path:
    """`iter-<step>-ckpt.pth`, then `iter-<step>-resume.pth`. Only the newest resume file is kept: for full
    finetuning it is twice the model."""
    weights = trainable_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model.module, optimizer.optimizer, options=FULL_STATE)
    rng = rng_states(fabric)
    name = f"iter-{progress['step']:06d}"
    if fabric.global_rank == 0:
        check_finite(weights, progress["step"], last_saved)
        save_torch(weights, out_dir / f"{name}-ckpt.pth")
        state = {
            **progress, "weights": f"{name}-ckpt.pth", "optimizer": optimizer_state, "rng": rng,
            "world_size": fabric.world_size, "hyperparameters": asdict(train),
        }
        save_torch(state, out_dir / f"{name}-resume.pth")
        for older in out_dir.glob("iter-*-resume.pth"):
            if older.name != f"{name}-resume.pth":
                older.unlink()
    fabric.barrier()
    return out_dir / f"{name}-ckpt.pth"


def find_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """`auto`: the newest resume file in out_dir, if any. A path may name the resume file or its -ckpt.pth."""
    if resume is None:
        return None
    if resume == "auto":
        found = sorted(out_dir.glob("iter-*-resume.pth"))
        if not found:
            print(f"--resume auto: no checkpoint in {out_dir} yet, starting from the beginning", file=sys.stderr)
        return found[-1] if found else None
    path = Path(resume)
    if path.name.endswith("-ckpt.pth"):
        path = path.with_name(path.name.replace("-ckpt.pth", "-resume.pth"))
    if not path.is_file():
        raise UserError(f"--resume {resume}: no resume checkpoint {path} (use --resume auto for the newest)")
    return path


def load_resume(fabric: Fabric, model, optimizer, path: Path, train: TrainArgs) -> dict:
    state = load_torch(path)
    if not isinstance(state, dict) or not {"step", "epoch", "epoch_step", "weights", "optimizer"} <= set(state):
        raise UserError(f"{path} is not a resume checkpoint of this project")
    before = state.get("hyperparameters", {})
    for key in ORDER_SETTINGS:
        if key in before and before[key] != getattr(train, key):
            raise UserError(f"{path} was trained with --train.{key} {before[key]}: resume with the same value")
    weights = load_torch(path.parent / state["weights"])
    trainable = {name for name, p in model.module.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise UserError(f"{path.parent / state['weights']} holds other weights than this run trains (another method?)")
    set_model_state_dict(model.module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(
        model.module, optimizer.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    row = fabric.global_rank if state["world_size"] == fabric.world_size else 0
    torch.set_rng_state(state["rng"]["cpu"][row].clone())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"][row].clone())
    return {key: state[key] for key in ("step", "epoch", "epoch_step")}
