"""The training mechanics the four finetune scripts share, written once, by concern:

    args.py     TrainArgs and EvalArgs: the `--train.*` and `--eval.*` settings
    setup.py    one process per device (FSDP2 across several), the prepared data, the model with the method applied
    run_dir.py  the --out_dir: one run at a time, no fresh run over an old one, resume only with the same settings
    loop.py     `fit`: epochs, gradient accumulation, the loss, validation, stop on a signal
    resume.py   checkpoints a run resumes from bit-exactly
    metrics.py  logs/metrics.csv and the loss curve
    run.py      `finetune`: all of the above, in order, for one method

A finetune script is a dataclass of settings (a FinetuneArgs with its method's options) and `finetune(LORA, ...)`.
"""
from lit_llama.training.args import AdapterFinetuneArgs, EvalArgs, FinetuneArgs, TrainArgs, adapter_recipe
from lit_llama.training.run import finetune

__all__ = ["AdapterFinetuneArgs", "EvalArgs", "FinetuneArgs", "TrainArgs", "adapter_recipe", "finetune"]
