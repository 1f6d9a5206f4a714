"""Serving the base model and many LoRA adapters at once over an OpenAI-compatible HTTP API (scripts/serve.py).

multi_lora.py: the batched LoRA layer (each row of a batch with its own adapter, through the shared base weights);
engine.py: the KV cache slots and the continuous-batching decode loop (one thread); app.py: the FastAPI routes.
"""
import sys
from pathlib import Path
from typing import Optional

from lit_llama.checkpoint import load, weights_path
from lit_llama.errors import UserError
from lit_llama.generation import resolve_context_length
from lit_llama.prompts import resolve_prompt_style
from lit_llama.serving.app import ServedModel, create_app
from lit_llama.serving.engine import Engine
from lit_llama.serving.multi_lora import add_adapters


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`name=path` pairs (--lora) as a dict, names unique."""
    adapters = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name or not path:
            raise UserError(f"--lora takes name=path (the path of a finetune/lora.py output), got {spec!r}")
        if name in adapters:
            raise UserError(f"--lora name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def build_app(
    checkpoint_path: Path,
    adapters: dict[str, Path],
    base_name: Optional[str] = None,
    prompt_style: Optional[str] = None,
    max_batch_size: int = 8,
    context_length: Optional[int] = None,
    default_max_tokens: int = 256,
    device=None,
    dtype=None,
    max_request_bytes: int = 1 << 20,
):
    """The app serving the base checkpoint as `base_name` (default: its directory's name) and each adapter under
    its name; returns (app, engine)."""
    if max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if max_request_bytes < 1:
        raise UserError(f"--max_request_bytes must be at least 1, got {max_request_bytes}")
    model, tokenizer = load(checkpoint_path, device or "cpu", dtype)
    context_length = resolve_context_length(context_length, model.config.block_size)
    base_name = base_name or weights_path(checkpoint_path).parent.name
    if base_name in adapters:
        raise UserError(f"--lora name {base_name!r} is the base model's name: choose another")
    routing, records = add_adapters(model, weights_path(checkpoint_path), tokenizer, adapters)
    directory = tokenizer.path.parent
    base_style = resolve_prompt_style(prompt_style, directory)
    models = {base_name: ServedModel(base_name, 0, base_style)}
    for index, (name, record) in enumerate(records.items(), start=1):
        models[name] = ServedModel(name, index, resolve_prompt_style(record["prompt_style"], directory))
    for name, served in models.items():
        kind = "chat template" if served.style.chat_template else f"no chat template ({served.style.name}): completions"
        print(f"serving {name!r} ({'base' if served.adapter == 0 else 'LoRA'}; {kind})", file=sys.stderr)
    engine = Engine(model, tokenizer, routing, max_batch_size, context_length)
    return create_app(engine, tokenizer, models, default_max_tokens, max_request_bytes), engine
