"""Choosing a precision (Fabric's names: `32-true`, `bf16-true`, `bf16-mixed`, `16-mixed`, ...)."""
from typing import Optional

import torch

from lit_llama.errors import UserError

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # every x86 CPU torch runs on can compute in bf16; AMX/AVX512-BF16 make it faster than fp32
    return True


def resolve_precision(precision: Optional[str], mixed: bool = False) -> str:
    """`None` means automatic: bf16 where the hardware has it (`-mixed` for full finetuning), else fp32."""
    if precision is None:
        if not bf16_supported():
            return "32-true"
        return "bf16-mixed" if mixed else "bf16-true"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in under `precision` (mixed precision keeps fp32 weights)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(precision, torch.float32)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
