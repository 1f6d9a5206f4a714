"""Serve a base model and any number of its LoRA finetunes over an OpenAI-compatible HTTP API.

    python scripts/serve.py --checkpoint_path checkpoints/smollm2-135m-instruct \
        --lora support=out/lora/support/lit-llama-lora-finetuned.pth --lora sql=out/lora/sql/lit-llama-lora-finetuned.pth

Then point any OpenAI client at http://127.0.0.1:8000/v1: the request's `model` picks the adapter (its --lora name)
or the base (the checkpoint directory's name; GET /v1/models lists them). Requests for different adapters decode in
one batch through the shared base weights. See howto/chat_and_serve.md.
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lit_llama.errors import UserError
from lit_llama.cli import run_cli
from lit_llama.generation import setup_runtime
from lit_llama.serving import build_app, parse_adapters


@dataclass
class ServeArgs:
    """Serve a model and its LoRA adapters (OpenAI-compatible API).

    Args:
        checkpoint_path: The base checkpoint (`lit-llama.pth` or its directory).
        lora: An adapter as name=path (a finetune/lora.py output, finetune_config.json beside it); repeat the flag
            for more.
        base_name: The model name of the base (default: the checkpoint directory's name).
        prompt_style: How the base renders chat messages (default: the checkpoint's chat template).
        host: The address to listen on (127.0.0.1: this machine only).
        port: The port to listen on.
        max_batch_size: The most requests decoded together; more wait in a queue.
        context_length: Tokens per request, prompt and reply (the KV cache of each slot; default: the model's
            block_size, at most 2048).
        max_tokens: Reply length for a request that gives no max_tokens (bounded by the context).
        max_request_bytes: The largest request body accepted (larger ones get 413 before they are read).
        precision: bf16-true, 32-true, ... (default: bf16-true: bf16 weights, whose products of many rows run in fp32 on a CPU
            without native bf16; 32-true on a GPU without bf16).
    """

    checkpoint_path: Path = Path("checkpoints/smollm2-135m-instruct")
    lora: list[str] = field(default_factory=list)
    base_name: Optional[str] = None
    prompt_style: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    context_length: Optional[int] = None
    max_tokens: int = 256
    max_request_bytes: int = 1 << 20
    precision: Optional[str] = None


def main(settings: ServeArgs) -> None:
    import uvicorn

    if not 0 <= settings.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {settings.port}")
    for name in ("max_batch_size", "context_length", "max_tokens", "max_request_bytes"):
        value = getattr(settings, name)
        if value is not None and value < (2 if name == "context_length" else 1):
            raise UserError(f"--{name} must be at least {2 if name == 'context_length' else 1}, got {value}")
    runtime = setup_runtime(settings.precision)
    app, _ = build_app(
        settings.checkpoint_path, parse_adapters(settings.lora), settings.base_name, settings.prompt_style,
        settings.max_batch_size, settings.context_length, settings.max_tokens, runtime.device, runtime.dtype,
        settings.max_request_bytes,
    )
    runtime.announce()
    print(f"listening on http://{settings.host}:{settings.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


def repeatable_lora_flags(argv: list[str]) -> list[str]:
    """`--lora a=p --lora b=q` as jsonargparse's list-append syntax (`--lora+ a=p --lora+ b=q`)."""
    return [arg.replace("--lora", "--lora+", 1) if arg == "--lora" or arg.startswith("--lora=") else arg
            for arg in argv]


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.argv = repeatable_lora_flags(sys.argv)
    run_cli(main)
