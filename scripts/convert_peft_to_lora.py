r"""Import a Hugging Face PEFT LoRA adapter trained elsewhere as our LoRA weights, for a base we converted.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/SmolLM2-135M-Instruct \
        --output_dir checkpoints/smollm2-135m-instruct
    python scripts/convert_peft_to_lora.py --adapter_dir downloads/my-peft-adapter \
        --checkpoint_path checkpoints/smollm2-135m-instruct/lit-llama.pth --output_dir out/lora/imported \
        --prompt_style chatml

The output directory holds lit-llama-lora-finetuned.pth and finetune_config.json, exactly what finetune/lora.py
writes, so generate/lora.py, scripts/merge_lora.py, scripts/convert_to_gguf.py and scripts/evaluate_tasks.py take it.
The inverse is scripts/convert_lora_to_peft.py. PEFT options our LoRA does not compute the same way (DoRA, rsLoRA,
per-layer ranks or layer subsets, biases, extra trained modules) are refused rather than approximated.
"""
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.checkpoint import CHECKPOINT_NAME, checkpoint_dir, load_config, weights_path
from lit_llama.files import check_outputs, load_torch, save_all
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import hf_to_lit_name
from lit_llama.errors import UserError
from lit_llama.finetuned import FINETUNE_CONFIG_NAME, apply_method, base_fingerprint, check_fits, finetune_config
from lit_llama.lora import LORA, LORA_TARGETS, LoRAArgs
from lit_llama.model import LLaMA, Config
from lit_llama.prompts import PromptStyle
from lit_llama.tokenizer import Tokenizer

WEIGHTS_NAME = LORA.weights_name
PREFIX = "base_model.model."
# PEFT module name -> our --lora target; "mlp" is the three MLP projections together
PEFT_MODULES = {suffix.rsplit(".", 1)[-1]: target for target, suffixes in LORA_TARGETS.items() for suffix in suffixes}

# adapter_config.json settings whose non-default values change what the adapter computes, and that value
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "use_rslora": "rsLoRA scaling (use_rslora)",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "layers_to_transform": "a layer subset (layers_to_transform)",
    "layers_pattern": "a layer pattern (layers_pattern)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "use_qalora": "QA-LoRA (use_qalora)",
}


def read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"no adapter_config.json in {adapter_dir}: expected a PEFT adapter directory")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path} is not valid JSON: {error}") from None
    safetensors, pickle = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if safetensors.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(safetensors))
        except SafetensorError as error:
            raise UserError(f"{safetensors} is not a readable safetensors file: {error}") from None
    elif pickle.is_file():  # older PEFT versions
        tensors = load_torch(pickle, mmap=False)
    else:
        raise UserError(f"no adapter_model.safetensors (or adapter_model.bin) in {adapter_dir}")
    return adapter_config, tensors


def check_options(adapter_config: dict, adapter_dir: Path) -> None:
    if not isinstance(adapter_config, dict):
        raise UserError(f"{adapter_dir}/adapter_config.json holds a JSON {type(adapter_config).__name__}, not an object")
    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise UserError(f"{adapter_dir} is a {peft_type} adapter; only LoRA adapters convert")
    check_fields(adapter_config, adapter_dir)
    refused = [what for key, what in UNSUPPORTED.items() if adapter_config.get(key) not in (None, False, {}, [])]
    if adapter_config.get("bias", "none") != "none":
        refused.append(f"bias={adapter_config['bias']!r}")
    modules = adapter_config.get("target_modules")  # a list of names, or one regular expression
    if isinstance(modules, list):
        refused += [f"target module {m!r}" for m in modules if m not in PEFT_MODULES]
    if refused:
        raise UserError(f"{adapter_dir} uses PEFT options our LoRA does not support: {', '.join(refused)}")


def check_fields(adapter_config: dict, adapter_dir: Path) -> None:
    """adapter_config.json field by field: the values the conversion uses, of the types and ranges PEFT writes."""
    where = f"{adapter_dir}/adapter_config.json"
    r, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha", 8)
    dropout, modules = adapter_config.get("lora_dropout", 0.0), adapter_config.get("target_modules")
    base = adapter_config.get("base_model_name_or_path")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{where}: r must be a whole number of at least 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise UserError(f"{where}: lora_alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if modules is not None and not isinstance(modules, str) and not (
            isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise UserError(f"{where}: target_modules must be a list of module names or one pattern, got {modules!r}")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{where}: base_model_name_or_path must be a string, got {base!r}")


def check_recorded_base(adapter_config: dict, adapter_dir: Path, base_path: Path, fingerprint: str) -> None:
    """PEFT names the base an adapter was trained on (base_model_name_or_path). Where that is a directory here (our
    own export names the lit-llama checkpoint; a Hugging Face download its folder), its weights' fingerprint must be
    the given base's: a same-shape base with other weights would load without an error and answer wrongly."""
    named = adapter_config.get("base_model_name_or_path")
    directory = Path(named) if named else None
    if directory is None or not directory.is_dir():
        if named:
            print(f"note: {adapter_dir} was trained on {named!r}, which is not a directory here, so {base_path} could "
                  "not be compared with it", file=sys.stderr)
        return
    recorded = fingerprint_of(directory)
    if recorded and recorded != fingerprint:
        print(f"warning: {adapter_dir} was trained on {directory}, whose weights are not those of {base_path} "
              f"(fingerprint {recorded} vs {fingerprint}); the converted adapter would answer wrongly on this base",
              file=sys.stderr)


def fingerprint_of(directory: Path) -> str:
    """base_fingerprint of a lit-llama or Hugging Face checkpoint directory, reading only the rows it samples."""
    if (directory / CHECKPOINT_NAME).is_file():
        return base_fingerprint(load_torch(directory / CHECKPOINT_NAME))
    from safetensors import SafetensorError, safe_open

    try:
        files = {name: path for path in sorted(directory.glob("*.safetensors"))
                 for name in safe_open(str(path), framework="pt").keys()}
        layers = [int(name.split(".")[2]) for name in files if name.startswith("model.layers.")]
        sampled = {}
        for hf_name, rows in (("model.embed_tokens.weight", 4), ("model.norm.weight", None),
                              (f"model.layers.{max(layers, default=0)}.mlp.down_proj.weight", 4)):
            if hf_name in files:
                with safe_open(str(files[hf_name]), framework="pt") as file:
                    part = file.get_slice(hf_name)
                    sampled[hf_to_lit_name(hf_name)] = part[:rows] if rows else part[:]
    except (SafetensorError, OSError, ValueError):
        return ""
    return base_fingerprint(sampled) if sampled else ""


def check_saved_base_weights(tensors: dict, adapter_dir: Path, base_path: Path) -> dict:
    """PEFT saves the whole lm_head/embedding beside a LoRA on them (save_embedding_layers). A copy of the base's
    own weights is dropped; a different one is a trained module our LoRA checkpoint cannot hold."""
    copies = {
        name: tensor for name, tensor in tensors.items()
        if name.endswith(".base_layer.weight") or name.removeprefix(PREFIX) in ("model.embed_tokens.weight", "lm_head.weight")
    }
    if copies:
        base = load_torch(base_path)
        for name, tensor in copies.items():
            ours = base.get(hf_to_lit_name(name.removeprefix(PREFIX).replace(".base_layer", "")))
            if ours is None and name.removeprefix(PREFIX).startswith("lm_head"):  # a tied head is the embedding
                ours = base.get("transformer.wte.weight")
            if ours is None or not torch.equal(tensor.to(ours.dtype), ours[: tensor.size(0)]):
                raise UserError(f"{adapter_dir} stores its own {name} (trained, or of another base), which a LoRA "
                                "checkpoint cannot hold")
    return {name: tensor for name, tensor in tensors.items() if name not in copies}


def lit_lora_weights(tensors: dict, adapter_dir: Path, config: Config) -> tuple[dict, list]:
    """Our names for PEFT's tensors, and the --lora targets they cover."""
    weights, modules, unknown = {}, set(), []
    for name, tensor in tensors.items():
        parts = name.removeprefix(PREFIX).rsplit(".", 2)  # module, "lora_A", "weight"
        if not name.startswith(PREFIX) or parts[1:] not in (["lora_A", "weight"], ["lora_B", "weight"]):
            unknown.append(name)
            continue
        module, kind = parts[0], parts[1]
        short = module.rsplit(".", 1)[-1]
        if short not in PEFT_MODULES:
            unknown.append(name)
            continue
        modules.add(short)
        if not tensor.is_floating_point():
            raise UserError(f"{adapter_dir}: {name} holds {str(tensor.dtype).removeprefix('torch.')} values, not "
                            "LoRA weights")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{adapter_dir}: {name} holds NaN or infinite values")
        if short == "lm_head" and kind == "lora_B":  # our head has padding rows past the vocabulary
            if tensor.size(0) != config.vocab_size:
                raise UserError(f"{adapter_dir} was trained on a base with {tensor.size(0)} tokens, the base given "
                                f"has {config.vocab_size}")
            tensor = torch.cat((tensor, tensor.new_zeros(config.padded_vocab_size - tensor.size(0), tensor.size(1))))
        try:
            weights[f"{hf_to_lit_name(module)}.{kind}"] = tensor
        except UserError:
            unknown.append(name)
    if unknown:
        raise UserError(f"{adapter_dir} adapts modules our LoRA does not have: {', '.join(sorted(unknown)[:3])}")
    targets = sorted({PEFT_MODULES[m] for m in modules})
    partial = sorted(s.rsplit(".", 1)[-1] for s in LORA_TARGETS["mlp"] if s.rsplit(".", 1)[-1] not in modules)
    if "mlp" in targets and partial:
        raise UserError(f"{adapter_dir} adapts part of the MLP only (not {', '.join(partial)}); our 'mlp' target "
                        "adapts gate_proj, up_proj and down_proj together")
    return weights, targets


def main(
    adapter_dir: Path,
    checkpoint_path: Path,
    output_dir: OutputPath = OutputPath("out/lora/imported"),
    prompt_style: str = "alpaca",
    overwrite: bool = False,
) -> None:
    """Write lit-llama-lora-finetuned.pth and finetune_config.json from a PEFT LoRA adapter directory.

    Args:
        adapter_dir: The PEFT adapter: adapter_config.json and adapter_model.safetensors.
        checkpoint_path: Our conversion of the adapter's base model (scripts/convert_hf_checkpoint.py).
        output_dir: Where the LoRA weights and finetune_config.json are written.
        prompt_style: The prompt template the adapter was trained with (recorded for generation and evaluation).
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    PromptStyle.from_name(prompt_style)
    outputs = [Path(output_dir) / name for name in (WEIGHTS_NAME, FINETUNE_CONFIG_NAME)]
    check_outputs("--output_dir", outputs, [adapter_dir, checkpoint_dir(checkpoint_path)], overwrite)
    adapter_config, tensors = read_adapter(Path(adapter_dir))
    check_options(adapter_config, adapter_dir)
    base_path = weights_path(checkpoint_path)
    if not base_path.is_file():
        raise UserError(f"base checkpoint not found: {base_path}")
    config = load_config(base_path)
    tensors = check_saved_base_weights(tensors, adapter_dir, base_path)
    weights, targets = lit_lora_weights(tensors, adapter_dir, config)
    if not weights:
        raise UserError(f"{adapter_dir} holds no LoRA weights")
    r = adapter_config["r"]
    if any(w.size(0 if k.endswith("lora_A") else 1) != r for k, w in weights.items()):
        raise UserError(f"{adapter_dir}: a tensor's rank differs from adapter_config.json's r={r}")
    if "head" in targets and config.tie_embeddings:
        raise UserError(f"{adapter_dir} adapts lm_head, but {base_path}'s head is its tied embedding matrix")
    tokenizer = Tokenizer(checkpoint_dir(base_path))
    options = LoRAArgs(
        r=r, alpha=adapter_config.get("lora_alpha", 8), dropout=float(adapter_config.get("lora_dropout", 0.0)),
        targets=targets,
    )
    record = finetune_config(LORA, options, config, prompt_style, tokenizer.identity, base_path)
    with torch.device("meta"):
        check_fits(apply_method(LLaMA(config), record), weights, adapter_dir, base_path)
    fingerprint = base_fingerprint(load_torch(base_path))
    check_recorded_base(adapter_config, Path(adapter_dir), base_path, fingerprint)
    record["base_fingerprint"] = fingerprint  # so that applying it to another base warns, as a trained LoRA does

    output_dir = Path(output_dir)
    save_all([(output_dir / WEIGHTS_NAME, weights), (output_dir / FINETUNE_CONFIG_NAME, record)])
    print(f"wrote {output_dir / WEIGHTS_NAME} (LoRA r={r} on {', '.join(targets)}) and {FINETUNE_CONFIG_NAME}")


if __name__ == "__main__":
    run_cli(main)
