"""The checkpoint's own chat template renders exactly as transformers' apply_chat_template, and is the default prompt
style of a checkpoint that has one."""
import json

import pytest

from lit_llama.errors import UserError
from lit_llama.prompts import PromptStyle, resolve_prompt_style
from lit_llama.tokenizer import Tokenizer
from tiny_tokenizers import (
    CONVERSATIONS, TEMPLATES, make_byte_level_bpe, make_chat_checkpoint, make_llama3_like, with_template,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")


@pytest.mark.parametrize("name", TEMPLATES)
def test_rendered_text_equals_transformers_apply_chat_template(name, tmp_path):
    directory = make_chat_checkpoint(tmp_path, name)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    style = resolve_prompt_style(None, directory)
    assert style.name == "chat_template"
    for conversation_name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (False, True):
            try:
                expected = reference.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)
            except Exception as error:  # the template refuses this conversation (Mistral: no system role)
                with pytest.raises(UserError, match="chat template refused the conversation"):
                    style.render(messages, add_generation_prompt)
                assert "jinja" in type(error).__module__ or "TemplateError" in type(error).__name__
                continue
            assert style.render(messages, add_generation_prompt) == expected, (conversation_name, add_generation_prompt)
        # the prompt ids generation feeds are transformers' tokenized chat: no BOS added to the template's own
        expected_ids = reference.apply_chat_template(CONVERSATIONS["one question"], tokenize=True,
                                                     add_generation_prompt=True, return_dict=False)
        ids = style.conversation_ids(Tokenizer(directory), CONVERSATIONS["one question"]).tolist()
        assert ids == list(expected_ids)
    assert style.apply("What is 2 + 3?") == style.render(CONVERSATIONS["one question"], add_generation_prompt=True)


def test_smollm2_template_adds_the_default_system_turn_that_chatml_omits(tmp_path):
    style = resolve_prompt_style(None, make_chat_checkpoint(tmp_path, "smollm2"))
    prompt = style.apply("Hi")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(PromptStyle.from_name("chatml").apply("Hi"))


def test_tojson_keeps_non_ascii_and_html_as_transformers_does(tmp_path):
    make_byte_level_bpe(tmp_path)
    template = "{% for m in messages %}{{ m | tojson }}{{ m['content'] | tojson(indent=2) }}{% endfor %}"
    with_template(tmp_path, template)
    messages = [{"role": "user", "content": "<b>café</b> & \"東京\""}]
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(messages, tokenize=False)
    assert resolve_prompt_style(None, tmp_path).render(messages) == expected


def test_the_template_cannot_reach_python(tmp_path):
    make_byte_level_bpe(tmp_path)
    with_template(tmp_path, "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|not safely|SecurityError|access"):
        resolve_prompt_style(None, tmp_path).render([{"role": "user", "content": "x"}])


def test_chat_template_jinja_file_wins_over_the_config_entry_as_in_transformers(tmp_path):
    make_byte_level_bpe(tmp_path)
    with_template(tmp_path, "config:{{ messages[0]['content'] }}")
    (tmp_path / "chat_template.jinja").write_text("file:{{ messages[0]['content'] }}")
    messages = [{"role": "user", "content": "x"}]
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(messages, tokenize=False)
    assert resolve_prompt_style(None, tmp_path).render(messages) == expected == "file:x"


def test_resolve_prompt_style(tmp_path):
    make_byte_level_bpe(tmp_path / "plain")
    assert resolve_prompt_style(None, tmp_path / "plain").name == "alpaca"  # no template: alpaca, as before
    assert resolve_prompt_style("chatml", tmp_path / "plain").name == "chatml"
    with pytest.raises(UserError, match="has no chat template"):
        resolve_prompt_style("chat_template", tmp_path / "plain")
    with pytest.raises(UserError, match="has no chat template, so it cannot render a conversation"):
        PromptStyle.from_name("alpaca").render([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="resolve_prompt_style"):
        PromptStyle.from_name("chat_template")
    directory = make_chat_checkpoint(tmp_path / "llama3", "llama3")
    assert resolve_prompt_style(None, directory / "tokenizer.json").name == "chat_template"  # a file in it works too
    assert resolve_prompt_style("alpaca", directory).name == "alpaca"  # a named style wins
    with_template(directory, "{% for m in messages %}{{ m.content }")
    with pytest.raises(UserError, match="not valid Jinja"):
        resolve_prompt_style(None, directory).render([{"role": "user", "content": "x"}])


def test_generation_stops_on_every_eos_id_of_generation_config(tmp_path):
    """Llama 3 Instruct lists <|end_of_text|> and <|eot_id|>; transformers' generate stops on either."""
    make_llama3_like(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
    reference = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.stop_ids == set(reference.eos_token_id) == {tokenizer.token_id("<|end_of_text|>"),
                                                                 tokenizer.token_id("<|eot_id|>")}
