"""`finetune`: what each finetune script runs, from its settings to the saved weights."""
import sys
from dataclasses import asdict

from lit_llama.errors import UserError
from lit_llama.method import Method
from lit_llama.precision import describe, resolve_precision
from lit_llama.quantize import check_training_mode
from lit_llama.training.args import FinetuneArgs
from lit_llama.training.loop import Run, fit
from lit_llama.training.metrics import log_hyperparameters
from lit_llama.training.run_dir import claim
from lit_llama.training.setup import load_data, load_model, setup_fabric


def finetune(method: Method, options, settings: FinetuneArgs) -> None:
    """Check the settings, launch one process per device, load the data and the model with `method` applied
    (`options`: its settings dataclass, None for full finetuning), claim the out_dir and train."""
    train, out_dir = settings.train, settings.out_dir
    if settings.devices < 1 or settings.num_nodes < 1:
        raise UserError(f"--devices ({settings.devices}) and --num_nodes ({settings.num_nodes}) must be at least 1")
    train.check(settings.devices * settings.num_nodes)
    check_training_mode(settings.quantize, method.name)
    settings.eval.check()
    precision = resolve_precision(settings.precision, mixed=method.trains_base_weights)
    data = load_data(settings.data_dir, settings.checkpoint_path)
    fabric = setup_fabric(settings.devices, settings.num_nodes, precision, out_dir, settings.logger)
    model, record = load_model(
        fabric, settings.checkpoint_path, method, options, precision, data, train, settings.quantize
    )
    record |= {"data_dir": str(settings.data_dir), "precision": precision}
    lock, problem = None, None
    if fabric.global_rank == 0:  # one process owns the directory; every process learns whether it may go on
        try:
            lock = claim(out_dir, settings.resume, record, method.weights_name)
        except UserError as error:
            problem = str(error)
    problem = fabric.broadcast(problem)
    if problem:
        raise UserError(problem)
    if fabric.global_rank == 0:
        print(describe(precision, fabric.device, training=True), file=sys.stderr, flush=True)
    # after the claim: a refused run must not write into the run it would have overwritten
    log_hyperparameters(fabric, asdict(settings) | {"method": method.name, "precision": precision})
    try:
        fit(fabric, model, data, Run(out_dir, method, record, settings.resume), train, settings.eval)
    finally:
        if lock is not None:
            lock.close()
