"""A compact LLaMA: config, RMSNorm, RoPE, grouped-query attention with a preallocated KV cache, SwiGLU MLP. The
plain reference model: generation's CPU fast path for one-token steps lives in lit_llama/fast_decode.py.

Weight names follow Hugging Face's Llama layout (q_proj, k_proj, ...) so conversions are plain renames,
and queries/keys use the "rotate half" RoPE convention that Hugging Face checkpoints are stored in.
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_llama.configs import configs
from lit_llama.loss import cross_entropy_sum


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: Optional[int] = None
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: Optional[int] = None  # None: multi-head attention (one KV head per query head)
    n_embd: int = 4096
    intermediate_size: int = 11008
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low_freq_factor, high_freq_factor, original_max_seq_len
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_size: Optional[int] = None  # None: n_embd // n_head; Qwen3 and Mistral-Nemo set their own
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2), none on o_proj
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # each query sees only this many keys, its own included (Mistral)

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        self.check_values()
        if self.padded_vocab_size is None:
            self.padded_vocab_size = math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"config {self.name!r}: padded_vocab_size ({self.padded_vocab_size}) is below vocab_size")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"config {self.name!r}: n_embd ({self.n_embd}) must divide by n_head ({self.n_head})")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"config {self.name!r}: n_head ({self.n_head}) must divide by n_query_groups ({self.n_query_groups})"
            )

    def check_values(self) -> None:
        """One line naming the first bad value: a config file is user input, and a zero or fractional size would
        otherwise fail deep inside model construction."""
        sizes = ["block_size", "vocab_size", "padding_multiple", "n_layer", "n_head", "n_query_groups", "n_embd",
                 "intermediate_size"]
        sizes += [name for name in ("padded_vocab_size", "head_size", "sliding_window") if getattr(self, name) is not None]
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"config {self.name!r}: {name} must be a whole number of at least 1, got {value!r}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"config {self.name!r}: {name} must be a positive finite number, got {value!r}")
        for name in ("tie_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {self.name!r}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")
            scaling = self.rope_scaling
            if (not isinstance(scaling, dict) or sorted(scaling) != sorted(keys)
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
                               for v in scaling.values())
                    or scaling["high_freq_factor"] <= scaling["low_freq_factor"]):
                raise ValueError(
                    f"config {self.name!r}: rope_scaling must be null or positive {', '.join(keys)} "
                    f"(high_freq_factor > low_freq_factor), got {scaling!r}"
                )

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in configs:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(configs)}")
        return cls(name=name, **{**configs[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        if not isinstance(values, dict):
            raise ValueError(f"a model config is a JSON object, not a {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32 as the reference implementations do (bf16 loses too much here), scale in x's dtype;
    # written out, as Hugging Face does: on a CPU torch's F.rms_norm runs the same steps with more dispatches
    x_fp32 = x.float()
    normalized = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cache(config: Config, length: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_size), in fp32. The first half of sin is negated: see apply_rope."""
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if config.rope_scaling:
        inv_freq = llama3_scaled_frequencies(inv_freq, **config.rope_scaling)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-angles, angles), dim=-1).sin()


def llama3_scaled_frequencies(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_seq_len: int
) -> torch.Tensor:
    """Llama 3.1's long-context rule: keep high frequencies, divide low ones by `factor`, blend in between."""
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original_max_seq_len / low_freq_factor
    high_freq_wavelength = original_max_seq_len / high_freq_factor
    smooth = (original_max_seq_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    in_between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_between, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, hs) with cos and sin (T, 1, hs), or (heads, hs) with (hs,)."""
    # the rotate-half convention: x * cos + cat(-x2, x1) * sin, where cat(x2, x1) is one roll and the sign sits in
    # the table (the same numbers, with fewer ops per layer)
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for positions [0, max_seq_length), allocated once and filled in place."""

    def __init__(self, batch_size: int, n_query_groups: int, max_seq_length: int, head_size: int, device, dtype):
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = input_pos + k.size(2)
        self.k[: k.size(0), :, input_pos:end] = k
        self.v[: v.size(0), :, input_pos:end] = v
        return self.k[: k.size(0), :, :end], self.v[: v.size(0), :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        hs, bias = config.head_size, config.attention_bias
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=bias)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hs, eps=config.norm_eps)
            self.k_norm = RMSNorm(hs, eps=config.norm_eps)
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[int] = None
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x, cos, sin)
        y = self.attend(q, k, v, input_pos)
        return self.o_proj(y)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, C) -> q (B, n_head, T, hs), k and v (B, n_query_groups, T, hs), with RoPE applied."""
        B, T, _ = x.shape
        hs = self.config.head_size
        q, k, v = (layer(x).view(B, T, -1, hs) for layer in (self.q_proj, self.k_proj, self.v_proj))
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[int]) -> torch.Tensor:
        """Causal attention over this call's keys plus, when generating, the cached ones. Returns (B, T, C)."""
        B, _, T, _ = q.shape
        gqa = self.config.n_query_groups != self.config.n_head
        window = self.config.sliding_window
        if input_pos is None or self.kv_cache is None:
            mask = None if window is None or T <= window else causal_mask(T, T, 0, window, q.device)
            # torch's fused CPU attention is 2-3x slower in bf16 than in fp32 (BENCHMARKS.md): upcast around it
            upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
            qkv = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
            y = F.scaled_dot_product_attention(*qkv, mask, is_causal=mask is None, enable_gqa=gqa).to(q.dtype)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            if T == 1 and (window is None or k.size(2) <= window):  # one new token sees every cached position
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:
                mask = causal_mask(T, k.size(2), input_pos, window, q.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, T, -1)


def causal_mask(queries: int, keys: int, start: int, window: Optional[int], device) -> torch.Tensor:
    """(queries, keys) bool: query i, at position start + i, sees the keys at positions start + i - window < j <=
    start + i (every earlier one without a window), as transformers' sliding-window mask does."""
    position = torch.arange(start, start + queries, device=device).unsqueeze(1)
    key = torch.arange(keys, device=device)
    return (key <= position) if window is None else (key <= position) & (key > position - window)


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[int] = None):
        x = x + self.attn(self.norm_1(x), cos, sin, input_pos)
        return x + self.mlp(self.norm_2(x))


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        # nn.Embedding's N(0, 1) init, skipped on the meta device: there normal_ imports torch's compiler (seconds)
        vocab, width = config.padded_vocab_size, config.n_embd
        wte = nn.Embedding(vocab, width, _weight=torch.empty(vocab, width))
        if not wte.weight.is_meta:
            nn.init.normal_(wte.weight)
        self.transformer = nn.ModuleDict(
            dict(
                wte=wte,
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        # tied models read the output projection from the embedding table: one tensor, one state-dict key
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # RoPE tables are derived data, not weights: kept out of the state dict and rebuilt per device
        self.rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.max_seq_length = config.block_size
        # recompute each block's activations in backward instead of storing them (training memory for time)
        self.activation_checkpointing = False

    def forward(
        self, idx: torch.Tensor, input_pos: Optional[int] = None, logits_at: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. input_pos: position of idx[:, 0] when generating with the KV cache.

        Returns logits of shape (B, T, padded_vocab_size); the first `vocab_size` columns are real tokens.
        `logits_at`, a bool (B, T) mask, computes the output head only where it is True and returns those
        positions' logits as (N, padded_vocab_size) rows in row-major order (training's label positions, the
        prefill's last position): the head is the largest matrix of a small model.
        `targets`, the (N,) next tokens of the `logits_at` positions, returns instead their summed cross-entropy,
        computed without keeping the (N, vocabulary) logits for backward (lit_llama/loss.py).
        """
        T = idx.size(1)
        start = input_pos or 0
        limit = self.max_seq_length
        if start + T > limit:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model's context of {limit} "
                f"(block_size {self.config.block_size}, KV cache {self.max_seq_length})"
            )
        x = self.transformer.wte(idx)
        # cast once here rather than in every layer (a no-op in fp32); (T, 1, hs) to broadcast over the heads
        cos, sin = (table[start : start + T].to(x.dtype).unsqueeze(1) for table in self.rope_tables(idx.device))
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:
                x = checkpoint(block, x, cos, sin, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos)
        x = self.transformer.ln_f(x)
        if logits_at is not None:
            x = x[logits_at]
        if targets is not None:
            return cross_entropy_sum(x, targets, self.config.vocab_size, self.head_weight(), self.head)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the output head is the embedding table
            return F.linear(x, self.transformer.wte.weight)
        return self.lm_head(x)

    def head_weight(self) -> Optional[torch.Tensor]:
        """The head's matrix where the head is nothing but it (not a LoRA or adapter-v2 head)."""
        if self.lm_head is None:
            return self.transformer.wte.weight
        plain = type(self.lm_head) is nn.Linear and self.lm_head.bias is None
        return self.lm_head.weight if plain else None

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope is None or self.rope[0].device != device or self.rope[0].size(0) < self.max_seq_length:
            self.rope = rope_cache(self.config, self.max_seq_length, device)
        return self.rope

    def setup_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        """Preallocate the KV cache for generation of up to `max_seq_length` tokens (prompt included)."""
        if max_seq_length > self.config.block_size:
            raise ValueError(
                f"prompt plus new tokens ({max_seq_length}) exceed the model's block_size ({self.config.block_size})"
            )
        reference = self.transformer.wte.weight
        device = device or reference.device
        dtype = dtype or reference.dtype
        self.max_seq_length = max_seq_length
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size, device, dtype
            )

    def clear_kv_cache(self) -> None:
        self.max_seq_length = self.config.block_size
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def reset_parameters(self) -> None:
        """Random init (0.02 normal, zero-free) for models built on the meta device and then materialised."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:  # q/k/v biases (attention_bias)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
