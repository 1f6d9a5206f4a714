"""lit-llama: a compact, hackable toolkit to run and finetune LLaMA-family models."""
from lit_llama.checkpoint import load
from lit_llama.generation import generate
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer

__all__ = ["LLaMA", "Config", "Tokenizer", "generate", "load"]
