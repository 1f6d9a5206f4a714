r"""Export a checkpoint or a finetune as one GGUF file for llama.cpp, Ollama or LM Studio.

    python scripts/convert_to_gguf.py --finetuned_path out/lora/alpaca/lit-llama-lora-finetuned.pth \
        --output_path out/lora/alpaca/model-q8_0.gguf --outtype q8_0
    python scripts/convert_to_gguf.py --checkpoint_path checkpoints/smollm2-135m-instruct/lit-llama.pth \
        --output_path out/smollm2-f16.gguf

LoRA weights are merged into the base while loading (each merge computed in fp32 and rounded once to the stored
dtype, as scripts/merge_lora.py does); full finetunes are written as they are. Adapter finetunes add attention that
llama.cpp does not have and are refused. For k-quants (q4_k_m, ...) write f16 and run llama.cpp's `llama-quantize`.
"""
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.checkpoint import checkpoint_dir, load
from lit_llama.cli import OutputPath, run_cli
from lit_llama.errors import UserError
from lit_llama.files import check_outputs
from lit_llama.finetuned import load_finetuned, read_finetune_config
from lit_llama.gguf_export import check_outtype, write_gguf


def main(
    checkpoint_path: Optional[Path] = None,
    finetuned_path: Optional[Path] = None,
    output_path: Optional[OutputPath] = None,
    outtype: str = "f16",
    name: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Write a GGUF file: llama metadata, tokenizer, chat template and the weights.

    Args:
        checkpoint_path: A base or merged lit-llama.pth; with --finetuned_path, the base it was trained on
            (default: the one recorded in finetune_config.json).
        finetuned_path: LoRA or full finetuning weights (with finetune_config.json beside them).
        output_path: The .gguf file to write (default: out/gguf/<the weights' folder>-<outtype>.gguf).
        outtype: How matrices are stored: f32, f16, bf16, q8_0, q4_0 or q4_1 (norms always f32).
        name: The model name the file carries (general.name; default: the model config's name).
        overwrite: Replace an existing --output_path (never one of the command's inputs).
    """
    check_outtype(outtype)
    source = finetuned_path or checkpoint_path
    if source is None:
        raise UserError("pass --checkpoint_path (a base or merged model) or --finetuned_path (a finetune)")
    # beside the user's weights only when asked: a default there would fill checkpoint folders with large files
    output_path = output_path or Path("out/gguf") / f"{Path(source).resolve().parent.name}-{outtype}.gguf"
    if finetuned_path is not None:
        record = read_finetune_config(finetuned_path)
        inputs = [Path(finetuned_path).parent, checkpoint_path or record.get("base_checkpoint")]
    else:
        inputs = [checkpoint_path]
    check_outputs("--output_path", [output_path], [checkpoint_dir(p) for p in inputs if p is not None], overwrite)
    if finetuned_path is not None:
        method = record["method"]
        if method not in ("lora", "full"):
            raise UserError(f"{finetuned_path} holds {method} weights: their extra attention has no GGUF form "
                            "(LoRA and full finetunes export)")
        model, tokenizer, _ = load_finetuned(finetuned_path, checkpoint_path)
    else:
        model, tokenizer = load(checkpoint_path)
    counts = write_gguf(model, tokenizer, output_path, outtype, name or "")
    types = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"wrote {output_path} ({types} tensors)")


if __name__ == "__main__":
    run_cli(main)
