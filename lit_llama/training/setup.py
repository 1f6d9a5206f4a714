"""Getting a run ready: one process per device (FSDP2 across several), the prepared data, and the base model with
the method's layers added and only the method's weights trainable."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lit_llama.checkpoint import check_vocabulary, checkpoint_dir, load_config, load_weights, weights_path
from lit_llama.data import check_prepared_tokenizer, load_prepared
from lit_llama.errors import UserError
from lit_llama.files import load_torch, read_json
from lit_llama.finetuned import base_fingerprint, finetune_config
from lit_llama.method import Method
from lit_llama.model import LLaMA
from lit_llama.precision import autocast_dtype, weights_dtype
from lit_llama.prompts import PromptStyle, resolve_prompt_style
from lit_llama.quantize import quantize_frozen, unshardable_parameters
from lit_llama.training.args import TrainArgs
from lit_llama.tokenizer import Tokenizer
from lit_llama.training.metrics import make_loggers


SAMPLE_INSTRUCTION = "Recommend a movie for me to watch during the weekend and explain the reason."


@dataclass
class PreparedData:
    """A prepared dataset directory's samples and meta.json, with the tokenizer they were made with and the prompt
    style they were rendered in."""

    train: list[dict]
    val: list[dict]
    meta: dict
    tokenizer: Tokenizer
    style: PromptStyle
    sample_prompt: str = SAMPLE_INSTRUCTION  # what each evaluation answers, to show how training goes
    sample_ids: Optional[torch.Tensor] = None  # its token ids (None: `sample_prompt` as an instruction)


def shard_blocks(model: LLaMA, device_mesh) -> LLaMA:
    """FSDP2: each transformer block is one unit that is gathered for its forward and backward, then freed; the
    root (embedding, final norm, head) stays gathered between forward and backward since it is used twice."""
    mesh = device_mesh["data_parallel"]
    whole = unshardable_parameters(model)  # int8 base weights: each device keeps a whole frozen copy
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, ignored_params=whole or None)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=whole or None)
    return model


def setup_fabric(devices: int, num_nodes: int, precision: str, out_dir: Path, logger: str = "csv") -> Fabric:
    """Launch one process per device. `precision` is resolved: for `-true` precisions we cast the weights
    ourselves (so trainable weights can stay fp32), for `-mixed` ones Fabric runs the forward under autocast.
    Metrics go to logs/metrics.csv and, for `logger` tensorboard or wandb, there too."""
    loggers = make_loggers(logger, out_dir)
    if devices < 1 or num_nodes < 1:
        raise UserError(f"--devices ({devices}) and --num_nodes ({num_nodes}) must be at least 1")
    world_size = devices * num_nodes
    strategy = "auto"
    if world_size > 1:
        strategy = ModelParallelStrategy(shard_blocks, data_parallel_size=world_size, tensor_parallel_size=1)
    fabric = Fabric(
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision if autocast_dtype(precision) else "32-true",
        loggers=loggers,
    )
    fabric.launch()
    return fabric


def load_data(data_dir: Path, checkpoint_path: Path) -> PreparedData:
    train, val, meta = load_prepared(data_dir)
    directory = checkpoint_dir(weights_path(checkpoint_path))
    tokenizer = Tokenizer(directory)
    check_prepared_tokenizer(meta, tokenizer, data_dir)
    if not val:
        raise UserError(f"{data_dir} has no test samples to measure validation loss on: prepare it with a test split")
    style = resolve_prompt_style(meta.get("prompt_style"), directory)
    return PreparedData(train, val, meta, tokenizer, style, *held_out_prompt(data_dir, tokenizer, style))


def held_out_prompt(data_dir: Path, tokenizer: Tokenizer, style: PromptStyle) -> tuple[str, Optional[torch.Tensor]]:
    """The first held-out record's prompt (test.json), as text and token ids: a sample answer to the task being
    taught says more than one to a fixed instruction. A dataset without a readable one gets the fixed one."""
    try:
        records = read_json(Path(data_dir) / "test.json")
        record = records[0] if isinstance(records, list) and records else {}
    except (UserError, OSError):
        record = {}
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list) and style.chat_template is not None:
        # up to its first reply: a long conversation in full would not leave room to answer
        first = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), 0)
        if first > 0 and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages[:first]):
            return messages[first - 1]["content"], style.conversation_ids(tokenizer, messages[:first])
    if isinstance(record, dict) and isinstance(record.get("instruction"), str):
        extra = record.get("input") if isinstance(record.get("input"), str) else ""
        shown = f"{record['instruction']}\n{extra}" if extra else record["instruction"]
        return shown, style.prompt_ids(tokenizer, record["instruction"], extra)
    return SAMPLE_INSTRUCTION, None


def load_model(
    fabric: Fabric, checkpoint_path: Path, method: Method, options, precision: str, data: PreparedData,
    train: TrainArgs, quantize: Optional[str] = None,
) -> tuple[torch.nn.Module, dict]:
    """The base model with the method's layers added, only the method's weights trainable, set up on the device(s).

    Frozen weights are held in the precision's dtype (bf16 by default), or quantized (`quantize`, layer by layer as
    each moves to the device); trainable weights of LoRA and the adapters stay fp32 so small updates are not rounded
    away. Also returns the finetune_config record.
    """
    path = weights_path(checkpoint_path)
    state_dict = load_torch(path)
    config = load_config(path, state_dict)
    check_context(data, config.block_size)
    check_vocabulary(data.tokenizer, config, path)
    check_token_ids(data, config.padded_vocab_size)
    record = finetune_config(method, options, config, data.meta["prompt_style"], data.tokenizer.identity, path)
    record["quantize"] = quantize
    record["base_fingerprint"] = base_fingerprint(state_dict)
    dtype = weights_dtype(precision)
    torch.manual_seed(train.seed)  # the same initial LoRA/adapter weights on every rank
    with torch.device("meta"):
        model = LLaMA(config)
    load_weights(model, state_dict, path, dtype)
    method.apply(model, options)  # the new tensors are created and initialised beside the loaded weights
    method.mark_trainable(model)
    if not method.trains_base_weights and dtype in (torch.bfloat16, torch.float16):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if quantize:
        quantize_frozen(model, quantize, device=fabric.device, shards=fabric.world_size)
    model.activation_checkpointing = train.activation_checkpointing
    return fabric.setup_module(model), record


def check_context(data: PreparedData, block_size: int) -> None:
    """A sample longer than the model's context would fail at its first forward, perhaps hours in: refuse now."""
    longest = max((len(sample["input_ids"]) for sample in data.train + data.val), default=0)
    if longest > block_size:
        raise UserError(
            f"the prepared data holds a sample of {longest} tokens but the model's context is {block_size}: "
            f"prepare it again with --max_seq_length {block_size} or less"
        )


def check_token_ids(data: PreparedData, vocab_size: int) -> None:
    """A token id past the embedding would fail at its batch's forward (on a GPU: a device-side assert), perhaps
    hours in: refuse now."""
    largest = max((int(sample["input_ids"].max()) for sample in data.train + data.val if len(sample["input_ids"])),
                  default=0)
    if largest >= vocab_size:
        raise UserError(
            f"the prepared data holds token id {largest} but the model has {vocab_size} embedding rows: "
            "prepare it again with this model's tokenizer"
        )
