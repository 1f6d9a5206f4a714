"""Autoregressive sampling as gpt-fast does it: one prefill over the prompt, then one-token decode steps
that read and extend a KV cache allocated once for the whole generation.

Also the mechanics every generate/*.py script shares: choosing device, precision and seed (`setup_runtime`),
streaming a sample's text to stdout as its tokens are made (`stream_text`), the timing and memory line on stderr
(`print_stats`), and the loop over samples that ties them together (`generate_samples`).
"""
import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, TextIO

import torch

from lit_llama.errors import UserError
from lit_llama.fast_decode import DecodeStep
from lit_llama.model import LLaMA
from lit_llama.precision import autocast_dtype, describe, products_for, resolve_precision, weights_dtype


def sample(logits: torch.Tensor, temperature: float = 0.8, top_k: Optional[int] = 200, top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token from logits of shape (..., vocab) -> (..., 1). Temperature 0 or top_k 1 is greedy."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass; the first always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


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
    for tokens in generate_batch(model, prompt_ids.unsqueeze(0), max_new_tokens, temperature, top_k, top_p, stop_ids):
        yield int(tokens[0])


@torch.inference_mode()
def generate_batch(
    model: LLaMA,
    prompts: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    stop_ids: Optional[set] = None,
) -> Iterator[torch.Tensor]:
    """Continue B prompts of equal length (B, T) together, yielding one (B,) tensor of new tokens per step,
    until every row has produced a stop token or `max_new_tokens` are made. A row's tokens after its own stop
    token are filler to be ignored. On a CPU a decode step costs about the same for 16 rows as for one.
    """
    SamplingArgs(max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, temperature=temperature)  # checks them
    batch_size, prompt_length = prompts.shape
    if prompt_length < 1:
        raise UserError("the prompt is empty: give at least one token (this tokenizer adds no BOS)")
    total = prompt_length + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"context of {model.config.block_size} tokens"
        )
    device = model.transformer.wte.weight.device
    stop = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    model.setup_kv_cache(batch_size=batch_size, max_seq_length=total, device=device)
    # on a CPU, one sequence of a frozen plain model decodes faster through fast_decode's step (None elsewhere)
    step = DecodeStep.for_model(model)
    try:
        vocab = model.config.vocab_size
        # the prefill needs logits for the last position only: skip the output projection for the rest
        last = torch.zeros(prompts.shape, dtype=torch.bool, device=device)
        last[:, -1] = True
        with products_for(prompts.numel(), model.transformer.wte.weight):  # fp32 where bf16 is not native
            logits = model(prompts.to(device), input_pos=0, logits_at=last)[:, :vocab]
        for position in range(prompt_length, total):
            tokens = sample(logits, temperature, top_k, top_p)
            yield tokens[:, 0]
            finished |= torch.isin(tokens[:, 0], stop)
            if bool(finished.all()) or position + 1 >= total:
                return
            if step:
                logits = step(tokens, position)
            else:
                with products_for(batch_size, model.transformer.wte.weight):
                    logits = model(tokens, input_pos=position)
            logits = logits[:, -1, :vocab]
    finally:
        model.clear_kv_cache()


@dataclass
class Runtime:
    """Where and in what precision generation runs."""

    device: torch.device
    precision: str  # Fabric's names: "bf16-true", "32-true", "bf16-mixed", ...
    started: float = field(default_factory=time.perf_counter)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype to load weights in (fp32 for mixed precision, which autocasts the matmuls)."""
        return weights_dtype(self.precision)

    def announce(self) -> None:
        """The precision, the hardware facts that chose it and the threads, as one line on stderr."""
        print(describe(self.precision, self.device), file=sys.stderr, flush=True)

    def autocast(self):
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def setup_runtime(precision: Optional[str] = None, seed: int = 1234, batched: bool = False) -> Runtime:
    """CUDA if present, else CPU; `precision=None` picks bf16-true on CPUs and bf16 GPUs, else 32-true; `batched`
    (evaluation: every step multiplies many rows) picks as training does, bf16 only where it is native
    (lit_llama/precision.py). Seeds torch. `Runtime.announce` says which precision, and why, once the model is
    loaded (an error before it stays the only line)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    return Runtime(device, resolve_precision(precision, decoding=not batched))


DEFAULT_CONTEXT_LENGTH = 2048  # a KV cache of the model's whole block_size (128k for Llama 3.1) would not fit in RAM


def resolve_context_length(context_length: Optional[int], block_size: int) -> int:
    """The KV cache length of a chat or a server: what was asked for, within [2, the model's block_size]."""
    context_length = min(block_size, DEFAULT_CONTEXT_LENGTH) if context_length is None else context_length
    if not 2 <= context_length <= block_size:
        raise UserError(f"--context_length must be in [2, {block_size}] (the model's block_size), got {context_length}")
    return context_length


def check_length(prompt_length: int, max_new_tokens: int, block_size: int) -> int:
    """Refuse a prompt that fills the context; shorten `max_new_tokens` to what still fits (told on stderr)."""
    if prompt_length >= block_size:
        raise UserError(
            f"the prompt has {prompt_length} tokens but the model's context is {block_size}: shorten the prompt"
        )
    if prompt_length + max_new_tokens > block_size:
        fitting = block_size - prompt_length
        print(f"--max_new_tokens {max_new_tokens} does not fit the context; generating {fitting}", file=sys.stderr)
        return fitting
    return max_new_tokens


def stream_text(
    tokens: Iterable[int], tokenizer, context_ids: Iterable[int] = (), out: TextIO = sys.stdout
) -> list[int]:
    """Print the text of `tokens` to `out` as they arrive; return all the token ids (a final stop token included,
    though it is not printed).

    Decoding token by token would lose SentencePiece's word-boundary spaces and split multi-byte characters,
    so the growing sequence (after `context_ids`, usually the prompt) is decoded and only the new suffix printed;
    an incomplete UTF-8 character (decoded as U+FFFD) waits for the token that completes it.
    """
    context_ids = list(context_ids)
    stop_ids = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    tokens_seen: list[int] = []
    text_ids: list[int] = []
    printed = tokenizer.decode(context_ids)
    for token in tokens:
        tokens_seen.append(token)
        if token in stop_ids:
            continue
        text_ids.append(token)
        text = tokenizer.decode(context_ids + text_ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(printed) :])
            out.flush()
            printed = text
    text = tokenizer.decode(context_ids + text_ids)
    out.write(text[len(printed) :])
    out.flush()
    return tokens_seen


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kilobytes


def print_stats(num_tokens: int, seconds: float, device: torch.device, out: TextIO = sys.stderr) -> None:
    """`Time for inference: X sec total, Y tokens/sec` and the peak memory, on stderr."""
    print(f"Time for inference: {seconds:.2f} sec total, {num_tokens / seconds:.2f} tokens/sec", file=out)
    memory = "GPU memory allocated" if device.type == "cuda" else "process resident memory"
    print(f"Peak {memory}: {peak_memory_gb(device):.2f} GB", file=out)


def generate_samples(
    model: LLaMA,
    tokenizer,
    prompt_ids: torch.Tensor,
    runtime: Runtime,
    num_samples: int = 1,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    prefix: str = "",
    out: TextIO = sys.stdout,
) -> list[list[int]]:
    """Generate `num_samples` continuations of `prompt_ids` and return their token ids. Each sample is written to
    `out` as `prefix` (e.g. the prompt text) + the streamed text + a newline; timing and memory go to stderr."""
    max_new_tokens = check_length(prompt_ids.size(0), max_new_tokens, model.config.block_size)
    samples = []
    for _ in range(num_samples):
        out.write(prefix)
        start = time.perf_counter()
        with runtime.autocast():
            tokens = generate(
                model, prompt_ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id, tokenizer.stop_ids
            )
            samples.append(stream_text(tokens, tokenizer, prompt_ids.tolist(), out))
        print(file=out, flush=True)
        print_stats(len(samples[-1]), time.perf_counter() - start, runtime.device)
    return samples


@dataclass
class SamplingArgs:
    """How the generate scripts sample (their shared flags).

    Args:
        num_samples: How many continuations to generate.
        max_new_tokens: The most tokens to generate per sample (fewer if a stop token comes first).
        top_k: Sample only among the k most likely tokens (1 is greedy; null: no limit).
        top_p: Sample only among the most likely tokens holding this much probability (1.0: no limit).
        temperature: Sharpen (<1) or flatten (>1) the distribution; 0 is greedy.
        seed: Random seed, so a run can be repeated.
        precision: bf16-true, 32-true, bf16-mixed (fp32 weights, bf16 autocast) or 16-true (default: bf16-true,
            whose products of many rows run in fp32 on a CPU without native bf16; 32-true on a GPU without bf16).
        compile: torch.compile the model (slow first call, faster after).
    """

    num_samples: int = 1
    max_new_tokens: int = 50
    top_k: Optional[int] = 200
    top_p: float = 1.0
    temperature: float = 0.8
    seed: int = 1234
    precision: Optional[str] = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top_k must be at least 1 (or null for no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UserError(f"--temperature must be a finite number of 0 or more, got {self.temperature}")


def generate_text(
    model: LLaMA, tokenizer, prompt_ids: torch.Tensor, runtime: Runtime, settings: SamplingArgs, prefix: str = ""
):
    """What a generate script does once its model is loaded: compile it if asked and generate `settings.num_samples`
    continuations of `prompt_ids` (each printed after `prefix`); returns their token ids."""
    runtime.announce()
    print(f"Loaded in {time.perf_counter() - runtime.started:.2f} sec",
          file=sys.stderr)
    if settings.compile:
        model = torch.compile(model, dynamic=True)
    if prompt_ids.numel() == 0:
        raise UserError("the prompt is empty and the tokenizer adds no BOS token to start from: give a --prompt")
    return generate_samples(
        model, tokenizer, prompt_ids, runtime, settings.num_samples, settings.max_new_tokens, settings.temperature,
        settings.top_k, settings.top_p, prefix=prefix,
    )
