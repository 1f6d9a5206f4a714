"""Convert a lit-llama checkpoint back to Hugging Face format: `config.json` + `model.safetensors` + tokenizer files,
loadable with `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` (a Llama, Mistral, Qwen2 or Qwen3 class,
whichever computes what the model does: lit_llama.convert.hf_model_type)."""
from pathlib import Path

import torch

from lit_llama.checkpoint import check_shapes, checkpoint_dir, load_config, weights_path
from lit_llama.files import check_outputs, load_torch, read_json_object, save_all
from lit_llama.cli import OutputPath, run_cli
from lit_llama.convert import config_to_hf, copy_tokenizer_files, lit_to_hf_name
from lit_llama.errors import UserError
from lit_llama.model import LLaMA
from lit_llama.tokenizer import TOKENIZER_FILES


def main(checkpoint_path: Path, output_dir: OutputPath, overwrite: bool = False) -> None:
    """Write a Hugging Face model directory from a lit-llama checkpoint.

    Args:
        checkpoint_path: The lit-llama.pth to convert (model_config.json and the tokenizer files are read beside it).
        output_dir: Where config.json, model.safetensors and the tokenizer files are written.
        overwrite: Replace files an earlier run wrote there (never the command's own inputs).
    """
    path = weights_path(checkpoint_path)
    outputs = [Path(output_dir) / name for name in ("model.safetensors", "config.json", *TOKENIZER_FILES)]
    check_outputs("--output_dir", outputs, [checkpoint_dir(checkpoint_path)], overwrite)
    state_dict = load_torch(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} is not a lit-llama state dict (expected a dict of tensors)")
    config = load_config(path, state_dict)
    with torch.device("meta"):
        check_shapes(LLaMA(config), state_dict, path)

    hf_state_dict = {}
    for name, tensor in state_dict.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # drop our padding rows
        hf_state_dict[lit_to_hf_name(name)] = tensor.contiguous()
    dtype = state_dict["transformer.wte.weight"].dtype

    hf_config = config_to_hf(config)
    hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    source_dir = checkpoint_dir(checkpoint_path)
    generation_file = source_dir / "generation_config.json"
    if generation_file.is_file():  # the token ids the model was trained with, not LlamaConfig's defaults
        generation = read_json_object(generation_file)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in generation:
                hf_config[key] = generation[key]

    output_dir = Path(output_dir)
    save_all([(output_dir / "model.safetensors", hf_state_dict), (output_dir / "config.json", hf_config)])
    copied = copy_tokenizer_files(source_dir, output_dir)
    print(f"wrote {output_dir / 'model.safetensors'}, config.json and {', '.join(copied) or 'no tokenizer files'}")


if __name__ == "__main__":
    run_cli(main)
