"""Model configurations for the HF engine's tests and benchmarks, and flexkv's view of a model."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexkv.common.config import ModelConfig
from flexkv.integration.hf import attention as _attention  # registers "flexkv_sdpa" before a model is built


def tiny_llama_config(attn_implementation: str = "sdpa", num_layers: int = 2, vocab_size: int = 256,
                      hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2) -> LlamaConfig:
    """A small Llama (grouped-query attention, RoPE) for CPU tests; weights come from the seed.
    ``attn_implementation``: any of transformers' (``sdpa``, ``eager``) or ``flexkv_sdpa``
    (:mod:`flexkv.integration.hf.attention`)."""
    return _llama(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=4096, initializer_range=0.2, attn_implementation=attn_implementation)


def llama3_8b_config(attn_implementation: str = "sdpa", max_position_embeddings: int = 65536) -> LlamaConfig:
    """The Llama-3-8B shape: 32 layers, 32 heads, 8 KV heads, head 128, hidden 4096, MLP 14336, vocab 128256."""
    return _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max_position_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  attn_implementation=attn_implementation)


def _llama(**fields: Any) -> LlamaConfig:
    """A LlamaConfig (``attn_implementation`` travels through the base config's keyword arguments)."""
    _attention.register()
    config: Any = LlamaConfig(**fields)
    return config


def random_model(config: LlamaConfig, dtype: torch.dtype, seed: int = 0,
                 device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A causal LM of ``config`` with random weights from ``seed`` (HF's initializers; no download), built
    on ``device`` (an 8B model is initialised on the GPU in seconds)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype``: no float32 copy of an 8B model first
    try:
        with torch.device(device):
            model: Any = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def flexkv_model_config(config: Any, dtype: torch.dtype) -> ModelConfig:
    """flexkv's ModelConfig for the KV of ``config`` in ``dtype``."""
    num_layers, kv_heads, head_dim = kv_shape(config)
    return ModelConfig(num_layers=num_layers, num_kv_heads=kv_heads, head_size=head_dim,
                       dtype=str(dtype).removeprefix("torch."))
