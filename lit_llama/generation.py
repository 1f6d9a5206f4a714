"""Autoregressive sampling as gpt-fast does it: one prefill over the prompt, then one-token decode steps
that read and extend a KV cache allocated once for the whole generation."""
from typing import Iterator, Optional

import torch

from lit_llama.model import LLaMA


def sample(logits: torch.Tensor, temperature: float = 0.8, top_k: Optional[int] = 200, top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token from logits of shape (vocab,). Temperature 0 or top_k 1 is greedy."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass; the first always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


@torch.inference_mode()
def generate(
    model: LLaMA,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    stop_ids: Optional[set] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after the 1-D `prompt_ids`, stopping after EOS.

    The KV cache is sized to prompt + new tokens; a request longer than the model's context is refused.
    """
    stop_ids = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    prompt_length = prompt_ids.size(0)
    total = prompt_length + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"context of {model.config.block_size} tokens"
        )
    device = model.transformer.wte.weight.device
    model.setup_kv_cache(batch_size=1, max_seq_length=total, device=device)
    try:
        vocab = model.config.vocab_size
        logits = model(prompt_ids.to(device).unsqueeze(0), input_pos=0)[0, -1, :vocab]
        position = prompt_length
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p)
            token_id = int(token)
            yield token_id
            if token_id in stop_ids or position + 1 >= total:
                return
            logits = model(token.view(1, 1), input_pos=position)[0, -1, :vocab]
            position += 1
    finally:
        model.clear_kv_cache()
