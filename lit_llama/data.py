"""Instruction datasets, from a JSON/JSONL/CSV file of (instruction, input, output) records to token tensors.

A prepared dataset directory holds:
  train.pt, test.pt  lists of {"input_ids", "labels"} (1-D long tensors): [BOS] prompt response EOS (through a
                     chat template: the template's text, the reply closed by its end-of-turn token), with the labels
                     of the prompt set to -100 when inputs are masked, so the loss only covers the response
  test.json          the raw held-out records in the order of test.pt (evaluation generates from them)
  meta.json          tokenizer identity, prompt style, sizes and the other settings used
Each `scripts/prepare_*.py` script is a PrepareArgs subclass with its source's options: it only fetches its source
and calls `prepare_with`; everything else lives here.
"""
import csv
import io
import json
import random
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from lit_llama.cli import OutputPath
from lit_llama.files import atomic_path, check_outputs, load_torch, read_json_object, save_all
from lit_llama.errors import UserError
from lit_llama.prompts import PromptStyle, resolve_prompt_style
from lit_llama.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label value cross-entropy skips
PREPARED_FILES = ("train.pt", "test.pt", "test.json", "meta.json")  # meta.json, which marks a dataset complete, last


def load_tokenizer(checkpoint_dir: Path, tokenizer_path: Optional[Path] = None) -> Tokenizer:
    """`--tokenizer_path` (a file) wins over the tokenizer found inside `--checkpoint_dir`."""
    if tokenizer_path is not None:
        return Tokenizer(tokenizer_path)
    if not Path(checkpoint_dir).is_dir():
        raise UserError(f"checkpoint directory not found: {checkpoint_dir} (pass --checkpoint_dir or --tokenizer_path)")
    return Tokenizer(checkpoint_dir)


@dataclass
class PrepareArgs:
    """The settings every scripts/prepare_*.py takes; each script's dataclass adds its source's options and defaults.

    Args:
        destination_path: Directory for the prepared files.
        checkpoint_dir: Checkpoint whose tokenizer to use.
        tokenizer_path: A tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        test_split_size: Number of records held out for evaluation.
        max_seq_length: Samples longer than this (in tokens) are truncated, keeping their EOS.
        seed: Seed of the train/test split.
        mask_inputs: Compute the loss on the response only (prompt labels set to -100).
        prompt_style: Prompt template: "alpaca", "chatml", "chat_template" (the checkpoint's own) or one you
            registered in lit_llama/prompts.py; default: the checkpoint's chat template if it has one, else alpaca.
        skip_long: Drop samples longer than max_seq_length instead of truncating them.
        overwrite: Replace a dataset an earlier run prepared in destination_path.
    """

    destination_path: OutputPath = OutputPath("data/custom")
    checkpoint_dir: Path = Path("checkpoints/smollm2-135m-instruct")
    tokenizer_path: Optional[Path] = None
    test_split_size: int = 100
    max_seq_length: int = 256
    seed: int = 42
    mask_inputs: bool = True
    prompt_style: Optional[str] = None
    skip_long: bool = False
    overwrite: bool = False


def check_destination(settings: PrepareArgs, *inputs: Optional[Path], also: tuple = ()) -> None:
    """Before tokenizing: the files a preparation writes (and `also`) may replace an earlier dataset only with
    --overwrite, and never the records or tokenizer they are made from."""
    outputs = [Path(settings.destination_path) / name for name in (*PREPARED_FILES, *also)]
    inputs = (*inputs, settings.checkpoint_dir, settings.tokenizer_path)
    check_outputs("--destination_path", outputs, inputs, settings.overwrite)


def local_or_downloaded(data_file: Optional[Path], url: str, directory: Path) -> Path:
    """`data_file` when the user gave one, else the file at `url`, downloaded into `directory` once."""
    if data_file is not None:
        return data_file
    path = Path(directory) / url.rsplit("/", 1)[-1]
    download(url, path)
    return path


def download(url: str, path: Path) -> None:
    """Fetch `url` into `path` unless it is already there; a failed download leaves nothing behind."""
    if path.is_file():
        return
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.wrapattr(f, "write", total=total, desc=f"downloading {path.name}") as out:
                shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(
            f"cannot download {url} ({reason}); without network, fetch it elsewhere and pass --data_file with the "
            "local copy"
        ) from None


def load_records(
    path: Union[str, Path],
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    task_field: str = "task",
) -> list[dict]:
    """Read a JSON list, JSON Lines or CSV file into records {"instruction", "input", "output"[, "task"]}.
    `input` and `task` are optional per record (a missing input becomes "")."""
    path = Path(path)
    rows = read_rows(path, (".json", ".jsonl", ".csv"))
    fields = {"instruction": instruction_field, "input": input_field, "output": output_field, "task": task_field}
    return [to_record(row, number, path, fields) for number, row in enumerate(rows, 1)]


# a field this long is not one training sample: tokenizing it would take minutes only to truncate it to a context
MAX_FIELD_CHARS = 1_000_000


def parse_json(text: str, path: Path) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line, saved with a .json name
            return parse_jsonl(text, path)
        raise UserError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be read as JSON") from None
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected a list of records")
    return data


def parse_jsonl(text: str, path: Path) -> list:
    rows = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {line_number} is not valid JSON: {error.msg}") from None
            except RecursionError:
                raise UserError(f"{path}, line {line_number} is nested too deeply to be read as JSON") from None
    return rows


def parse_csv(text: str, path: Path) -> list:
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise UserError(f"{path} is not valid CSV: {error}") from None


def read_rows(path: Path, suffixes: tuple[str, ...]) -> list:
    """The rows of a data file with one of `suffixes` (".json": a list, ".jsonl": one per line, ".csv": a header
    row); a file holding none is refused."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: tolerate the byte-order mark spreadsheets write
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {error.start})") from None
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        expected = ", ".join(suffixes[:-1]) + " or " + suffixes[-1]
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'!r}, expected {expected}")
    parse = {".json": parse_json, ".jsonl": parse_jsonl, ".csv": parse_csv}[suffix]
    rows = parse(text, path)
    if not rows:
        raise UserError(f"{path} holds no records")
    return rows


def to_record(row, number: int, path: Path, fields: dict) -> dict:
    where = f"{path}, record {number}"
    if not isinstance(row, dict):
        expected = ", ".join(fields.values())
        raise UserError(f"{where} is a {type(row).__name__}, expected an object with fields {expected}")
    record = {}
    for key, field in fields.items():
        value = row.get(field)
        if value is None and key in ("input", "task"):  # optional: no input means an empty one
            if key == "input":
                record["input"] = ""
            continue
        if field not in row:
            raise UserError(f"{where} has no {field!r} field (it has: {', '.join(map(str, row)) or 'nothing'})")
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise UserError(f"{where}: field {field!r} must be a string, not {kind}")
        if len(value) > MAX_FIELD_CHARS:
            raise UserError(
                f"{where}: field {field!r} holds {len(value):,} characters, above the limit of {MAX_FIELD_CHARS:,} "
                "(far beyond any context; split the record or shorten it)"
            )
        record[key] = value
    return record


def split_records(records: list, test_size: int, seed: int, source: str) -> tuple[list, list]:
    """A seeded shuffle; the first `test_size` records are held out. Depends only on the records and the seed."""
    if not 0 <= test_size < len(records):
        raise UserError(
            f"--test_split_size {test_size} must be below the number of records in {source} ({len(records)})"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[test_size:]], [records[i] for i in order[:test_size]]


def tokenize(
    records: list[dict], tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int, mask_inputs: bool,
    chunk_size: int = 4096,
) -> tuple[list[dict], list[bool]]:
    """Samples for `records`, and for each whether it had to be truncated.

    Prompt and response are tokenized separately and concatenated: the label boundary is then exact even for BPE
    tokenizers that would merge across it, and the prompt ids are those the model will see at generation time.
    The samples of a chunk are views into one tensor, so saving and loading handle a few large storages, not two
    small ones per sample. A checkpoint's chat template renders prompt and response as one text instead (its own
    special tokens, its own end-of-turn token): lit_llama/chat_data.py.
    """
    if style.renders_special_tokens:
        from lit_llama.chat_data import tokenize_instructions

        return tokenize_instructions(records, tokenizer, style, max_seq_length, mask_inputs)
    samples, truncated = [], []
    with tqdm(total=len(records), desc="tokenizing", unit=" records") as progress:
        for start in range(0, len(records), chunk_size):
            chunk = records[start : start + chunk_size]
            prompts = tokenizer.encode_batch([style.apply(r["instruction"], r["input"]) for r in chunk], eos=False)
            responses = tokenizer.encode_batch([r["output"] for r in chunk], bos=False, eos=True)
            all_ids, all_labels = [], []
            for prompt, response in zip(prompts, responses):
                ids = prompt + response
                labels = [IGNORE_INDEX] * len(prompt) + response if mask_inputs else ids
                truncated.append(len(ids) > max_seq_length)
                if truncated[-1]:  # keep the EOS: the model must still learn to stop
                    ids, labels = ids[: max_seq_length - 1] + ids[-1:], labels[: max_seq_length - 1] + labels[-1:]
                all_ids.append(ids)
                all_labels.append(labels)
            lengths = [len(ids) for ids in all_ids]
            input_ids, labels = (flat_tensor(lists).split(lengths) for lists in (all_ids, all_labels))
            samples += [{"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)]
            progress.update(len(chunk))
    return samples, truncated


def flat_tensor(lists: list[list[int]]) -> torch.Tensor:
    # numpy.fromiter converts Python ints several times faster than torch.tensor(list)
    return torch.from_numpy(np.fromiter(chain.from_iterable(lists), dtype=np.int64))


def prepare(
    records: list[dict],
    destination_path: Path,
    tokenizer: Tokenizer,
    source: str,
    test_split_size: int,
    max_seq_length: int,
    seed: int,
    mask_inputs: bool,
    prompt_style: Union[str, PromptStyle],
    skip_long: bool,
) -> dict:
    """Split, tokenize and write `records` into `destination_path`; returns the meta.json content."""
    style = prompt_style if isinstance(prompt_style, PromptStyle) else PromptStyle.from_name(prompt_style)
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length {max_seq_length} is too small: a sample needs a prompt token and EOS")
    if tokenizer.eos_id is None and not style.renders_special_tokens:
        raise UserError(f"tokenizer {tokenizer.path} defines no EOS token, so responses cannot be terminated")
    train, test = split_records(records, test_split_size, seed, source)
    # separately, so that test.pt holds no storage shared with training samples
    train_samples, train_long = tokenize(train, tokenizer, style, max_seq_length, mask_inputs)
    test_samples, test_long = tokenize(test, tokenizer, style, max_seq_length, mask_inputs)
    truncated = train_long + test_long
    if skip_long:
        train_samples = [s for s, long in zip(train_samples, train_long) if not long]
        kept = [i for i, long in enumerate(test_long) if not long]
        test, test_samples = [test[i] for i in kept], [test_samples[i] for i in kept]

    meta = prepared_meta(
        tokenizer, style, max_seq_length, mask_inputs, train_samples, test_samples, source,
        truncated=0 if skip_long else sum(truncated), skipped=sum(truncated) if skip_long else 0,
    )
    write_prepared(destination_path, train_samples, test_samples, test, meta)
    long_note = f"skipped {meta['skipped']}" if skip_long else f"truncated {meta['truncated']}"
    print(
        f"{meta['train_size']} train and {meta['test_size']} test samples in {destination_path} "
        f"({long_note} of {len(records)} records longer than {max_seq_length} tokens)"
    )
    return meta


def prepare_with(settings: PrepareArgs, records: list[dict], tokenizer: Tokenizer, source: str) -> dict:
    """`prepare` with a script's settings, the prompt style resolved against the tokenizer's checkpoint."""
    return prepare(
        records, settings.destination_path, tokenizer, source, settings.test_split_size, settings.max_seq_length,
        settings.seed, settings.mask_inputs, resolve_prompt_style(settings.prompt_style, tokenizer.path.parent),
        settings.skip_long,
    )


def prepared_meta(
    tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int, mask_inputs: bool, train: list, test: list,
    source: str, **counts,
) -> dict:
    """meta.json of a prepared dataset: what the samples were made with, their numbers, and `counts` (truncated,
    skipped, ...)."""
    return {
        "tokenizer": tokenizer.identity, "prompt_style": style.name, "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs, "train_size": len(train), "test_size": len(test), **counts, "source": source,
    }


def write_prepared(directory: Path, train: list[dict], test: list[dict], test_records: list, meta: dict) -> None:
    """All or nothing: a failure leaves the dataset that was there before (meta.json, which marks it complete, last)."""
    files = zip(PREPARED_FILES, (train, test, test_records, meta))
    save_all([(Path(directory) / name, obj) for name, obj in files])


def load_prepared(data_dir: Union[str, Path]) -> tuple[list[dict], list[dict], dict]:
    """(train samples, test samples, meta) of a directory written by `prepare`."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{data_dir} holds no prepared dataset (no meta.json): run a scripts/prepare_*.py script first")
    meta = read_json_object(meta_path)
    check_meta(meta, meta_path)
    for name in ("train.pt", "test.pt"):
        if not (data_dir / name).is_file():
            raise UserError(f"{data_dir} has meta.json but no {name}: prepare the dataset again")
    train, test = (load_samples(data_dir / name) for name in ("train.pt", "test.pt"))
    return train, test, meta


def check_meta(meta: dict, path: Path) -> None:
    """The fields finetuning and evaluation read, of the types `prepare` writes: a hand-edited or foreign meta.json
    is named in one line, not met as a traceback later."""
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("sha256"), str):
        raise UserError(f"{path}: 'tokenizer' must be an object with the tokenizer's sha256: prepare the dataset again")
    if meta.get("prompt_style") is not None and not isinstance(meta["prompt_style"], str):
        raise UserError(f"{path}: 'prompt_style' must be a name, got {meta['prompt_style']!r}")
    for key in ("train_size", "test_size", "max_seq_length"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{path}: {key!r} must be a whole number, got {value!r}")


def load_samples(path: Path) -> list[dict]:
    samples = load_torch(path)
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and all(isinstance(s.get(k), torch.Tensor) for k in ("input_ids", "labels"))
        for s in samples
    ):
        raise UserError(f"{path} is not a list of prepared samples (input_ids and labels): prepare the dataset again")
    return samples


def check_prepared_tokenizer(meta: dict, tokenizer: Tokenizer, data_dir: Union[str, Path]) -> None:
    """Token ids only mean something to the tokenizer that produced them."""
    prepared, current = meta.get("tokenizer", {}), tokenizer.identity
    if prepared.get("sha256") != current["sha256"]:
        raise UserError(
            f"{data_dir} was prepared with a different tokenizer ({prepared.get('backend')}, "
            f"vocab {prepared.get('vocab_size')}) than {tokenizer.path} ({current['backend']}, vocab "
            f"{current['vocab_size']}): prepare it again with this model's --checkpoint_dir"
        )
