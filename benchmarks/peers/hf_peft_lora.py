"""LoRA training throughput of Hugging Face transformers + PEFT, the way their docs train: LlamaForCausalLM in bf16 (fp32 with `--precision 32-true`),
`peft.get_peft_model` with a LoraConfig on q_proj/v_proj, and the plain loop Trainer runs (forward, loss, backward,
AdamW step). With `--quantize nf4`, QLoRA as their docs set it up: the model loaded through bitsandbytes in NF4
(`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, compute in bf16; every linear layer but the
head), without `prepare_model_for_kbit_training`'s activation checkpointing, which lit-llama does not use here either.
Run with the peers' venv; benchmarks/lora_training.py calls it.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import IGNORE_INDEX, measure, runner_arguments  # noqa: E402


def main() -> None:
    args = runner_arguments(__doc__)
    quantization = None
    if args.quantize:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.uint8,
        )
    model = LlamaForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if args.precision == "bf16-true" else torch.float32,
        attn_implementation="sdpa", quantization_config=quantization,
        device_map="cpu",
    )
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # PEFT's default keeps the adapters in fp32, as lit-llama does
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    def train_step(batch: dict) -> float:
        logits = model(input_ids=batch["inputs"], use_cache=False).logits
        # what transformers' causal-LM loss does: upcast logits, mean over non-ignored targets
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measure("hf+peft", train_step, args, trainable_parameters=trainable)


if __name__ == "__main__":
    main()
