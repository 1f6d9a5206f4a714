"""Multi-turn chat in a terminal (generate/chat.py): the conversation rendered with a chat template, replies streamed
token by token, and the KV cache kept from turn to turn so that only what is new is prefilled.

How the cache is reused: `ChatSession.cached` holds the token ids whose keys and values sit in the KV cache, at
positions 0..len-1. A turn renders the whole conversation (the template decides how it reads), tokenizes it, and
prefills only the part after the longest common prefix with `cached`: usually just the new user turn, since the
previous reply's tokens were fed while they were generated. Where a template rewrites earlier text (a date, a
trimmed reply) the common prefix is simply shorter; stale cache entries past it are overwritten, and attention never
reads past the current position. The result is the conversation rendered in full and generated from scratch, only
cheaper (the same numbers up to the summation order of the chunked prefill).

When the conversation no longer fits the context (`context_length`, new tokens included), the oldest turns are
dropped (the system message stays) with a notice, and the shortened conversation is prefilled again.
"""
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

import torch

from lit_llama.errors import UserError
from lit_llama.fast_decode import DecodeStep
from lit_llama.generation import resolve_context_length, sample, stream_text
from lit_llama.model import LLaMA
from lit_llama.precision import products_for
from lit_llama.prompts import PromptStyle

COMMANDS = "/reset (start over), /system <text> (set the system message), /exit (quit); Ctrl-C stops a reply"


@dataclass
class ReplySettings:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with `model` over one KV cache of `context_length` positions.

    `multi_turn=False` (a prompt style without a chat template): each message is answered on its own, as a
    single-turn prompt (`style.prompt_ids`).
    """

    def __init__(
        self,
        model: LLaMA,
        tokenizer,
        style: PromptStyle,
        settings: ReplySettings,
        context_length: Optional[int] = None,
        multi_turn: bool = True,
        out: TextIO = sys.stdout,
        notices: TextIO = sys.stderr,
    ) -> None:
        self.model, self.tokenizer, self.style, self.settings = model, tokenizer, style, settings
        self.multi_turn = multi_turn
        self.out, self.notices = out, notices
        self.context_length = resolve_context_length(context_length, model.config.block_size)
        self.device = model.transformer.wte.weight.device
        model.setup_kv_cache(batch_size=1, max_seq_length=self.context_length, device=self.device)
        # on a CPU the one-token decode step of a plain frozen model runs through fast_decode, as in generate
        self.step = DecodeStep.for_model(model)
        self.stop_ids = set(tokenizer.stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.system: Optional[str] = None
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.cached: list[int] = []  # the token ids whose keys and values are in the KV cache, from position 0
        self.last_prefill = 0  # tokens prefilled by the last turn (the rest was reused from the cache)

    def reset(self) -> None:
        self.turns = []

    def set_system(self, text: str) -> None:
        self.system = text or None

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids the model continues for this turn, dropping the oldest turns (with a notice) until the prompt
        and `max_new_tokens` fit; the kept turns become the conversation."""
        if not self.multi_turn:
            ids = self.style.prompt_ids(self.tokenizer, user_text).tolist()
            if len(ids) >= self.context_length:
                raise UserError(f"the message has {len(ids)} tokens, more than the context of {self.context_length}")
            return ids
        turns = self.turns + [{"role": "user", "content": user_text}]
        budget = self.context_length - min(self.settings.max_new_tokens, self.context_length // 2)
        dropped = 0
        while True:
            ids = self.style.conversation_ids(self.tokenizer, self.messages(turns)).tolist()
            if len(ids) <= budget or len(turns) == 1:
                break
            # drop the oldest user turn and the replies up to the next user turn
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
            turns, dropped = turns[cut:], dropped + cut
        if len(ids) >= self.context_length:
            raise UserError(
                f"the message needs {len(ids)} tokens with the system message, more than the context of "
                f"{self.context_length}: shorten it"
            )
        if dropped:
            print(f"[context full: dropped the {dropped} oldest message(s)]", file=self.notices, flush=True)
        self.turns = turns[:-1]
        return ids

    @torch.inference_mode()
    def tokens(self, prompt: list[int], reply: list[int]) -> Iterator[int]:
        """Prefill what `prompt` adds to the cache, then yield new tokens (appended to `reply` first, so a Ctrl-C
        anywhere leaves `reply` complete) until a stop token, `max_new_tokens` or the end of the context."""
        settings, vocab = self.settings, self.model.config.vocab_size
        reused = min(common_prefix_length(self.cached, prompt), len(prompt) - 1)  # at least one token to prefill
        self.cached = self.cached[:reused]
        self.last_prefill = len(prompt) - reused
        new = torch.tensor([prompt[reused:]], dtype=torch.long, device=self.device)
        last = torch.zeros(new.shape, dtype=torch.bool, device=self.device)
        last[:, -1] = True
        with products_for(new.numel(), self.model.transformer.wte.weight):  # fp32 where bf16 is not native
            logits = self.model(new, input_pos=reused, logits_at=last)[:, :vocab]
        self.cached = list(prompt)
        for _ in range(settings.max_new_tokens):
            token = sample(logits, settings.temperature, settings.top_k, settings.top_p)
            reply.append(int(token))
            yield int(token)
            position = len(self.cached)
            if int(token) in self.stop_ids or len(reply) == settings.max_new_tokens:
                return
            if position >= self.context_length:
                print("\n[the context is full: reply cut]", file=self.notices, flush=True)
                return
            logits = self.step(token, position) if self.step else self.model(token, input_pos=position)
            self.cached.append(int(token))
            logits = logits[:, -1, :vocab]

    def respond(self, user_text: str) -> str:
        """Answer `user_text` (streamed to `out`) and return the reply's text; Ctrl-C ends the reply early."""
        prompt = self.prompt_ids(user_text)
        reply: list[int] = []
        start = time.perf_counter()
        interrupted = False
        try:
            stream_text(self.tokens(prompt, reply), self.tokenizer, prompt, self.out)
        except KeyboardInterrupt:
            interrupted = True
        text = self.tokenizer.decode([t for t in reply if t not in self.stop_ids])
        print(file=self.out, flush=True)
        if interrupted:
            print("[reply stopped]", file=self.notices, flush=True)
        seconds = time.perf_counter() - start
        print(f"[{len(reply)} tokens in {seconds:.2f} sec, {len(reply) / max(seconds, 1e-9):.1f} tokens/sec; "
              f"prefilled {self.last_prefill}, reused {len(prompt) - self.last_prefill} cached]",
              file=self.notices, flush=True)
        if self.multi_turn and (text or not interrupted):  # a reply stopped before its first word is not kept
            self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


def read_line(prompt: str, interactive: bool) -> Optional[str]:
    """The next line of input (None at its end); Ctrl-C at the prompt asks again rather than quitting. Bytes that
    are not UTF-8 (stdin reads them as lone surrogates) become U+FFFD, with a note."""
    while True:
        try:
            if interactive:
                line = input(prompt)
            else:
                line = sys.stdin.readline()
                if not line:
                    return None
                line = line.rstrip("\n")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(type /exit to quit)", file=sys.stderr, flush=True)
            continue
        replaced = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if replaced != line:
            print("[the message held bytes that are not UTF-8: each was replaced by \ufffd]", file=sys.stderr, flush=True)
        return replaced


def chat_loop(session: ChatSession) -> None:
    """Read messages and commands from stdin until /exit or the end of input. Prompts and notices go to stderr
    and the prompt is only shown on a terminal, so stdout holds exactly the replies (one per line block)."""
    interactive = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="surrogateescape")  # an undecodable byte is kept to be replaced, not a crash
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chat with the model. {COMMANDS}", file=sys.stderr, flush=True)
    while True:
        line = read_line(">> ", interactive)
        if line is None or line.strip() == "/exit":
            return
        command, _, argument = line.strip().partition(" ")
        if command == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr, flush=True)
        elif command == "/system":
            if not session.multi_turn:
                print("[this prompt style has no chat template: no system message]", file=sys.stderr, flush=True)
                continue
            session.set_system(argument.strip())
            session.reset()
            print("[system message set; conversation reset]", file=sys.stderr, flush=True)
        elif command.startswith("/"):
            print(f"[unknown command {command}: {COMMANDS}]", file=sys.stderr, flush=True)
        elif line.strip():
            try:
                session.respond(line)
            except UserError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
