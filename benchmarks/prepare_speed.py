"""How long `scripts/prepare_json.py` takes on 52,000 Alpaca-sized records, end to end (process start to files written),
with a byte-level BPE tokenizer.json and a SentencePiece tokenizer.model. Prints the median of `--runs` runs,
in wall-clock seconds and in CPU seconds (user + system over all threads; less sensitive to other load on the machine).

    python benchmarks/prepare_speed.py --bpe_tokenizer checkpoints/smollm2-135m-instruct/tokenizer.json

Tokenizers not given are trained on the synthetic text first (vocabulary `--vocab_size`).
"""
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from lit_llama.cli import run_cli
from lit_llama.precision import cpu_summary

REPO = Path(__file__).resolve().parent.parent
SYLLABLES = "ka lo mi ne ru sa te vi do fa gu ha ji ko lu ma no pe qui ri so tu ve wa xi yo ze an el in on un".split()


def synthetic_records(num_records: int, seed: int) -> list[dict]:
    """Alpaca-like lengths: instruction ~15 words, input ~10 words for half the records, output ~60 words."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(5000)]
    weights = [1 / rank for rank in range(1, len(vocabulary) + 1)]  # Zipf-like, as in natural text

    def sentence(mean: int) -> str:
        words = rng.choices(vocabulary, weights, k=max(1, int(rng.gauss(mean, mean / 4))))
        return " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])

    return [
        {"instruction": sentence(15), "input": sentence(10) if rng.random() < 0.5 else "", "output": sentence(60)}
        for _ in range(num_records)
    ]


def train_tokenizers(records: list[dict], work_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    import sentencepiece
    from tokenizers import ByteLevelBPETokenizer

    text = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in records[:20000]]
    sp_dir, bpe_dir = work_dir / "sentencepiece", work_dir / "bpe"
    sp_dir.mkdir(parents=True, exist_ok=True)
    bpe_dir.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(sp_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, minloglevel=2,
    )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"])
    bpe.save(str(bpe_dir / "tokenizer.json"))
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return sp_dir / "tokenizer.model", bpe_dir / "tokenizer.json"


def time_prepare(data_file: Path, tokenizer: Path, destination: Path, runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds (user + system, all threads) of each run."""
    command = [
        sys.executable, str(REPO / "scripts" / "prepare_json.py"), "--data_file", str(data_file),
        "--tokenizer_path", str(tokenizer), "--destination_path", str(destination), "--test_split_size", "2000",
        "--max_seq_length", "256", "--prompt_style", "alpaca",
    ]
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), children_cpu_seconds()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall.append(time.perf_counter() - start)
        cpu.append(children_cpu_seconds() - start_cpu)
    return wall, cpu


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(
    work_dir: Path = Path("out/bench-prepare"),
    bpe_tokenizer: Optional[Path] = None,
    sentencepiece_tokenizer: Optional[Path] = None,
    num_records: int = 52000,
    runs: int = 3,
    vocab_size: int = 8000,
    seed: int = 0,
) -> None:
    """Time scripts/prepare_json.py on synthetic Alpaca-sized records with both kinds of tokenizer.

    Args:
        work_dir: Where the synthetic data, trained tokenizers and prepared outputs go.
        bpe_tokenizer: A byte-level BPE tokenizer.json (e.g. SmolLM2's); trained on the data when not given.
        sentencepiece_tokenizer: A SentencePiece tokenizer.model (e.g. LLaMA's); trained on the data when not given.
        num_records: Number of synthetic records.
        runs: Timed runs per tokenizer; the median is reported.
        vocab_size: Vocabulary of the tokenizers trained here.
        seed: Seed of the synthetic records.
    """
    records = synthetic_records(num_records, seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_file = work_dir / "records.json"
    data_file.write_text(json.dumps(records), encoding="utf-8")
    if bpe_tokenizer is None or sentencepiece_tokenizer is None:
        trained_sp, trained_bpe = train_tokenizers(records, work_dir, vocab_size)
        bpe_tokenizer = bpe_tokenizer or trained_bpe
        sentencepiece_tokenizer = sentencepiece_tokenizer or trained_sp

    print(f"| tokenizer | records | median wall s | median CPU s | wall s of each run |\n|---|---|---|---|---|")
    for name, tokenizer in (("byte-level BPE", bpe_tokenizer), ("SentencePiece", sentencepiece_tokenizer)):
        wall, cpu = time_prepare(data_file, tokenizer, work_dir / "prepared", runs)
        each = ", ".join(f"{s:.1f}" for s in wall)
        median_wall, median_cpu = statistics.median(wall), statistics.median(cpu)
        print(f"| {name} ({tokenizer.name}) | {num_records} | {median_wall:.1f} | {median_cpu:.1f} | {each} |")
    print(f"{cpu_summary()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (other work slows the wall clock)")


if __name__ == "__main__":
    run_cli(main)
