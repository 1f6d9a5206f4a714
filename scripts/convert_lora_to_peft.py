r"""Export LoRA weights as a Hugging Face PEFT adapter, for the base model exported by convert_lit_checkpoint.py.

    python scripts/convert_lit_checkpoint.py --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth \
        --output_dir checkpoints/hf/7B
    python scripts/convert_lora_to_peft.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth \
        --checkpoint_path checkpoints/lit-llama/7B/lit-llama.pth --output_dir out/lora/alpaca/peft \
        --base_model_name_or_path checkpoints/hf/7B

The output directory (adapter_config.json + adapter_model.safetensors) loads with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("checkpoints/hf/7B"), "out/lora/alpaca/peft")`
and in servers that take PEFT LoRA adapters, such as vLLM.
"""
from pathlib import Path
from typing import Optional

import torch

from lit_llama.checkpoint import check_state_dict
from lit_llama.files import check_outputs, load_torch, save_all
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import lit_to_hf_name
from lit_llama.errors import UserError
from lit_llama.finetuned import apply_method, check_fits, finetune_base, read_finetune_config
from lit_llama.model import LLaMA


def main(
    finetuned_path: Path = Path("out/lora/alpaca/lit-llama-lora-finetuned.pth"),
    checkpoint_path: Optional[Path] = None,
    output_dir: OutputPath = OutputPath("out/lora/alpaca/peft"),
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors in Hugging Face PEFT's LoRA format.

    Args:
        finetuned_path: The LoRA weights saved by finetune/lora.py (finetune_config.json beside them).
        checkpoint_path: The base lit-llama.pth, to check the LoRA weights against (default: the one recorded in
            finetune_config.json).
        output_dir: Where the PEFT adapter is written.
        base_model_name_or_path: What adapter_config.json names as the base: the Hugging Face export of the base
            (a directory or a Hub id). Default: the base checkpoint's directory.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    record = read_finetune_config(finetuned_path)
    if record["method"] != "lora":
        raise UserError(f"{finetuned_path} holds {record['method']} weights; only LoRA exports to PEFT")
    base_path, config = finetune_base(finetuned_path, record, checkpoint_path)
    outputs = [Path(output_dir) / name for name in ("adapter_model.safetensors", "adapter_config.json")]
    check_outputs("--output_dir", outputs, [Path(finetuned_path).parent, base_path.parent], overwrite)
    lora_weights = load_torch(finetuned_path)
    check_state_dict(lora_weights, finetuned_path)
    with torch.device("meta"):
        check_fits(apply_method(LLaMA(config), record), lora_weights, finetuned_path, base_path)

    tensors = {}
    for name, tensor in lora_weights.items():
        module, kind = name.rsplit(".", 1)  # "transformer.h.0.attn.q_proj", "lora_A"
        if module == "lm_head" and kind == "lora_B":
            tensor = tensor[: config.vocab_size]  # the exported head has no padding rows
        tensors[f"base_model.model.{lit_to_hf_name(module)}.{kind}.weight"] = tensor.contiguous()
    settings = record["lora"]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or str(base_path.parent),
        "r": settings["r"],
        "lora_alpha": settings["alpha"],  # PEFT scales by lora_alpha / r, as we do
        "lora_dropout": settings["dropout"],
        "target_modules": sorted({name.rsplit(".", 2)[-2] for name in lora_weights}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    output_dir = Path(output_dir)
    save_all([(output_dir / "adapter_model.safetensors", tensors),
              (output_dir / "adapter_config.json", adapter_config)])
    print(f"wrote {output_dir / 'adapter_config.json'} and adapter_model.safetensors ({len(tensors)} tensors)")


if __name__ == "__main__":
    run_cli(main)
