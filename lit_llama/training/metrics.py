"""A run's metrics (`logs/metrics.csv`, written by Fabric's CSVLogger, and optionally TensorBoard or Weights &
Biases beside it) and its loss curve (`loss.png`)."""
import csv
import json
import math
import sys
from pathlib import Path

from lightning.fabric import Fabric

from lit_llama.errors import UserError
from lit_llama.files import atomic_path


def metrics_path(out_dir: Path) -> Path:
    return out_dir / "logs" / "metrics.csv"


def read_metrics(out_dir: Path) -> list[dict]:
    path = metrics_path(out_dir)
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a metrics file this run can continue ({type(error).__name__}: {error})")
    if any("step" not in row or not math.isfinite(row["step"]) for row in rows):
        raise UserError(f"{path} has rows without a step number: not a metrics file this run can continue")
    return rows


def restore_metrics(fabric: Fabric, out_dir: Path, step: int) -> None:
    """A resumed run keeps the metrics up to its checkpoint (a fresh run starts a new file)."""
    kept = [row for row in read_metrics(out_dir) if row["step"] <= step]
    if fabric.global_rank == 0:
        metrics_path(out_dir).unlink(missing_ok=True)
    fabric.barrier()
    for row in kept:
        fabric.log_dict({k: v for k, v in row.items() if k != "step"}, int(row["step"]))


def plot_losses(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "o-")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss", title=out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


LOGGERS = ("csv", "tensorboard", "wandb")


def make_loggers(name: str, out_dir: Path) -> list:
    """The CSV logger (the loss curve and --resume read its file) and, for `name` tensorboard or wandb, that one."""
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    if name not in LOGGERS:
        raise UserError(f"unknown --logger {name!r}; choose one of {', '.join(LOGGERS)}")
    loggers = [CSVLogger(out_dir, name="logs", version="", flush_logs_every_n_steps=1)]
    if name == "tensorboard":
        require(name, "tensorboard")
        # beside logs/, not in it: the CSV logger warns about (and clears) a logs/ it did not write
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    elif name == "wandb":
        require(name, "wandb")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(name=out_dir.name, save_dir=out_dir, project="lit-llama"))
    return loggers


def require(logger: str, package: str) -> None:
    from importlib.util import find_spec

    if find_spec(package) is None:
        raise UserError(f"--logger {logger} needs the {package} package: pip install {package}")


def log_hyperparameters(fabric: Fabric, settings: dict) -> None:
    """The run's settings, once per run, to TensorBoard (its hparams tab, with Lightning's placeholder hp_metric) or
    the wandb run's config. The CSV logger takes none: finetune_config.json records them beside the weights."""
    from lightning.fabric.loggers import CSVLogger

    settings = json.loads(json.dumps(settings, default=str))  # paths as text
    for logger in fabric.loggers:
        if not isinstance(logger, CSVLogger):
            logger.log_hyperparams(settings)


def finalize_loggers(fabric: Fabric, status: str) -> None:
    """Flush and close every logger (TensorBoard's events reach the disk; a wandb run is marked finished)."""
    for logger in fabric.loggers:
        logger.finalize(status)
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if status == "success" else 1)
