"""What every checkpoint conversion shares: the Hugging Face <-> lit-llama weight names and configs, the RoPE
layout change for Meta/GGUF weights, vocabulary padding, and writing a checkpoint directory."""
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from lit_llama.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, check_shapes
from lit_llama.files import atomic_path, check_outputs, save_all
from lit_llama.errors import UserError
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import TOKENIZER_FILES

# Module paths in both layouts; `{i}` is the layer index. Anything after the path (".weight", ".lora_A", ...) is kept.
NAME_PAIRS = (
    ("model.embed_tokens", "transformer.wte"),
    ("model.layers.{i}.input_layernorm", "transformer.h.{i}.norm_1"),
    ("model.layers.{i}.self_attn", "transformer.h.{i}.attn"),
    ("model.layers.{i}.post_attention_layernorm", "transformer.h.{i}.norm_2"),
    ("model.layers.{i}.mlp", "transformer.h.{i}.mlp"),
    ("model.norm", "transformer.ln_f"),
    ("lm_head", "lm_head"),
)


def _rename(name: str, source_index: int) -> str:
    for pair in NAME_PAIRS:
        source, target = pair[source_index], pair[1 - source_index]
        pattern = re.escape(source).replace(r"\{i\}", r"(\d+)") + r"(?=\.|$)"
        match = re.match(pattern, name)
        if match:
            if match.groups():
                target = target.replace("{i}", match.group(1))
            return target + name[match.end() :]
    raise UserError(f"unexpected tensor name {name!r}: not part of a Llama model")


def hf_to_lit_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `transformer.h.3.attn.q_proj.weight`."""
    return _rename(name, 0)


def lit_to_hf_name(name: str) -> str:
    """`transformer.h.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    return _rename(name, 1)


# What transformers' class for each model_type builds beyond Llama's attention (its defaults where config.json is
# silent): q/k/v biases, q/k norms, head_dim when config.json leaves it out
FAMILIES = {
    "llama": dict(architecture="LlamaForCausalLM", attention_bias=False, qk_norm=False, head_dim=None),
    "mistral": dict(architecture="MistralForCausalLM", attention_bias=False, qk_norm=False, head_dim=None),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, qk_norm=False, head_dim=None),
    "qwen3": dict(architecture="Qwen3ForCausalLM", attention_bias=False, qk_norm=True, head_dim=128),
}


def sliding_window_from_hf(hf_config: dict, model_type: str, n_layer: int) -> Optional[int]:
    """The window every layer attends within, or None. Mistral windows every layer (4096 where config.json names
    none); Qwen only with use_sliding_window, in layers from max_window_layers on, which we take only if that is
    all of them or none."""
    if model_type == "mistral":
        return hf_config.get("sliding_window", 4096)
    if model_type == "llama" or not hf_config.get("use_sliding_window"):
        return None
    window = hf_config.get("sliding_window")
    layer_types = hf_config.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf_config.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layer)
    ]
    if len(set(layer_types)) > 1:
        raise UserError(
            "config.json mixes sliding-window and full-attention layers (use_sliding_window with max_window_layers "
            f"{hf_config.get('max_window_layers')} of {n_layer}); only one kind for every layer is supported"
        )
    return window if layer_types[0] == "sliding_attention" else None


def config_from_hf(hf_config: dict, name: str = "") -> Config:
    """Our Config from a Hugging Face `config.json` of a Llama, Mistral, Qwen2/2.5 or Qwen3 model (transformers
    4.x or 5.x spelling of RoPE settings)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in FAMILIES:
        raise UserError(f"config.json describes a {model_type!r} model; only {', '.join(FAMILIES)} models convert")
    family = FAMILIES[model_type]
    if (model_type in ("llama", "qwen3") and hf_config.get("attention_bias")) or hf_config.get("mlp_bias"):
        raise UserError(
            f"config.json asks for bias terms in the attention output or MLP (attention_bias/mlp_bias of a "
            f"{model_type} model), which this model does not have (only q/k/v biases, as Qwen2's)"
        )
    n_embd, n_head = hf_config["hidden_size"], hf_config["num_attention_heads"]
    # 5.x: rope_parameters {rope_type, rope_theta, ...}; 4.x: rope_theta and rope_scaling beside each other
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_base = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        rope_scaling = dict(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
            original_max_seq_len=rope["original_max_position_embeddings"],
        )
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise UserError(f"config.json uses RoPE scaling {rope_type!r}; only 'default' and 'llama3' are supported")
    return Config(
        name=name,
        block_size=hf_config.get("max_position_embeddings", 2048),
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["num_hidden_layers"],
        n_head=n_head,
        n_query_groups=hf_config.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=hf_config["intermediate_size"],
        rope_base=float(rope_base),
        rope_scaling=rope_scaling,
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        head_size=hf_config.get("head_dim") or family["head_dim"] or n_embd // n_head,
        attention_bias=family["attention_bias"],
        qk_norm=family["qk_norm"],
        sliding_window=sliding_window_from_hf(hf_config, model_type, hf_config["num_hidden_layers"]),
    )


def hf_model_type(config: Config) -> str:
    """The transformers class that computes what `config` does: Qwen3 for q/k norms, Qwen2 for q/k/v biases,
    Mistral for a sliding window (Qwen's classes take one too), else Llama."""
    if config.qk_norm and config.attention_bias:
        raise UserError("no transformers model has q/k/v biases and q/k norms together: this model does not export")
    if config.qk_norm:
        return "qwen3"
    if config.attention_bias:
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"


def config_to_hf(config: Config) -> dict:
    """A `config.json` for the transformers class `hf_model_type` names, loadable by transformers 4.x and 5.x."""
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_base}
    rope_scaling = None
    if config.rope_scaling:
        s = config.rope_scaling
        rope_scaling = {
            "rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"], "original_max_position_embeddings": s["original_max_seq_len"],
        }
        rope_parameters = {**rope_scaling, "rope_theta": config.rope_base}
    model_type = hf_model_type(config)
    hf_config = {
        "architectures": [FAMILIES[model_type]["architecture"]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": rope_parameters,  # transformers 5.x
        "rope_theta": config.rope_base,  # transformers 4.x
        "rope_scaling": rope_scaling,  # transformers 4.x
    }
    if model_type == "mistral":
        hf_config["sliding_window"] = config.sliding_window
    elif model_type.startswith("qwen"):  # Qwen windows the layers from max_window_layers on: all of them, or none
        windowed = config.sliding_window is not None
        hf_config.update(
            use_sliding_window=windowed, sliding_window=config.sliding_window,
            max_window_layers=0 if windowed else config.n_layer,
            layer_types=["sliding_attention" if windowed else "full_attention"] * config.n_layer,
        )
    return hf_config


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved RoPE pairs (0,1),(2,3).. to rotate-half (0,d/2),(1,d/2+1)..

    Meta's checkpoints and GGUF files store q/k this way; within each head, even rows go first, then odd rows.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_rotate_half`: the q/k row order GGUF files (llama.cpp) and Meta expect."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"--dtype {name!r} is not a floating point torch dtype (try bfloat16, float16, float32)")
    return dtype


def pad_vocab(weight: torch.Tensor, config: Config) -> torch.Tensor:
    """Zero rows up to `padded_vocab_size`, which keeps the embedding/head matmuls on friendly sizes."""
    missing = config.padded_vocab_size - weight.size(0)
    if missing <= 0:
        return weight
    return torch.cat((weight, weight.new_zeros(missing, weight.size(1))))


def check_checkpoint_outputs(output_dir: Union[str, Path], inputs: list, overwrite: bool) -> None:
    """Before converting: the checkpoint files `output_dir` would receive may be replaced only with --overwrite, and
    never when they are the conversion's own inputs."""
    names = (CHECKPOINT_NAME, CONFIG_NAME, *TOKENIZER_FILES)
    check_outputs("--output_dir", [Path(output_dir) / name for name in names], inputs, overwrite)


def write_checkpoint(state_dict: dict, config: Config, output_dir: Union[str, Path], source: str) -> Path:
    """Pad the vocabulary, drop a tied head, check every shape against `config`, then save weights and config."""
    state_dict = dict(state_dict)  # the caller's dict stays as it was
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state_dict:
            state_dict[key] = pad_vocab(state_dict[key], config)
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device("meta"):
        check_shapes(LLaMA(config), state_dict, source)
    output_dir = Path(output_dir)
    # weights and config together or not at all: a new lit-llama.pth beside an old config would not load
    save_all([(output_dir / CHECKPOINT_NAME, state_dict), (output_dir / CONFIG_NAME, config.to_dict())])
    return output_dir / CHECKPOINT_NAME


def copy_tokenizer_files(source_dir: Union[str, Path], output_dir: Union[str, Path]) -> list[str]:
    """Copy whichever tokenizer files `source_dir` has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(source_dir) / name
        if source.is_file():
            with atomic_path(Path(output_dir) / name) as tmp:
                shutil.copyfile(source, tmp)
            copied.append(name)
    return copied
