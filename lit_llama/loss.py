"""Training's loss: the output head and the next-token cross-entropy in one pass, a chunk of positions at a time.

The plain way, `F.cross_entropy(head(x).float(), targets)`, keeps every position's logits for backward: for N
positions and a vocabulary of V, N x V in bf16, again in fp32, and the fp32 softmax, about 10 bytes per logit
(4 x 512 positions of Llama 3's 128,256 tokens: 2.6 GB, more than an 8B model's activations with checkpointing).
`cross_entropy_sum` computes each chunk's logits, its loss and at once its gradient with respect to the hidden
states (softmax minus one-hot, times the head) and keeps only that gradient, N x C: one chunk's logits exist at a
time, and backward has no head product left to do. Without gradients it is the plain loss, chunked.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# logits per chunk: enough positions that the head's product runs at full speed, few enough that a chunk stays small
# beside the activations. A CPU reaches it at ~40 positions of a 49,152-token vocabulary (2**21 logits, 8 MiB in
# fp32: as fast as 2**23, 2x faster than 2**19); a GPU reads the whole head once per chunk and needs more positions.
CHUNK_LOGITS = 2**23
CPU_CHUNK_LOGITS = 2**21


def cross_entropy_sum(
    x: torch.Tensor, targets: torch.Tensor, vocab_size: int, weight: Optional[torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Summed cross-entropy of the logits `head(x)` (x: (N, C) hidden states) against `targets` (N,) over the first
    `vocab_size` columns (the padding columns of the vocabulary are not tokens). `weight` is the head's (V, C)
    matrix where the head is exactly `F.linear(x, weight)`; None for a head with more to it (LoRA, adapter v2),
    whose logits are then computed whole by `head`."""
    if weight is None:
        return F.cross_entropy(head(x)[:, :vocab_size].float(), targets, reduction="sum")
    # autograd marks inputs that require grad as needing it under no_grad too: whether a backward can come is ours
    return FusedCrossEntropy.apply(x, weight[:vocab_size], targets, torch.is_grad_enabled())


def chunks(rows: int, vocab_size: int, device: torch.device):
    step = max(1, (CPU_CHUNK_LOGITS if device.type == "cpu" else CHUNK_LOGITS) // vocab_size)
    return (slice(start, start + step) for start in range(0, rows, step))


class FusedCrossEntropy(torch.autograd.Function):
    """loss = sum_i logsumexp(x_i W^T) - (x_i W^T)[t_i]; the gradients are made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_enabled: bool):
        needs_x, needs_weight = (grad_enabled and needs for needs in ctx.needs_input_grad[:2])
        ctx.weight_dtype = weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if needs_x else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        for rows in chunks(x.size(0), weight.size(0), x.device):
            x_rows, t_rows = x[rows], targets[rows]
            logits = F.linear(x_rows, weight)  # in the dtype the plain head computes in (under autocast too)
            logits_dtype, logits = logits.dtype, logits.float()
            logsumexp = logits.logsumexp(dim=-1)
            loss += (logsumexp - logits.gather(1, t_rows[:, None]).squeeze(1)).sum()
            if grad_x is None and grad_weight is None:
                continue
            grad_logits = logits.sub_(logsumexp[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(t_rows.numel(), device=x.device), t_rows] -= 1
            grad_logits = grad_logits.to(logits_dtype)  # as the plain head's gradient reaches its product
            if grad_x is not None:
                grad_x[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ x_rows).float()
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_weight = ctx.saved_tensors
        # scaled in fp32: the loss's scale (1 / tokens) rounded to bf16 would scale every gradient by up to 0.4% off
        scaled_x = None if grad_x is None else (grad_x.float() * grad_loss).to(grad_x.dtype)
        scaled_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return scaled_x, scaled_weight, None, None
