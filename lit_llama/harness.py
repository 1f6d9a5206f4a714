"""Our models inside EleutherAI's lm-evaluation-harness (`pip install lm-eval`, the "harness" extra): `HarnessLM` is an
`lm_eval` model class, so the harness's tasks (hellaswag, arc, mmlu, ...: loglikelihood, rolling loglikelihood and
generation) score a base checkpoint or any finetune with our batching and KV cache.

It tokenizes and splits context from continuation exactly as the harness's own `hf` model does (both through
`TemplateLM`), so per-sample scores match that model's on the same weights converted to Hugging Face format.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the script reports it as one line; importing this module needs no lm_eval
    TemplateLM = object

from lit_llama.checkpoint import load
from lit_llama.errors import UserError
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import Runtime, generate_batch, setup_runtime
from lit_llama.model import LLaMA
from lit_llama.precision import products_for
from lit_llama.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKENS = 256  # the harness's default when a task names none (as its hf model)


def require_lm_eval() -> None:
    if TemplateLM is object:
        raise UserError('lm-evaluation-harness is not installed: pip install -e ".[harness]" (or pip install lm-eval)')


class HarnessLM(TemplateLM):
    """A frozen lit-llama model (base, merged or adapter finetune) as an `lm_eval` model.

    Loglikelihoods: requests with the same input share a row (one-token choices of one question), rows sorted by
    length, `batch_size` per forward, padded on the right (causal attention keeps padding out of every real
    position), the output head computed only at continuation positions. Generation:
    requests with the same settings and prompt length go together through `generation.generate_batch`.
    """

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, runtime: Runtime, batch_size: int = 16) -> None:
        super().__init__()
        self.model, self.lit_tokenizer, self.runtime, self._batch_size = model, tokenizer, runtime, batch_size
        self._device = runtime.device
        self.vocab_size = model.config.vocab_size

    # what TemplateLM needs to tokenize as the harness's hf model does
    @property
    def eot_token_id(self) -> int:
        return self.lit_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced with (BOS, else EOS), as in the hf model."""
        bos = self.lit_tokenizer.bos_id
        return bos if bos is not None else self.lit_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """The tokenizer's own convention (BOS or not) unless told; no second BOS before a text that starts with one."""
        if add_special_tokens is None and string.startswith(self.tok_decode([self.prefix_token_id], False)):
            add_special_tokens = False
        flag = False if add_special_tokens is False else None  # None and True: the tokenizer's own special tokens
        return self.lit_tokenizer.encode_batch([string], bos=flag, eos=flag)[0]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.lit_tokenizer.processor.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`requests`: (cache key or None, context ids, continuation ids) -> (log-probability of the continuation,
        whether greedy decoding would produce it). Too long: the oldest context tokens are dropped."""
        # requests with the same input and continuation length share a row: the choices of a multiple-choice
        # question that are one token each (MMLU's " A", " B", ...) cost one row, not one per choice
        rows: dict[tuple[tuple[int, ...], int], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs context and continuation tokens")
            if len(continuation) > self.max_length:
                raise UserError(
                    f"a task scores a continuation of {len(continuation)} tokens, longer than the model's context "
                    f"of {self.max_length}"
                )
            inputs = (context + continuation)[-(self.max_length + 1) : -1]
            rows[tuple(inputs), len(continuation)].append(i)
        # longest first: equal-length neighbours waste little padding, and running out of memory happens at once
        order = sorted(rows, key=lambda row: -len(row[0]))
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), desc="loglikelihoods", file=sys.stderr, disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for row, logprobs in zip(batch, self.continuation_logprobs(batch)):
                    greedy = logprobs.argmax(dim=-1)
                    for i in rows[row]:
                        target = torch.tensor(requests[i][2], device=logprobs.device)
                        score = (float(logprobs.gather(1, target.unsqueeze(1)).sum()), bool((greedy == target).all()))
                        results[i] = score
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                    bar.update(len(rows[row]))
        return results

    def continuation_logprobs(self, rows: list[tuple[tuple[int, ...], int]]) -> list[torch.Tensor]:
        """(inputs, continuation length) rows in one forward, padded on the right, the output head computed only at
        the positions predicting the continuation: each row's (continuation length, vocab) log-probabilities."""
        width = max(len(inputs) for inputs, _ in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (inputs, length) in enumerate(rows):
            idx[r, : len(inputs)] = torch.tensor(inputs)
            scored[r, len(inputs) - length : len(inputs)] = True
        device = self.runtime.device
        with self.runtime.autocast():
            with products_for(idx.numel(), self.model.transformer.wte.weight):  # fp32 where bf16 is not native
                logits = self.model(idx.to(device), logits_at=scored.to(device))
        logprobs = F.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        return list(logprobs.split([length for _, length in rows]))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: each text in windows of the context length, every token predicted once."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for n, (text,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings, a stop token, or `max_gen_toks` tokens; greedy
        unless the task samples. The stop string and everything after it are cut off, as the hf model does."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        groups = defaultdict(list)  # same settings and prompt length: one generate_batch call
        prompts = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKENS)
            budget = settings["max_gen_toks"]
            if budget >= self.max_length:
                raise UserError(f"a task asks for {budget} new tokens but the model's context is {self.max_length}")
            prompts[i] = self.tok_encode(context)[-(self.max_length - budget) :]
            key = json.dumps(settings, sort_keys=True, default=str)
            groups[key, len(prompts[i])].append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        answers: list = [None] * len(requests)
        with tqdm(total=len(requests), desc="generating", file=sys.stderr, disable=disable_tqdm) as bar:
            for (key, _), members in groups.items():
                settings = json.loads(key)
                until = handle_stop_sequences(settings["until"], eos=eos_text)
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    texts = self.continue_batch([prompts[i] for i in batch], settings, until)
                    for i, text in zip(batch, texts):
                        answers[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return answers

    def continue_batch(self, prompts: list[list[int]], settings: dict, until: list[str]) -> list[str]:
        """Prompts of equal length continued together, stopping once every row has a stop token or stop string."""
        sampling = settings.get("do_sample") and settings.get("temperature", 0) > 0
        options = dict(
            temperature=settings["temperature"] if sampling else 0,
            top_k=settings.get("top_k") if sampling else None,
            top_p=(settings.get("top_p") or 1.0) if sampling else 1.0,
        )
        stop_ids = set(self.lit_tokenizer.stop_ids) | {self.eot_token_id}
        rows: list[list[int]] = [[] for _ in prompts]
        with self.runtime.autocast():
            steps = generate_batch(self.model, torch.tensor(prompts), settings["max_gen_toks"], stop_ids=stop_ids,
                                   **options)
            for tokens in steps:
                for row, token in zip(rows, tokens.tolist()):
                    row.append(token)
                if all(self.done(row, stop_ids, until) for row in rows):
                    steps.close()  # frees the KV cache now
                    break
        texts = []
        for row in rows:
            end = next((n for n, token in enumerate(row) if token in stop_ids), len(row))
            text = self.tok_decode(row[:end])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def done(self, row: list[int], stop_ids: set, until: list[str]) -> bool:
        if any(token in stop_ids for token in row):
            return True
        text = self.tok_decode(row)
        return any(stop and stop in text for stop in until)


def load_model(
    checkpoint_path: Optional[Path], finetuned_path: Optional[Path], precision: Optional[str], default_checkpoint: Path
) -> tuple[LLaMA, Tokenizer, Runtime, str]:
    """The model to evaluate (a finetune merged where it merges), its tokenizer, where it runs, and its name."""
    runtime = setup_runtime(precision, batched=True)
    device = runtime.device
    if finetuned_path is None:
        model, tokenizer = load(checkpoint_path or default_checkpoint, device=device, dtype=runtime.dtype)
        name = str(checkpoint_path or default_checkpoint)
    else:
        model, tokenizer, _ = load_finetuned(finetuned_path, checkpoint_path, device=device, dtype=runtime.dtype)
        name = str(finetuned_path)
    runtime.announce()
    return model, tokenizer, runtime, name


def task_manager(tasks: list[str], include_path: Optional[Path]):
    """The harness's task index, refusing names it does not know (one line, with the nearest names). Tasks found in
    `include_path` alone skip indexing the harness's own thousands of task files (seconds)."""
    import difflib

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.exists():
            raise UserError(f"--include_path {include_path} does not exist")
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in own.all_tasks for task in tasks):
            return own
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks and not Path(task).is_file()]
    if unknown:
        hints = [f"{task} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(task, manager.all_tasks, 3))
                 else task for task in unknown]
        raise UserError(f"unknown lm-eval task {'; '.join(hints)}: `lm-eval ls tasks` lists them")
    return manager


def evaluate(
    lm: "HarnessLM", tasks: list[str], manager, num_fewshot: Optional[int] = None,
    limit: Optional[Union[int, float]] = None, log_samples: bool = False, seed: int = 0,
) -> dict:
    """Run the harness on `tasks` (known to `manager`, from `task_manager`); returns its results, JSON-ready
    (per-sample records under "samples" if asked)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    results = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples, task_manager=manager,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return json.loads(json.dumps(results, default=handle_non_serializable))
