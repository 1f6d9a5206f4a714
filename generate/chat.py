"""Chat with a base, merged or finetuned model in the terminal.

    python generate/chat.py --checkpoint_path checkpoints/smollm2-135m-instruct/lit-llama.pth
    python generate/chat.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth

The conversation is rendered with the checkpoint's chat template (a finetune: the prompt style it was trained with),
replies stream as they are generated and the KV cache is kept between turns. Commands: /reset, /system <text>,
/exit; Ctrl-C stops a reply. Replies go to stdout, prompts and notices to stderr. Every option: -h.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_llama.chat import ChatSession, ReplySettings, chat_loop
from lit_llama.checkpoint import load
from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.finetuned import load_finetuned
from lit_llama.generation import SamplingArgs, setup_runtime
from lit_llama.prompts import resolve_prompt_style


@dataclass
class ChatArgs:
    """Chat with a model.

    Args:
        checkpoint_path: The base or merged checkpoint (`lit-llama.pth` or its directory); with --finetuned_path,
            the base to put the finetuned weights on (default: the one recorded at finetuning time).
        finetuned_path: Weights a finetune/*.py script saved (finetune_config.json beside them), any method.
        prompt_style: How to render the conversation (default: a finetune's recorded style, else the checkpoint's
            chat template). A style without a chat template (alpaca) answers each message on its own.
        system: A system message to start with.
        max_new_tokens: The most tokens of one reply.
        temperature: 0 is greedy.
        top_k: Sample among the k most likely tokens (null: no limit).
        top_p: Sample among the most likely tokens holding this much probability.
        context_length: KV cache size in tokens, at most the model's block_size (default: block_size, at most 2048);
            older turns are dropped beyond.
        seed: Random seed.
        precision: bf16-true, 32-true, ... (default: bf16-true: bf16 weights, whose products of many rows run in fp32 on a CPU
            without native bf16; 32-true on a GPU without bf16).
    """

    checkpoint_path: Optional[Path] = None
    finetuned_path: Optional[Path] = None
    prompt_style: Optional[str] = None
    system: Optional[str] = None
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0
    context_length: Optional[int] = None
    seed: int = 1234
    precision: Optional[str] = None


def main(settings: ChatArgs) -> None:
    if settings.checkpoint_path is None and settings.finetuned_path is None:
        raise UserError("give --checkpoint_path (a base or merged model) or --finetuned_path (a finetune)")
    # the same checks as every generate script's, before the model loads
    SamplingArgs(max_new_tokens=settings.max_new_tokens, top_k=settings.top_k, top_p=settings.top_p,
                 temperature=settings.temperature)
    if settings.context_length is not None and settings.context_length < 2:
        raise UserError(f"--context_length must be at least 2 (a prompt and a reply), got {settings.context_length}")
    runtime = setup_runtime(settings.precision, settings.seed)
    style_name = settings.prompt_style
    if settings.finetuned_path is not None:
        model, tokenizer, record = load_finetuned(
            settings.finetuned_path, settings.checkpoint_path, runtime.device, runtime.dtype
        )
        style_name = style_name or record["prompt_style"]
    else:
        model, tokenizer = load(settings.checkpoint_path, runtime.device, runtime.dtype)
    runtime.announce()
    style = resolve_prompt_style(style_name, tokenizer.path.parent)
    multi_turn = style.chat_template is not None
    if not multi_turn:
        print(f"prompt style {style.name!r} has no chat template, and a multi-turn chat needs one: each message is "
              "answered on its own, as a single prompt", file=sys.stderr)
    replies = ReplySettings(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
    session = ChatSession(model, tokenizer, style, replies, settings.context_length, multi_turn)
    if settings.system:
        session.set_system(settings.system)
    with runtime.autocast():
        chat_loop(session)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
