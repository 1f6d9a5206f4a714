r"""Does llama.cpp run our GGUF export as we run the checkpoint? Greedy token ids, prompt by prompt.

    pip install torch==2.13.0 llama-cpp-python        # compiles llama.cpp (minutes)
    python scripts/convert_to_gguf.py --checkpoint_path out/merged/lit-llama.pth --outtype f32 \
        --output_path out/merged/model-f32.gguf
    python benchmarks/llama_cpp_check.py --checkpoint_path out/merged/lit-llama.pth \
        --gguf_paths '[out/merged/model-f32.gguf, out/merged/model-q8_0.gguf]'

For each prompt, both sides encode it (the token ids must agree: llama.cpp rebuilds the tokenizer from the GGUF's
vocabulary), then decode greedily: ours with lit_llama.generation.generate at temperature 0 in fp32, llama.cpp by
taking the argmax of its logits (f32 KV cache). A GGUF holding the checkpoint's exact weights (f32; bf16 of a bf16
checkpoint) should give identical ids; quantized ones report how far they agree.
"""
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_llama.chat import common_prefix_length
from lit_llama.checkpoint import load
from lit_llama.cli import run_cli
from lit_llama.errors import UserError
from lit_llama.generation import generate

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    CHAT.format("What is the capital of France?"),
    CHAT.format("Sort these words alphabetically: pear, apple, fig"),
    CHAT.format("Write a haiku about the sea."),
    CHAT.format("What is 17 + 25?"),
    "The three primary colors are",
    "def fibonacci(n):",
]
GGML_TYPE_F32 = 0


def llama_cpp_greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
    return new


def load_llama_cpp(path: Path, threads: int):
    """llama.cpp with an f32 KV cache (its default, f16, would round what ours keeps in fp32), all logits kept."""
    import llama_cpp

    return llama_cpp.Llama(
        str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False,
    )


def main(
    checkpoint_path: Path,
    gguf_paths: list[Path],
    max_new_tokens: int = 40,
    threads: int = 2,
    prompts: Optional[list[str]] = None,
    output_json: Optional[Path] = None,
) -> None:
    """Compare greedy generations of llama.cpp on GGUF exports with ours on the checkpoint they came from.

    Args:
        checkpoint_path: The lit-llama.pth the GGUF files were exported from (base or merged).
        gguf_paths: The exported .gguf files.
        max_new_tokens: Tokens generated per prompt (fewer if EOS comes first).
        threads: CPU threads for both.
        prompts: Texts to continue (default: four ChatML questions and two plain continuations).
        output_json: Also write the results here.
    """
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama_cpp is not installed: pip install torch==2.13.0 llama-cpp-python") from None
    for path in gguf_paths:
        if not Path(path).is_file():
            raise UserError(f"GGUF file not found: {path}")
    torch.set_num_threads(threads)
    prompts = prompts or PROMPTS
    model, tokenizer = load(checkpoint_path, dtype=torch.float32)
    stop_ids = set(tokenizer.stop_ids)
    references = []
    start = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        with torch.inference_mode():
            new = list(generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stop_ids))
        references.append((ids.tolist(), new))
    print(f"lit-llama: {len(prompts)} prompts in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    results = []
    for path in gguf_paths:
        llm = load_llama_cpp(path, threads)
        rows = []
        for prompt, (prompt_ids, ours) in zip(prompts, references):
            tokenized = llm.tokenize(prompt.encode("utf-8"), add_bos=bool(tokenizer.add_bos), special=True)
            theirs = llama_cpp_greedy(llm, prompt_ids, max_new_tokens, stop_ids)
            rows.append({
                "prompt": prompt, "same_prompt_ids": tokenized == prompt_ids, "identical": ours == theirs,
                "common_prefix": common_prefix_length(ours, theirs), "ours": ours, "theirs": theirs,
                "ours_text": tokenizer.decode(ours), "theirs_text": tokenizer.decode(theirs),
            })
        del llm
        identical = sum(r["identical"] for r in rows)
        tokens = sum(len(r["ours"]) for r in rows)
        prefix = sum(r["common_prefix"] for r in rows)
        tokenized = sum(r["same_prompt_ids"] for r in rows)
        print(f"{Path(path).name}: prompt ids equal {tokenized}/{len(rows)}, generations identical {identical}/"
              f"{len(rows)}, common prefix {prefix}/{tokens} tokens")
        for r in rows:
            if not r["identical"]:
                print(f"  differs after {r['common_prefix']} tokens: ours {r['ours_text']!r} | "
                      f"llama.cpp {r['theirs_text']!r}")
        results.append({"gguf": str(path), "llama_cpp_python": llama_cpp.__version__, "prompts": rows})
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)
