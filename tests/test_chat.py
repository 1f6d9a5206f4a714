"""generate/chat.py driven through a pipe as a user would type: every greedy reply equals `generate` over the whole
conversation rendered from scratch, so reusing the KV cache across turns changes nothing."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import HANG_SECONDS, REPO
from lit_llama.adapter import ADAPTER, AdapterArgs, add_adapter
from lit_llama.checkpoint import load
from lit_llama.finetuned import FINETUNE_CONFIG_NAME, load_finetuned
from lit_llama.generation import generate
from lit_llama.prompts import resolve_prompt_style
from tiny_finetunes import load_base, make_base, make_chat_lora, randomise_trainable, save_finetuned
from tiny_tokenizers import QWEN, with_template

NEW_TOKENS = 8


def run_chat(*args, lines: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "generate/chat.py"), *map(str, args), "--temperature", "0", "--precision",
         "32-true"],
        input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


class Reference:
    """What the chat should print: each reply generated from scratch over the conversation rendered in full."""

    def __init__(self, model, tokenizer, style, max_new_tokens=NEW_TOKENS):
        self.model, self.tokenizer, self.style, self.max_new_tokens = model, tokenizer, style, max_new_tokens
        self.stdout = ""

    def reply(self, prompt: list[int]) -> str:
        stops = set(self.tokenizer.stop_ids)
        with torch.inference_mode():
            tokens = list(generate(self.model, torch.tensor(prompt), self.max_new_tokens, temperature=0,
                                   stop_ids=stops))
        kept = [t for t in tokens if t not in stops]
        decode = self.tokenizer.decode
        self.stdout += decode(prompt + kept)[len(decode(prompt)):] + "\n"
        return decode(kept)

    def turn(self, messages: list[dict]) -> str:
        prompt = self.style.conversation_ids(self.tokenizer, messages).tolist()
        return self.reply(prompt)


@pytest.fixture(scope="module")
def chat_lora(tmp_path_factory):
    return make_chat_lora(tmp_path_factory.mktemp("chat"))


def test_every_reply_equals_generate_over_the_whole_conversation_and_only_new_turns_are_prefilled(chat_lora):
    path, base_path = chat_lora
    model, tokenizer, _ = load_finetuned(path)
    reference = Reference(model, tokenizer, resolve_prompt_style("chat_template", base_path.parent))
    system = {"role": "system", "content": "You sort words."}
    messages = [system, {"role": "user", "content": "Sort: stone tree"}]
    messages.append({"role": "assistant", "content": reference.turn(messages)})
    messages.append({"role": "user", "content": "Reverse them."})
    reference.turn(messages)
    reference.turn([system, {"role": "user", "content": "Hello"}])  # after /reset the system message stays

    result = run_chat("--finetuned_path", path, "--max_new_tokens", NEW_TOKENS,
                      lines=["/system You sort words.", "Sort: stone tree", "Reverse them.", "/reset", "Hello", "/exit",
                             "never read"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.stdout
    reuse = [line for line in result.stderr.splitlines() if "prefilled" in line]
    assert len(reuse) == 3 and "reused 0 cached" in reuse[0]
    # the second turn prefilled only what follows the cached first reply
    prefilled, reused = (int(w) for w in reuse[1].split("prefilled ")[1].replace(" cached]", "").split(", reused "))
    first_prompt = reference.style.conversation_ids(tokenizer, messages[:2]).tolist()
    assert reused >= len(first_prompt) and prefilled < len(first_prompt)


def test_an_adapter_finetune_chats_over_the_plain_model_path_with_the_same_replies(tmp_path):
    """LLaMA-Adapter layers do not merge: decoding takes model.forward at an offset rather than fast_decode."""
    base_path = make_base(tmp_path / "base", "tiny")
    with_template(base_path.parent, QWEN)
    model = add_adapter(load_base(base_path), AdapterArgs(prompt_length=4, start_layer=1))
    ADAPTER.mark_trainable(model)
    torch.manual_seed(3)
    randomise_trainable(model, std=0.5)
    path = save_finetuned(model, "adapter", tmp_path / "out", base_path, prompt_length=4, start_layer=1)
    config_path = path.parent / FINETUNE_CONFIG_NAME
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prompt_style": "chat_template"}))
    finetuned, tokenizer, _ = load_finetuned(path)
    reference = Reference(finetuned, tokenizer, resolve_prompt_style("chat_template", base_path.parent))
    messages = [{"role": "user", "content": "Sort: stone tree"}]
    messages.append({"role": "assistant", "content": reference.turn(messages)})
    messages.append({"role": "user", "content": "Reverse them."})
    reference.turn(messages)
    result = run_chat("--finetuned_path", path, "--max_new_tokens", NEW_TOKENS, lines=["Sort: stone tree",
                                                                                     "Reverse them."])
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.stdout and "reused 0 cached" not in result.stderr.splitlines()[-1]


def test_a_full_context_drops_the_oldest_turns_with_a_notice_and_answers_the_rest(chat_lora):
    path, base_path = chat_lora
    model, tokenizer, _ = load_finetuned(path)
    style = resolve_prompt_style("chat_template", base_path.parent)
    reference = Reference(model, tokenizer, style)
    context = 80
    budget = context - NEW_TOKENS
    users = ["Sort these words: stone tree lamp", "Now reverse the order of them", "Count them please", "Thanks"]
    turns = []
    for text in users:
        turns.append({"role": "user", "content": text})
        while len(style.conversation_ids(tokenizer, turns)) > budget:
            turns = turns[2:]  # the oldest user turn and its reply
        turns.append({"role": "assistant", "content": reference.turn(turns)})

    result = run_chat("--finetuned_path", path, "--max_new_tokens", NEW_TOKENS, "--context_length", context,
                      lines=users)
    assert result.returncode == 0, result.stderr
    assert "[context full: dropped the 2 oldest message(s)]" in result.stderr
    assert result.stdout == reference.stdout


def test_a_prompt_style_without_a_template_answers_each_message_on_its_own(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")  # no chat template: the alpaca style
    model, tokenizer = load(base_path)
    style = resolve_prompt_style(None, base_path.parent)
    reference = Reference(model, tokenizer, style)
    for text in ("Sort: a b", "Reverse them."):
        reference.reply(style.prompt_ids(tokenizer, text).tolist())
    result = run_chat("--checkpoint_path", base_path, "--max_new_tokens", NEW_TOKENS,
                      lines=["Sort: a b", "/system ignored", "Reverse them."])
    assert result.returncode == 0, result.stderr
    assert "a multi-turn chat needs one" in result.stderr
    assert result.stdout == reference.stdout


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tmp_path):
    # a context long enough that the reply lasts a second or more (the tiny model makes ~2,000 tokens a second):
    # Ctrl-C must arrive while it is still replying
    context = 4096
    path, base_path = make_chat_lora(tmp_path, block_size=context)
    model, tokenizer, _ = load_finetuned(path)
    style = resolve_prompt_style("chat_template", base_path.parent)
    prompt = style.conversation_ids(tokenizer, [{"role": "user", "content": "Tell me a long story"}])
    greedy = list(generate(model, prompt, context - len(prompt), temperature=0, stop_ids=tokenizer.stop_ids))
    assert not set(greedy) & tokenizer.stop_ids  # the greedy reply runs to the end of the context unless stopped
    process = subprocess.Popen(
        [sys.executable, str(REPO / "generate/chat.py"), "--finetuned_path", str(path), "--max_new_tokens", "100000",
         "--temperature", "0", "--precision", "32-true", "--context_length", str(context)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        # a terminal's Ctrl-C: a shell that starts the tests in the background (`make test &`) leaves SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler in the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # its first bytes say generation is under way
        process.stdin.write(b"Tell me a long story\n")
        process.stdin.flush()
        assert os.read(process.stdout.fileno(), 1)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        stdout, stderr = process.communicate(b"Hi\n/exit\n", timeout=HANG_SECONDS)
    finally:
        process.kill()
    stderr = stderr.decode()
    assert process.returncode == 0, stderr
    assert "[reply stopped]" in stderr and stderr.count("prefilled") == 2


def test_bytes_that_are_not_utf8_are_replaced_with_a_note_and_the_chat_goes_on(tmp_path):
    base_path = make_base(tmp_path / "base", "tiny")
    model, tokenizer = load(base_path)
    style = resolve_prompt_style(None, base_path.parent)
    reference = Reference(model, tokenizer, style)
    for text in ("caf\ufffd au lait", "Hi"):
        reference.reply(style.prompt_ids(tokenizer, text).tolist())
    result = subprocess.run(
        [sys.executable, str(REPO / "generate/chat.py"), "--checkpoint_path", str(base_path), "--max_new_tokens",
         str(NEW_TOKENS), "--temperature", "0", "--precision", "32-true"],
        input=b"caf\xe9 au lait\nHi\n", capture_output=True, timeout=120, cwd=REPO,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    assert stderr.count("bytes that are not UTF-8") == 1
    assert result.stdout.decode() == reference.stdout


@pytest.mark.parametrize("context_length", [1, 100_000_000])
def test_a_context_length_the_server_would_refuse_is_refused_in_one_line(tmp_path, context_length):
    base_path = make_base(tmp_path / "base", "tiny")
    result = run_chat("--checkpoint_path", base_path, "--context_length", context_length, lines=["Hi"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: --context_length must be"), lines


@pytest.mark.slow
def test_the_shipped_smollm2_chats_through_a_pipe(smollm2_checkpoint):
    model, tokenizer = load(smollm2_checkpoint)
    reference = Reference(model, tokenizer, resolve_prompt_style(None, smollm2_checkpoint), max_new_tokens=12)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    messages.append({"role": "assistant", "content": reference.turn(messages)})
    messages.append({"role": "user", "content": "And of Italy?"})
    reference.turn(messages)
    result = run_chat("--checkpoint_path", smollm2_checkpoint, "--max_new_tokens", 12,
                      lines=["What is the capital of France?", "And of Italy?", "/exit"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.stdout
    assert "Paris" in result.stdout.splitlines()[0]
