"""Prepare a chat dataset: conversations in OpenAI `messages` or ShareGPT `conversations` form, rendered through the
checkpoint's own chat template, with the loss on every assistant turn."""
from dataclasses import dataclass, field
from pathlib import Path

from lit_llama.chat_data import load_conversations, prepare_conversations
from lit_llama.cli import OutputPath, run_cli
from lit_llama.data import PrepareArgs, check_destination, load_tokenizer
from lit_llama.prompts import resolve_prompt_style


@dataclass
class PrepareChat(PrepareArgs):
    """Split and tokenize a .json or .jsonl file of conversations into train.pt, test.pt, test.json and meta.json.

    Args:
        data_file: A JSON list of records or one record per line, each {"messages": [{"role", "content"}, ...]}
            (roles system, user, assistant) or {"conversations": [{"from", "value"}, ...]} (system, human, gpt).
        checkpoint_dir: Checkpoint whose tokenizer and chat template to use.
        tokenizer_path: A tokenizer.model or tokenizer.json to use instead of the checkpoint's (its directory's
            tokenizer_config.json supplies the chat template).
        prompt_style: "chat_template" (the checkpoint's own, the default when it has one) or "chatml".
        test_split_size: Number of conversations held out for evaluation.
        max_seq_length: Longer conversations keep their leading whole turns that fit; one whose first assistant
            turn does not fit is cut inside that reply (keeping its end-of-turn token), or dropped if nothing of it
            fits.
        mask_inputs: Compute the loss on the assistant turns only (everything else labelled -100).
        skip_long: Drop conversations longer than max_seq_length instead of truncating them.
    """

    data_file: Path = field(kw_only=True)
    destination_path: OutputPath = OutputPath("data/chat")
    max_seq_length: int = 1024


def main(settings: PrepareChat) -> None:
    check_destination(settings, settings.data_file)
    tokenizer = load_tokenizer(settings.checkpoint_dir, settings.tokenizer_path)
    style = resolve_prompt_style(settings.prompt_style or "chat_template", tokenizer.path.parent)
    conversations = load_conversations(settings.data_file)
    prepare_conversations(
        conversations, settings.destination_path, tokenizer, style, source=str(settings.data_file),
        test_split_size=settings.test_split_size, max_seq_length=settings.max_seq_length, seed=settings.seed,
        mask_inputs=settings.mask_inputs, skip_long=settings.skip_long,
    )


if __name__ == "__main__":
    run_cli(main)
