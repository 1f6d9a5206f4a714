"""The named model configs: `Config.from_name("Llama-3.1-8B")` takes its sizes from here. Each entry is the keyword
arguments of lit_llama.model.Config for a published model (or a tiny one for tests)."""

llama3_rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
llama3_2 = dict(block_size=131072, vocab_size=128256, n_query_groups=8, intermediate_size=8192, rope_base=500000.0,
                rope_scaling=dict(llama3_rope, factor=32.0), tie_embeddings=True)
qwen2_5 = dict(block_size=32768, vocab_size=151936, rope_base=1000000.0, norm_eps=1e-6, attention_bias=True)
qwen3 = dict(block_size=40960, vocab_size=151936, rope_base=1000000.0, norm_eps=1e-6, n_query_groups=8,
             head_size=128, qk_norm=True)
configs = {
    # Original LLaMA (Touvron et al. 2023)
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-6),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824, norm_eps=1e-6),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920, norm_eps=1e-6),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016, norm_eps=1e-6),
    # Llama 2
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "Llama-2-70b": dict(
        block_size=4096, n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672
    ),
    # Llama 3.1
    "Llama-3.1-8B": dict(
        block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096,
        intermediate_size=14336, rope_base=500000.0, rope_scaling=llama3_rope,
    ),
    "Mistral-7B": dict(
        block_size=32768, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096, intermediate_size=14336,
        rope_base=1000000.0,
    ),
    "TinyLlama-1.1B": dict(n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    # SmolLM2 (Hugging Face TB)
    "SmolLM2-135M": dict(
        block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_query_groups=3, n_embd=576,
        intermediate_size=1536, rope_base=100000.0, tie_embeddings=True,
    ),
    "SmolLM2-360M": dict(
        block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_query_groups=5, n_embd=960,
        intermediate_size=2560, rope_base=100000.0, tie_embeddings=True,
    ),
    "SmolLM2-1.7B": dict(
        block_size=8192, vocab_size=49152, n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192,
        rope_base=130000.0, tie_embeddings=True,
    ),
    # Llama 3.2: tied embeddings, Llama 3 RoPE scaling with factor 32
    "Llama-3.2-1B": dict(llama3_2, n_layer=16, n_head=32, n_embd=2048),
    "Llama-3.2-3B": dict(llama3_2, n_layer=28, n_head=24, n_embd=3072),
    # Qwen2.5: q/k/v biases (context: the Instruct models' 32768 without YaRN)
    "Qwen2.5-0.5B": dict(qwen2_5, n_layer=24, n_head=14, n_query_groups=2, n_embd=896, intermediate_size=4864,
                         tie_embeddings=True),
    "Qwen2.5-1.5B": dict(qwen2_5, n_layer=28, n_head=12, n_query_groups=2, n_embd=1536, intermediate_size=8960,
                         tie_embeddings=True),
    "Qwen2.5-7B": dict(qwen2_5, vocab_size=152064, n_layer=28, n_head=28, n_query_groups=4, n_embd=3584,
                       intermediate_size=18944),
    # Qwen3: 128-wide heads whatever the width, q/k RMSNorm, no biases
    "Qwen3-0.6B": dict(qwen3, n_layer=28, n_head=16, n_embd=1024, intermediate_size=3072, tie_embeddings=True),
    "Qwen3-4B": dict(qwen3, n_layer=36, n_head=32, n_embd=2560, intermediate_size=9728, tie_embeddings=True),
    "Qwen3-8B": dict(qwen3, n_layer=36, n_head=32, n_embd=4096, intermediate_size=12288),
    # Tiny configs for tests
    "tiny": dict(block_size=128, vocab_size=320, n_layer=2, n_head=4, n_embd=64, intermediate_size=172),
    "tiny-gqa": dict(
        block_size=128, vocab_size=320, n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=172,
        rope_base=100000.0, tie_embeddings=True,
    ),
}
