"""Prompt templates: how an (instruction, input) pair, or a whole conversation, becomes the text the model continues
with its response.

Data preparation, finetuning and generation all use the same `PromptStyle`, so the model sees at inference exactly
the prompt it was trained on. Two kinds:
- format styles ("alpaca", "chatml"): `str.format` templates for one instruction; register your own with
  `register(PromptStyle("mine", with_input=..., without_input=...))`;
- chat templates: the Jinja `chat_template` an Instruct checkpoint ships in tokenizer_config.json (or
  chat_template.jinja), rendered as transformers' `apply_chat_template` renders it. `resolve_prompt_style(None, dir)`
  picks the checkpoint's own template when it has one.
"""
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from lit_llama.errors import UserError
from lit_llama.files import read_json_object

CHAT_TEMPLATE = "chat_template"  # the style name meaning "the checkpoint's own chat template"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    with_input: str = ""  # str.format template with {instruction} and {input}
    without_input: str = ""  # used when the record's input is empty; has {instruction} only
    chat_template: Optional[str] = None  # Jinja, in the form transformers' apply_chat_template takes
    # the special-token strings the template may use (bos_token, eos_token, ...), as (name, text) pairs
    special_tokens: tuple = field(default=(), repr=False)

    @property
    def renders_special_tokens(self) -> bool:
        """A checkpoint's chat template writes BOS itself where the model wants one (transformers then tokenizes with
        add_special_tokens=False); a format style leaves BOS to the tokenizer's convention."""
        return not self.with_input and self.chat_template is not None

    def apply(self, instruction: str, input: str = "") -> str:
        """The full prompt, ending exactly where the response starts."""
        if self.with_input or self.without_input:
            if input:
                return self.with_input.format(instruction=instruction, input=input)
            return self.without_input.format(instruction=instruction)
        return self.render([{"role": "user", "content": join_instruction(instruction, input)}], True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """A conversation ([{"role": "system"|"user"|"assistant", "content": str}, ...]) as text; with
        `add_generation_prompt`, followed by what opens the assistant's next turn. Equals transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`."""
        if self.chat_template is None:
            raise UserError(
                f"prompt style {self.name!r} has no chat template, so it cannot render a conversation: use the "
                f"checkpoint's own (--prompt_style {CHAT_TEMPLATE}) or chatml"
            )
        from jinja2.exceptions import TemplateError

        try:
            return compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **dict(self.special_tokens),
            )
        except TemplateError as error:
            raise UserError(f"the {self.name} chat template refused the conversation: {error}") from None

    def prompt_ids(self, tokenizer, instruction: str, input: str = ""):
        """Token ids of the prompt for one instruction, as generation and evaluation feed them to the model."""
        return self.encode_prompt(tokenizer, self.apply(instruction, input))

    def conversation_ids(self, tokenizer, messages: list[dict]):
        """Token ids of a conversation so far followed by the assistant's turn opening: the model answers next."""
        return self.encode_prompt(tokenizer, self.render(messages, add_generation_prompt=True))

    def encode_prompt(self, tokenizer, text: str):
        """Never a second BOS: a chat template writes its own; never an EOS after a prompt."""
        return tokenizer.encode(text, bos=False if self.renders_special_tokens else None, eos=False)

    @classmethod
    def from_name(cls, name: str) -> "PromptStyle":
        if name == CHAT_TEMPLATE:
            raise UserError(
                f"prompt style {CHAT_TEMPLATE!r} is the checkpoint's own: resolve it with "
                "lit_llama.prompts.resolve_prompt_style(name, checkpoint_dir)"
            )
        if name not in prompt_styles:
            choices = ", ".join(sorted([*prompt_styles, CHAT_TEMPLATE]))
            raise UserError(f"unknown prompt style {name!r}: choose one of {choices}")
        return prompt_styles[name]


def join_instruction(instruction: str, input: str) -> str:
    """One user message from an instruction record (as the chatml style joins them)."""
    return f"{instruction}\n{input}" if input else instruction


def resolve_prompt_style(name: Optional[str], checkpoint_dir: Union[str, Path, None]) -> PromptStyle:
    """The style `name` names; with no name (or "chat_template"), the checkpoint's own chat template when it has one,
    else alpaca. `checkpoint_dir` is the directory holding the tokenizer files (a file in it works too)."""
    if name is not None and name != CHAT_TEMPLATE:
        return PromptStyle.from_name(name)
    style = checkpoint_chat_style(checkpoint_dir) if checkpoint_dir is not None else None
    if style is not None:
        return style
    if name == CHAT_TEMPLATE:
        raise UserError(
            f"{checkpoint_dir} has no chat template (no chat_template.jinja, no chat_template in "
            "tokenizer_config.json): choose a prompt style such as alpaca or chatml"
        )
    return prompt_styles["alpaca"]


def checkpoint_chat_style(checkpoint_dir: Union[str, Path]) -> Optional[PromptStyle]:
    """The chat template style of a checkpoint, or None. As in transformers, chat_template.jinja wins over the
    tokenizer_config.json entry; of a list of named templates, "default" is taken."""
    directory = Path(checkpoint_dir)
    directory = directory if directory.is_dir() else directory.parent
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        config = read_json_object(config_path)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str) or not template.strip():
        return None
    special = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            special.append((key, token))
    return PromptStyle(CHAT_TEMPLATE, chat_template=template, special_tokens=tuple(special))


@lru_cache(maxsize=8)
def compile_template(template: str):
    """A chat template compiled as transformers compiles it: sandboxed (a template comes with a download and must
    not reach Python), trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that
    leaves non-ASCII text and HTML characters as they are."""
    import jinja2.ext
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except TemplateSyntaxError as error:
        raise UserError(f"the chat template is not valid Jinja (line {error.lineno}): {error.message}") from None


prompt_styles: dict[str, PromptStyle] = {}


def register(style: PromptStyle) -> PromptStyle:
    prompt_styles[style.name] = style
    return style


# the template Stanford Alpaca was trained with
register(
    PromptStyle(
        "alpaca",
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    )
)

# the chat format of SmolLM2-Instruct (and other ChatML models) without their default system turn; the response ends
# with <|im_end|>, their EOS token. Its chat template renders conversations in the same format (no default system).
register(
    PromptStyle(
        "chatml",
        with_input="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        without_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        chat_template=(
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
    )
)
