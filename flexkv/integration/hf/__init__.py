"""A small paged engine over HF transformers (DESIGN.md §7b): flexkv's reference engine.

``HFPagedEngine`` runs a causal LM with its prefix restored from flexkv and its prompts stored back;
``PagedKVPool`` is the paged KV memory it registers (host shared memory or CUDA). See docs/hf_engine.md.
The names load on first use, so importing the package (or walking flexkv's packages) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexkv.integration.hf.engine import HFPagedEngine, RestoreFailed, TurnStats
    from flexkv.integration.hf.models import flexkv_model_config, llama3_8b_config, random_model, tiny_llama_config
    from flexkv.integration.hf.pool import PagedKVPool

_HOMES = {"HFPagedEngine": "engine", "RestoreFailed": "engine", "TurnStats": "engine", "PagedKVPool": "pool",
          "flexkv_model_config": "models", "llama3_8b_config": "models", "random_model": "models",
          "tiny_llama_config": "models"}
__all__ = ["HFPagedEngine", "PagedKVPool", "RestoreFailed", "TurnStats", "flexkv_model_config", "llama3_8b_config",
           "random_model", "tiny_llama_config"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
