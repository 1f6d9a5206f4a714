"""Conversation datasets: every assistant turn labelled, token for token, and nothing else; whole turns kept when
truncating; bad records named in one line. Instruction data through a chat template or a BOS-adding tokenizer gets
exactly one BOS and ends its labels with the reply's closing token."""
import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO
from lit_llama.chat_data import load_conversations, prepare_conversations, tokenize_conversations
from lit_llama.cli import run_cli
from lit_llama.data import IGNORE_INDEX, load_prepared, prepare, tokenize
from lit_llama.errors import UserError
from lit_llama.prompts import PromptStyle, resolve_prompt_style
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import TEMPLATES, make_byte_level_bpe, make_chat_checkpoint, make_llama3_like

pytest.importorskip("google.protobuf", reason="reading a SentencePiece model needs protobuf")

CHATS = [
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green, mostly."}],
    [{"role": "user", "content": "Sort: stone tree"}, {"role": "assistant", "content": "stone tree"}],
    [{"role": "user", "content": "Say <|im_end|> or </s> literally? 🙂"}, {"role": "assistant", "content": "No."},
     {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "It would end my turn."},
     {"role": "user", "content": "A last question with no answer yet"}],
]
ALPACA = [{"instruction": f"Name item {i}.", "input": "" if i % 2 else f"list {i}", "output": f"Thing {i}."}
          for i in range(12)]


def no_system(chats):
    """Mistral's template has no system role."""
    return [[m for m in chat if m["role"] != "system"] for chat in chats]


def labelled_runs(sample):
    """The maximal runs of labelled positions, as (start, end) token indices."""
    labelled = (sample["labels"] != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, flag in enumerate(labelled):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def expected_reply(name, content, closing):
    # Llama 2's template writes " reply </s>" (the leading space is the start of the reply's first token)
    return f"{content.strip()} {closing}" if name == "llama2" else content + closing


@pytest.mark.parametrize("name", [*TEMPLATES, "chatml"])
def test_every_assistant_turn_is_labelled_token_for_token_and_nothing_else(name, tmp_path):
    if name == "chatml":
        make_byte_level_bpe(tmp_path)
        style, closing = PromptStyle.from_name("chatml"), "<|im_end|>"
    else:
        style, closing = resolve_prompt_style(None, make_chat_checkpoint(tmp_path, name)), TEMPLATES[name][2]
    tokenizer = Tokenizer(tmp_path)
    chats = no_system(CHATS) if name == "mistral" else CHATS
    samples, kept, counts = tokenize_conversations(chats, tokenizer, style, max_seq_length=10**6)
    assert kept == [0, 1, 2] and counts == {"truncated": 0, "dropped": 0, "skipped": 0}
    for sample, chat in zip(samples, chats):
        ids, labels = sample["input_ids"], sample["labels"]
        runs = labelled_runs(sample)
        replies = [(i, m) for i, m in enumerate(chat) if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for (start, end), (turn, message) in zip(runs, replies):
            assert tokenizer.decode(ids[start:end]) == expected_reply(name, message["content"], closing)
            assert labels[start:end].tolist() == ids[start:end].tolist()
            assert ids[end - 1] == tokenizer.token_id(closing)
            # what precedes a reply is exactly the prompt generation feeds for that conversation so far
            assert ids[:start].tolist() == style.conversation_ids(tokenizer, chat[:turn]).tolist()
        assert end == len(ids)  # a sample ends with its last reply's closing token
        bos = tokenizer.bos_id
        assert bos is None or ids[:2].tolist() != [bos, bos]


@pytest.mark.parametrize("name", ["llama3", "llama2", "smollm2"])
def test_instruction_records_through_a_chat_template_end_with_its_closing_token(name, tmp_path):
    directory = make_chat_checkpoint(tmp_path, name)
    tokenizer, style = Tokenizer(directory), resolve_prompt_style(None, directory)
    closing = tokenizer.token_id(TEMPLATES[name][2])
    samples, truncated = tokenize(ALPACA, tokenizer, style, max_seq_length=10**6, mask_inputs=True)
    assert not any(truncated)
    for sample, record in zip(samples, ALPACA):
        prompt = style.prompt_ids(tokenizer, record["instruction"], record["input"]).tolist()
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
        assert labels[len(prompt) :] == ids[len(prompt) :] and labels[-1] == closing
        assert tokenizer.decode(ids[len(prompt) :]) == expected_reply(name, record["output"], TEMPLATES[name][2])
        assert tokenizer.bos_id is None or ids[:2] != [tokenizer.bos_id] * 2  # never a second BOS
    short = tokenize(ALPACA[:1], tokenizer, style, max_seq_length=len(prompt) + 1, mask_inputs=True)[0][0]
    assert short["labels"][-1] == closing  # cut short, a reply still ends with the token that closes it


@pytest.mark.parametrize("post_processor", ["bos", "bos+eos"])
def test_a_bos_adding_tokenizer_gets_one_bos_and_one_eos(post_processor, tmp_path):
    make_llama3_like(tmp_path, post_processor)
    tokenizer = Tokenizer(tmp_path)
    meta = prepare(ALPACA, tmp_path / "out", tokenizer, "records", test_split_size=2, max_seq_length=256, seed=1,
                   mask_inputs=True, prompt_style="alpaca", skip_long=False)
    train, test, _ = load_prepared(tmp_path / "out")
    records = json.loads((tmp_path / "out" / "test.json").read_text())
    style = PromptStyle.from_name("alpaca")
    assert meta["prompt_style"] == "alpaca"
    for sample, record in zip(test, records):
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        prompt = style.prompt_ids(tokenizer, record["instruction"], record["input"]).tolist()
        assert prompt[0] == tokenizer.bos_id and prompt[-1] != tokenizer.eos_id  # a prompt never ends in EOS
        assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eos_id) == 1 and ids[-1] == tokenizer.eos_id
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
        assert labels[len(prompt) :] == ids[len(prompt) :]
        assert tokenizer.decode(ids[len(prompt) : -1]) == record["output"]


def test_truncation_keeps_whole_turns_and_drops_what_cannot_hold_a_reply(tmp_path):
    directory = make_chat_checkpoint(tmp_path, "smollm2")
    tokenizer, style = Tokenizer(directory), resolve_prompt_style(None, directory)
    chat = CHATS[0]
    (full,), _, _ = tokenize_conversations([chat], tokenizer, style, 10**6)
    first_end = labelled_runs(full)[0][1]
    prompt_length = labelled_runs(full)[0][0]
    im_end = tokenizer.token_id("<|im_end|>")

    (cut,), _, counts = tokenize_conversations([chat], tokenizer, style, len(full["input_ids"]) - 1)
    assert counts["truncated"] == 1 and cut["input_ids"].tolist() == full["input_ids"][:first_end].tolist()
    assert cut["labels"].tolist() == full["labels"][:first_end].tolist()  # the first turn, whole

    (inside,), _, counts = tokenize_conversations([chat], tokenizer, style, prompt_length + 2)
    assert len(inside["input_ids"]) == prompt_length + 2 and inside["input_ids"][-1] == im_end
    assert (inside["labels"] != IGNORE_INDEX).sum() == 2  # one token of the reply and its closing token

    samples, kept, counts = tokenize_conversations([chat, CHATS[1]], tokenizer, style, prompt_length + 1)
    assert 0 not in kept and counts["dropped"] >= 1
    assert all((s["labels"] != IGNORE_INDEX).any() for s in samples)

    (short,), _, _ = tokenize_conversations([CHATS[1]], tokenizer, style, 10**6)
    limit = len(short["input_ids"])
    samples, kept, counts = tokenize_conversations([chat, CHATS[1]], tokenizer, style, limit, skip_long=True)
    assert kept == [1] and counts["skipped"] == 1 and torch.equal(samples[0]["input_ids"], short["input_ids"])


def test_a_long_conversation_costs_linear_time_and_is_cut_as_if_located_whole(tmp_path, monkeypatch):
    directory = make_chat_checkpoint(tmp_path, "smollm2")
    tokenizer, style = Tokenizer(directory), resolve_prompt_style(None, directory)
    chat = [{"role": role, "content": f"{role} says {i}"} for i in range(200) for role in ("user", "assistant")]
    renders = []
    render = PromptStyle.render
    monkeypatch.setattr(PromptStyle, "render", lambda self, messages, **kw: renders.append(len(messages)) or render(
        self, messages, **kw))
    (whole,), _, _ = tokenize_conversations([chat], tokenizer, style, 10**6)
    assert len(renders) > 400  # located turn by turn: every assistant turn renders the conversation so far twice
    renders.clear()
    (cut,), _, counts = tokenize_conversations([chat], tokenizer, style, 256)
    assert counts["truncated"] == 1 and len(cut["input_ids"]) <= 256
    assert sum(renders) < 30 * len(chat)  # only the turns within the first 256 tokens: not ~len(chat)**2 messages
    assert cut["input_ids"].tolist() == whole["input_ids"][: len(cut["input_ids"])].tolist()
    assert cut["labels"].tolist() == whole["labels"][: len(cut["labels"])].tolist()


def test_a_conversation_beyond_the_turn_limit_is_refused_naming_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("lit_llama.chat_data.MAX_TURNS", 10)
    data_file = tmp_path / "chat.json"
    data_file.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}] * 11}]))
    with pytest.raises(UserError, match="record 1: 11 turns, more than the 10 one conversation may have"):
        load_conversations(data_file)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sharegpt(chat):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in chat]}


def test_prepare_chat_script_reads_openai_and_sharegpt_records(tmp_path, monkeypatch, capsys):
    directory = make_chat_checkpoint(tmp_path / "ckpt", "smollm2")
    chats = [CHATS[i % 3] for i in range(9)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in chats))
    (tmp_path / "chat.json").write_text(json.dumps([sharegpt(c) for c in chats]))
    assert load_conversations(tmp_path / "chat.json") == load_conversations(tmp_path / "chat.jsonl") == chats
    prepare_chat = load_script("prepare_chat")
    for source in ("chat.jsonl", "chat.json"):
        out = tmp_path / source.replace(".", "-")
        args = ["--data_file", tmp_path / source, "--destination_path", out, "--checkpoint_dir", directory,
                "--test_split_size", 3]
        monkeypatch.setattr(sys, "argv", ["prepare_chat.py", *map(str, args)])
        run_cli(prepare_chat.main)
        train, test, meta = load_prepared(out)
        assert (len(train), len(test), meta["train_size"], meta["test_size"]) == (6, 3, 6, 3)
        assert meta["prompt_style"] == "chat_template" and meta["tokenizer"] == Tokenizer(directory).identity
        assert {"max_seq_length", "mask_inputs", "truncated", "skipped", "source"} <= set(meta)
        held_out = json.loads((out / "test.json").read_text())
        style = resolve_prompt_style(None, directory)
        for sample, record in zip(test, held_out):
            expected, _, _ = tokenize_conversations([record["messages"]], Tokenizer(directory), style, 10**6)
            assert torch.equal(sample["input_ids"], expected[0]["input_ids"])
    assert "6 train and 3 test conversations" in capsys.readouterr().out


BAD_RECORDS = {
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "record 2: messages[0]: unknown role 'bot'"),
    "empty conversation": ({"messages": []}, "record 2: field 'messages' is an empty conversation"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "x"}]},
                          "record 2: field 'messages' has no assistant turn"),
    "non-string content": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
                           "record 2: messages[1]: field 'content' must be a string, not int"),
    "sharegpt unknown role": ({"conversations": [{"from": "robot", "value": "x"}]},
                              "record 2: conversations[0]: unknown role 'robot' in field 'from'"),
    "no conversation field": ({"text": "x"}, "record 2 has no 'messages' or 'conversations' field (it has: text)"),
    "not a list": ({"messages": "hi"}, "record 2: field 'messages' must be a list of turns, not str"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_record_is_one_line_naming_file_record_and_field(case, tmp_path, monkeypatch, capsys):
    directory = make_chat_checkpoint(tmp_path / "ckpt", "smollm2")
    record, message = BAD_RECORDS[case]
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text(json.dumps({"messages": CHATS[1]}) + "\n" + json.dumps(record) + "\n")
    monkeypatch.setattr(sys, "argv", ["prepare_chat.py", "--data_file", str(data_file), "--destination_path",
                                      str(tmp_path / "out"), "--checkpoint_dir", str(directory)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_script("prepare_chat").main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and f"{data_file}, {message}" in lines[0], lines
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_template_without_a_special_closing_token_is_refused(tmp_path):
    make_byte_level_bpe(tmp_path)
    style = PromptStyle("plain", chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(UserError, match="closes assistant turns with no special token"):
        tokenize_conversations(CHATS[1:2], Tokenizer(tmp_path), style, 100)


def test_no_conversation_fitting_is_a_user_error(tmp_path):
    directory = make_chat_checkpoint(tmp_path, "smollm2")
    with pytest.raises(UserError, match="no conversation of records fits in --max_seq_length 4"):
        prepare_conversations(CHATS * 2, tmp_path / "out", Tokenizer(directory), resolve_prompt_style(None, directory),
                              "records", test_split_size=1, max_seq_length=4, seed=0)


@pytest.mark.slow
def test_shipped_smollm2_conversations_are_transformers_tokenized_chat(smollm2_checkpoint):
    """The real SmolLM2 tokenizer and template (converted from the shipped GGUF): a prepared conversation is exactly
    transformers' tokenized chat up to the last reply's <|im_end|>, and only the replies are labelled."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    tokenizer, style = Tokenizer(smollm2_checkpoint), resolve_prompt_style(None, smollm2_checkpoint)
    samples, _, _ = tokenize_conversations(CHATS, tokenizer, style, 10**6)
    for sample, chat in zip(samples, CHATS):
        expected = list(reference.apply_chat_template(chat, tokenize=True, return_dict=False))
        ids = sample["input_ids"].tolist()
        assert ids == expected[: len(ids)] and ids[-1] == reference.convert_tokens_to_ids("<|im_end|>")
        replies = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[start:end]) for start, end in labelled_runs(sample)] == replies
