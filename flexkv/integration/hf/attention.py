"""``flexkv_sdpa``: SDPA for a prompt whose prefix is already in the cache, as a transformers attention.

A prefill after a restore has ``q`` new tokens attending ``kv = prefix + q`` keys. Stock ``sdpa`` gives
that case an explicit ``[q, kv]`` mask, which rules out the flash kernel and its grouped-query support:
the K/V of every layer are first repeated to the query's head count (a copy 4x the cache for Llama-3-8B)
and attention runs on the masked path. At 32K cached tokens and a 16-token suffix that took ~40 ms of
a 65 ms forward on an H200. Here the same causal pattern (query i sees keys up to ``kv - q + i``) is
torch's lower-right causal bias, which the flash and memory-efficient kernels take natively, with
``enable_gqa`` instead of repeated K/V.

Only for what the HF engine runs: one sequence, no padding, every query a new token at the end of the
cache (``attention_mask`` must be None; a model using this attention gets none from transformers'
mask builders, which skip attentions they do not know). ``register()`` adds it to transformers'
attention registry (idempotent); use it with ``attn_implementation="flexkv_sdpa"`` or
:func:`use_prefix_sdpa`. It is registered when this module is imported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

NAME = "flexkv_sdpa"


def prefix_causal_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **_kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[1, heads, q, dim]`` over ``key``/``value`` ``[1, kv_heads, kv, dim]``, the
    queries being the last ``q`` of the ``kv`` positions; returns ``[1, q, heads, dim]`` as transformers'
    attentions do."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} takes no attention mask (one unpadded sequence; got {tuple(attention_mask.shape)})")
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > kv_len:
        raise ValueError(f"{NAME}: {q_len} queries but only {kv_len} keys (the queries are the newest keys)")
    gqa = query.shape[1] != key.shape[1]
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
    elif q_len == 1:  # one new token sees every key
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(q_len, kv_len),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="flexkv_sdpa"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, prefix_causal_sdpa)


def use_prefix_sdpa(model: torch.nn.Module) -> None:
    """Switch ``model`` (a transformers model) to ``flexkv_sdpa``."""
    register()
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is not None:
        set_impl(NAME)
    else:
        getattr(model, "config")._attn_implementation = NAME  # noqa: B009 - a PreTrainedModel's config


register()
