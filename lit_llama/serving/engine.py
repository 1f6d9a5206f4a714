"""The batching engine behind the server: one thread that decodes every active request together, one token per
step, and admits new requests between steps (continuous batching).

KV cache: one slot per batch row, `max_batch_size` slots of `context_length` positions per layer, each row with its
own position. A request is prefilled alone into the first free slot (positions 0..T-1 of that slot, a causal
mask), then joins the decode steps: there row i feeds its last token at its own position p_i (RoPE from p_i, its key
and value written at [i, :, p_i]) and attends to columns 0..p_i of its slot through a per-row mask over the columns
0..max(p)+1 that the step reads. The active rows always occupy slots 0..n-1: when a row finishes, the last row's cache
moves into its slot, so a step reads one contiguous view of the cache instead of gathering rows. Nothing is padded
on the left and no row waits for another: a new request joins at the next step, a finished or cancelled one (a
client that disconnected) frees its slot at the next step.

A prefill pauses the decoding of the others for its duration (prompts are prefilled one at a time, between steps).
Each row's adapter is given to the LoRA layers through `AdapterRouting` (multi_lora.py); sampling is per row (its
own temperature, top_p and seeded generator); text is detokenized per row, with `stop` strings held back until they
can no longer match.
"""
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lit_llama.model import LLaMA
from lit_llama.precision import products_for
from lit_llama.serving.multi_lora import AdapterRouting


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and top_p), and the `top` most
    likely tokens' at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length"
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens generated since the previous event


@dataclass(eq=False)
class Request:
    prompt: list[int]
    adapter: int  # 0: the base; k: the k-th registered adapter
    max_tokens: int
    emit: Callable[[Event], None]  # called from the engine thread; must be thread-safe
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    top_logprobs: Optional[int] = None  # None: no log-probabilities; k: each token's, with the k most likely
    cancelled: bool = False  # set by the server when the client goes away
    tokens: list[int] = field(default_factory=list)  # generated, stop token excluded
    generated: int = 0  # tokens generated, a final stop token included
    text_sent: int = 0  # characters of the decoded text already emitted
    generator: Optional[torch.Generator] = None
    logprobs_due: list[TokenLogprob] = field(default_factory=list)  # not yet emitted


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens holding `top_p` of the mass (the first always kept); 1-D logits."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprob(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still begin a stop string (not to be sent yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Engine:
    def __init__(self, model: LLaMA, tokenizer, routing: AdapterRouting, max_batch_size: int, context_length: int):
        self.model, self.tokenizer, self.routing = model, tokenizer, routing
        self.max_batch_size, self.context_length = max_batch_size, context_length
        config = model.config
        reference = model.transformer.wte.weight
        self.device, self.dtype = reference.device, reference.dtype
        shape = (max_batch_size, config.n_query_groups, context_length, config.head_size)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(config.n_layer)]
        self.cos, self.sin = model.rope_tables(self.device)
        self.stop_ids = set(tokenizer.stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.active: list[Request] = []  # row i uses cache slot i
        self.lengths: list[int] = []  # tokens cached per row: the position its next token goes to
        self.last_tokens: list[int] = []  # the token each row feeds next
        self.waiting: "queue.Queue[Optional[Request]]" = queue.Queue()
        self.stats = dict(steps=0, mixed_steps=0, peak_batch=0, completed=0, cancelled=0)
        self.running = False
        self.thread = threading.Thread(target=self.run, name="lit-llama-engine", daemon=True)

    # the server's side
    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        if request.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.waiting.put(request)

    def status(self) -> dict:
        return dict(active=len(self.active), waiting=self.waiting.qsize(), max_batch_size=self.max_batch_size,
                    context_length=self.context_length, **self.stats)

    # the engine thread
    def run(self) -> None:
        while self.running:
            try:
                self.admit()
                if self.active:
                    self.decode_step()
            except Exception:  # a failed step ends the requests in it, not the server
                traceback.print_exc(file=sys.stderr)
                for request in self.active:
                    request.emit(Event(error="internal error while generating (see the server log)"))
                self.active, self.lengths, self.last_tokens = [], [], []

    def admit(self) -> None:
        """Prefill waiting requests into free slots; wait for one when nothing is active."""
        while len(self.active) < self.max_batch_size:
            try:
                request = self.waiting.get(timeout=0.5) if not self.active else self.waiting.get_nowait()
            except queue.Empty:
                return
            if request is None:
                return
            if request.cancelled:
                self.stats["cancelled"] += 1
                continue
            slot = len(self.active)
            prompt = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
            self.routing.rows = torch.tensor([request.adapter], device=self.device)
            try:
                with products_for(prompt.numel(), self.model.transformer.wte.weight):  # fp32 if bf16 is not native
                    logits = self.forward(prompt, torch.tensor([0], device=self.device), slot)
            except Exception:
                request.emit(Event(error="internal error while reading the prompt (see the server log)"))
                raise
            self.active.append(request)
            self.lengths.append(len(request.prompt))
            self.last_tokens.append(0)
            self.sample_and_emit(logits)

    def decode_step(self) -> None:
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled:
                self.stats["cancelled"] += 1
                self.remove(row)
        if not self.active:
            return
        self.stats["steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.active))
        tokens = torch.tensor(self.last_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        adapters = [r.adapter for r in self.active]
        self.stats["mixed_steps"] += len(set(adapters)) > 1  # rows through different adapters in one step
        self.routing.rows = torch.tensor(adapters, device=self.device)
        with products_for(tokens.numel(), self.model.transformer.wte.weight):
            logits = self.forward(tokens, positions, None)
        self.lengths = [length + 1 for length in self.lengths]
        self.sample_and_emit(logits)

    def sample_and_emit(self, logits: torch.Tensor) -> None:
        """Sample each row's next token (rows without one yet: the last rows, after a prefill), emit its text and
        free the rows that finished."""
        first = len(self.active) - logits.size(0)
        tokens = logits.argmax(-1).tolist()
        finished = []
        for i in range(logits.size(0)):
            row = first + i
            request = self.active[row]
            if request.temperature > 0:
                scaled = logits[i].float() / request.temperature
                if request.top_p < 1:
                    scaled = top_p_filter(scaled, request.top_p)
                tokens[i] = int(torch.multinomial(scaled.softmax(-1), 1, generator=request.generator))
            self.last_tokens[row] = tokens[i]
            if request.top_logprobs is not None and tokens[i] not in self.stop_ids:
                request.logprobs_due.append(token_logprob(logits[i], tokens[i], request.top_logprobs))
            if self.advance(request, tokens[i], self.lengths[row]):
                finished.append(row)
        for row in reversed(finished):
            self.stats["completed"] += 1
            self.remove(row)

    def advance(self, request: Request, token: int, cached: int) -> bool:
        """Add `token` to the request's reply and emit the text that is now final; True when the reply is done.
        `cached`: the position `token` would be fed at (the context's end finishes the reply)."""
        request.generated += 1
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        else:
            request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens)
        if request.stop:
            found = [i for i in (text.find(stop, max(0, request.text_sent - len(stop))) for stop in request.stop)
                     if i >= 0]
            if found:
                text, finish = text[: min(found)], "stop"
        if finish is None and (request.generated >= request.max_tokens or cached >= self.context_length):
            finish = "length"
        if finish is None:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for the token that completes it
                return False
            end = len(text) - held_back(text, request.stop)
        else:
            end = len(text)
        delta, request.text_sent = text[request.text_sent : end], max(end, request.text_sent)
        if delta or finish:
            request.emit(Event(delta, finish, prompt_tokens=len(request.prompt), completion_tokens=request.generated,
                               logprobs=request.logprobs_due))
            request.logprobs_due = []
        return finish is not None

    def remove(self, row: int) -> None:
        """Free `row`'s slot: the last row moves into it, so the active rows stay in slots 0..n-1."""
        last = len(self.active) - 1
        if row != last:
            length = self.lengths[last]
            for cache in (*self.keys, *self.values):
                cache[row, :, :length] = cache[last, :, :length]
            self.active[row], self.lengths[row], self.last_tokens[row] = (
                self.active[last], self.lengths[last], self.last_tokens[last]
            )
        self.active.pop()
        self.lengths.pop()
        self.last_tokens.pop()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, starts: torch.Tensor, slot: Optional[int]) -> torch.Tensor:
        """Logits (B, vocab) at the last position of each row. Prefill: one row (B=1) of T tokens into `slot` from
        position 0. Decode (`slot` None): rows 0..B-1, one token each, at positions `starts`."""
        model, config = self.model, self.model.config
        B, T = tokens.shape
        positions = starts.unsqueeze(1) + torch.arange(T, device=self.device)  # (B, T)
        end = int(positions.max()) + 1
        x = model.transformer.wte(tokens)
        cos = self.cos[positions].to(x.dtype).unsqueeze(2)  # (B, T, 1, hs): broadcast over the heads
        sin = self.sin[positions].to(x.dtype).unsqueeze(2)
        mask = (torch.arange(end, device=self.device) <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, end)
        gqa = config.n_query_groups != config.n_head
        upcast = self.device.type == "cpu" and x.dtype == torch.bfloat16  # as in model.py: fp32 attention on a CPU
        rows = torch.arange(B, device=self.device)
        for block, keys, values in zip(model.transformer.h, self.keys, self.values):
            attn = block.attn
            q, k, v = attn.project_qkv(block.norm_1(x), cos, sin)  # q (B, heads, T, hs), k and v (B, groups, T, hs)
            if slot is None:
                keys[rows, :, starts] = k[:, :, 0]
                values[rows, :, starts] = v[:, :, 0]
                k, v = keys[:B, :, :end], values[:B, :, :end]
            else:
                keys[slot, :, :T] = k[0]
                values[slot, :, :T] = v[0]
                k, v = keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
            if upcast:
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
                y = y.to(x.dtype)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.norm_2(x))
        x = model.transformer.ln_f(x[:, -1:])
        logits = F.linear(x, model.transformer.wte.weight) if model.lm_head is None else model.lm_head(x)
        return logits[:, 0, : config.vocab_size].float()
