"""Prompt templates: how an (instruction, input) pair becomes the text the model continues with its response.

Data preparation, finetuning and generation all use the same `PromptStyle`, so the model sees at inference exactly
the prompt it was trained on. Add your own style with
`register(PromptStyle("mine", with_input=..., without_input=...))`.
"""
from dataclasses import dataclass

from lit_llama.errors import UserError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    with_input: str  # str.format template with {instruction} and {input}
    without_input: str  # used when the record's input is empty; has {instruction} only

    def apply(self, instruction: str, input: str = "") -> str:
        """The full prompt, ending exactly where the response starts."""
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)

    @classmethod
    def from_name(cls, name: str) -> "PromptStyle":
        if name not in prompt_styles:
            raise UserError(f"unknown prompt style {name!r}: choose one of {', '.join(sorted(prompt_styles))}")
        return prompt_styles[name]


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

# the chat format of SmolLM2-Instruct (and other ChatML models); the response ends with <|im_end|>, their EOS token
register(
    PromptStyle(
        "chatml",
        with_input="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        without_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    )
)
