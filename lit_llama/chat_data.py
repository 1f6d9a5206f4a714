"""Conversation datasets: from a JSON/JSONL file of chats to the same train.pt/test.pt/test.json/meta.json that
lit_llama/data.py writes, so finetuning reads them unchanged.

A record is OpenAI style, {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, or ShareGPT
style, {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]} (an optional "system" field too).
Each conversation is rendered through the prompt style's chat template and tokenized as one text, as transformers'
`apply_chat_template` would; the loss covers every assistant turn, from where the template's generation prompt ends
through the token that closes the turn (the model must learn to stop), and nothing else.
"""
import bisect
import math
from pathlib import Path
from typing import Optional, Union

from tqdm import tqdm

from lit_llama.data import IGNORE_INDEX, flat_tensor, prepared_meta, read_rows, split_records, write_prepared
from lit_llama.errors import UserError
from lit_llama.files import read_json
from lit_llama.prompts import ROLES, PromptStyle, join_instruction
from lit_llama.tokenizer import Tokenizer

MAX_TURNS = 100_000  # per conversation: far beyond any context window, and a bound on the work one record can ask
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def load_conversations(path: Union[str, Path]) -> list[list[dict]]:
    """The conversations of a .json (a list of records) or .jsonl file, as lists of {"role", "content"} messages."""
    path = Path(path)
    rows = read_rows(path, (".json", ".jsonl"))
    return [to_conversation(row, number, path) for number, row in enumerate(rows, 1)]


def load_conversation(path: Union[str, Path]) -> list[dict]:
    """One conversation to continue (generate/finetuned.py --messages): a JSON file holding a list of messages or one
    record with "messages" (or ShareGPT "conversations"); unlike training data it need not hold an assistant turn."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"conversation file not found: {path}")
    row = read_json(path)
    return to_conversation({"messages": row} if isinstance(row, list) else row, 1, path, needs_reply=False)


def to_conversation(row, number: int, path: Path, needs_reply: bool = True) -> list[dict]:
    where = f"{path}, record {number}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is a {type(row).__name__}, expected an object with a 'messages' list")
    if "messages" in row:
        field, role_key, content_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:
        field, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        fields = ", ".join(map(str, row)) or "nothing"
        raise UserError(f"{where} has no 'messages' or 'conversations' field (it has: {fields})")
    turns = row[field]
    if not isinstance(turns, list):
        raise UserError(f"{where}: field {field!r} must be a list of turns, not {type(turns).__name__}")
    if not turns:
        raise UserError(f"{where}: field {field!r} is an empty conversation")
    if len(turns) > MAX_TURNS:
        raise UserError(f"{where}: {len(turns):,} turns, more than the {MAX_TURNS:,} one conversation may have: split it")
    messages = []
    if isinstance(row.get("system"), str) and field == "conversations" and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    for index, turn in enumerate(turns):
        at = f"{where}: {field}[{index}]"
        if not isinstance(turn, dict):
            expected = f"expected an object with {role_key!r} and {content_key!r}"
            raise UserError(f"{at} is a {type(turn).__name__}, {expected}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise UserError(f"{at}: unknown role {role!r} in field {role_key!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            kind = "null" if content is None else type(content).__name__
            raise UserError(f"{at}: field {content_key!r} must be a string, not {kind}")
        messages.append({"role": roles[role], "content": content})
    if needs_reply and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: field {field!r} has no assistant turn to learn from")
    return messages


def assistant_spans(
    style: PromptStyle, messages: list[dict], special_texts, full: Optional[str] = None, stop_after: float = math.inf,
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered up to the end of its last assistant turn, and the character range each assistant
    turn is trained on: from the end of the generation prompt that opens it through the special token that closes it.
    Turns after the first one that ends beyond character `stop_after` are left out: each needs the conversation so
    far rendered again, which would make a long conversation cost the square of its length.

    The template must render every conversation so far as a prefix of the whole (templates that rewrite earlier
    turns, like those that drop past reasoning, cannot be trained turn by turn) and close each assistant turn with
    one of the tokenizer's special tokens.
    """
    full = style.render(messages) if full is None else full
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if spans and spans[-1][1] > stop_after:
            break
        opening = style.render(messages[:i], add_generation_prompt=True)
        through = style.render(messages[: i + 1])
        if not (through.startswith(opening) and full.startswith(through)):
            raise UserError(
                f"the {style.name} chat template renders a conversation differently once it continues (turn {i} "
                "is not a prefix of the whole), so its assistant turns cannot be located"
            )
        turn = through[len(opening) :]
        content = message["content"]
        found = turn.find(content) if content else 0
        if found < 0:
            found = turn.find(content.strip())
            content = content.strip()
        if found < 0:
            raise UserError(f"the {style.name} chat template changes assistant message {i} beyond trimming it: "
                            f"{message['content'][:60]!r}")
        after = found + len(content)
        closings = [(turn.find(t, after), t) for t in special_texts if turn.find(t, after) >= 0]
        if not closings:
            raise UserError(
                f"the {style.name} chat template closes assistant turns with no special token of the tokenizer, so "
                "the model could not learn where a response ends"
            )
        position, token = min(closings, key=lambda c: (c[0], -len(c[1])))
        spans.append((len(opening), len(opening) + position + len(token)))
    return full[: spans[-1][1]], spans


def tokenize_conversation(
    conversation: list[dict], tokenizer: Tokenizer, style: PromptStyle, max_seq_length: Optional[int] = None,
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, turn_ends): labels are IGNORE_INDEX outside the assistant spans; turn_ends are the token
    counts at which the assistant turns end. One text, tokenized whole: the ids are those of the rendered chat.
    With `max_seq_length`, turns that would start past it are not located (fit() cuts them anyway): time stays
    linear in the conversation's length."""
    full, stop_after, encoded = style.render(conversation), math.inf, None
    if max_seq_length is not None:
        ((_, starts),) = encoded = tokenizer.encode_with_offsets([full])
        stop_after = starts[max_seq_length] if len(starts) > max_seq_length else math.inf
    text, spans = assistant_spans(style, conversation, tokenizer.special_token_texts, full, stop_after)
    # a conversation that ends with its last reply (the usual case) is not tokenized a second time
    ((ids, starts),) = encoded if encoded is not None and text == full else tokenizer.encode_with_offsets([text])
    # a format style (chatml) leaves BOS to the tokenizer; a checkpoint's template wrote its own
    prefix = [] if style.renders_special_tokens else tokenizer.encode("", bos=None, eos=False).tolist()
    span_starts = [start for start, _ in spans]

    def in_a_span(position: int) -> bool:
        index = bisect.bisect_right(span_starts, position) - 1
        return index >= 0 and position < spans[index][1]

    labels = [t if in_a_span(s) else IGNORE_INDEX for t, s in zip(ids, starts)]
    turn_ends = [len(prefix) + bisect.bisect_left(starts, end) for _, end in spans]
    return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels, turn_ends


def fit(ids: list[int], labels: list[int], turn_ends: list[int], max_seq_length: int):
    """Cut a sample to `max_seq_length`: after its last assistant turn that fits whole, else through the first
    turn's tokens that fit plus its closing token. None when not one labelled token would remain."""
    if len(ids) <= max_seq_length:
        return ids, labels
    whole = [end for end in turn_ends if end <= max_seq_length]
    if whole:
        return ids[: whole[-1]], labels[: whole[-1]]
    first_end = turn_ends[0]
    cut = ids[: max_seq_length - 1] + ids[first_end - 1 : first_end]
    cut_labels = labels[: max_seq_length - 1] + labels[first_end - 1 : first_end]
    if sum(label != IGNORE_INDEX for label in cut_labels[:-1]) == 0 or cut_labels[-1] == IGNORE_INDEX:
        return None
    return cut, cut_labels


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int,
    mask_inputs: bool = True, skip_long: bool = False,
) -> tuple[list[dict], list[int], dict]:
    """Samples, the indices of the conversations they come from, and counts of those truncated, dropped (no labelled
    token would fit) and skipped (`skip_long`)."""
    samples, kept, counts = [], [], {"truncated": 0, "dropped": 0, "skipped": 0}
    all_ids, all_labels = [], []
    for index, conversation in enumerate(tqdm(conversations, desc="tokenizing", unit=" conversations")):
        ids, labels, turn_ends = tokenize_conversation(conversation, tokenizer, style, max_seq_length)
        if len(ids) > max_seq_length:
            if skip_long:
                counts["skipped"] += 1
                continue
            fitted = fit(ids, labels, turn_ends, max_seq_length)
            if fitted is None:
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            ids, labels = fitted
        all_ids.append(ids)
        all_labels.append(labels if mask_inputs else ids)
        kept.append(index)
    if all_ids:
        lengths = [len(ids) for ids in all_ids]
        input_ids, labels = (flat_tensor(lists).split(lengths) for lists in (all_ids, all_labels))
        samples = [{"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)]
    return samples, kept, counts


def prepare_conversations(
    conversations: list[list[dict]],
    destination_path: Path,
    tokenizer: Tokenizer,
    style: PromptStyle,
    source: str,
    test_split_size: int,
    max_seq_length: int,
    seed: int,
    mask_inputs: bool = True,
    skip_long: bool = False,
) -> dict:
    """Split, tokenize and write `conversations` into `destination_path`; returns the meta.json content."""
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length {max_seq_length} is too small: a sample needs a prompt token and a reply")
    train, test = split_records(conversations, test_split_size, seed, source)
    train_samples, _, train_counts = tokenize_conversations(train, tokenizer, style, max_seq_length, mask_inputs,
                                                            skip_long)
    test_samples, test_kept, test_counts = tokenize_conversations(test, tokenizer, style, max_seq_length, mask_inputs,
                                                                  skip_long)
    counts = {key: train_counts[key] + test_counts[key] for key in train_counts}
    if not train_samples:
        raise UserError(f"no conversation of {source} fits in --max_seq_length {max_seq_length} with a labelled token")
    meta = prepared_meta(
        tokenizer, style, max_seq_length, mask_inputs, train_samples, test_samples, source, **counts,
    ) | {"format": "conversations"}
    test_records = [{"messages": test[i]} for i in test_kept]
    write_prepared(destination_path, train_samples, test_samples, test_records, meta)
    print(
        f"{meta['train_size']} train and {meta['test_size']} test conversations in {destination_path} (of "
        f"{len(conversations)}: truncated {counts['truncated']}, skipped {counts['skipped']}, dropped "
        f"{counts['dropped']} with no assistant token within {max_seq_length} tokens)"
    )
    return meta


def tokenize_instructions(
    records: list[dict], tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int, mask_inputs: bool
) -> tuple[list[dict], list[bool]]:
    """Instruction records ({"instruction", "input", "output"}) through a chat template, as one user turn and the
    assistant's reply; a sample too long keeps its closing token, as data.tokenize keeps EOS."""
    all_ids, all_labels, truncated = [], [], []
    for record in tqdm(records, desc="tokenizing", unit=" records"):
        conversation = [{"role": "user", "content": join_instruction(record["instruction"], record["input"])},
                        {"role": "assistant", "content": record["output"]}]
        ids, labels, _ = tokenize_conversation(conversation, tokenizer, style)
        labels = labels if mask_inputs else ids
        truncated.append(len(ids) > max_seq_length)
        if truncated[-1]:
            ids, labels = ids[: max_seq_length - 1] + ids[-1:], labels[: max_seq_length - 1] + labels[-1:]
        all_ids.append(ids)
        all_labels.append(labels)
    lengths = [len(ids) for ids in all_ids]
    input_ids, labels = (flat_tensor(lists).split(lengths) for lists in (all_ids, all_labels))
    return [{"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)], truncated
