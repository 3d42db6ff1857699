"""A short prefill over a restored prefix, one decoder layer at a time, each layer a CUDA graph.

Why: a 16-token forward of an eager HF Llama-3-8B spends ~0.75 ms of host time per layer launching
kernels (~24 ms for 32 layers on the H200 host), longer than restoring an 8K-token prefix (~20 ms). A
layer captured as a CUDA graph is one launch, so the suffix's compute stops being the critical path and
a layer-wise restore's last layer is, by itself, about the time to the first token.

:class:`SuffixGraphs` holds what one shape (``prefix`` cached tokens, ``suffix`` new ones) needs: per
layer its K/V buffers and its graph. :meth:`SuffixGraphs.run` takes the embedded suffix and a function
giving layer i's prefix K/V (which may wait for the layer to land), copies the prefix in and replays
layer by layer, and returns the last hidden states and every layer's K/V.

The loop is the model's own: ``embed_tokens``, ``rotary_emb``, every decoder layer with the same
arguments ``LlamaModel.forward`` passes, ``norm`` and ``lm_head`` (a Llama-like model: Llama, Mistral,
Qwen2 and the like). The attention must be ``flexkv_sdpa``: it takes no mask, so the layers need no
mask built per call. Without CUDA (the CPU tests) the same loop runs eagerly, uncaptured.

Each layer attends over a :class:`StaticLayerCache`: K/V buffers of ``prefix + suffix`` tokens, the
prefix copied in before the layer runs and the suffix's K/V written behind it inside the graph (the
values a DynamicCache's concatenation gives, in memory that stays put). Outputs are static: the next
:meth:`run` of the same shape overwrites them, so the engine copies them into the request's own cache
once the first token's logits exist (after the time to first token).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from flexkv.integration.hf.attention import NAME as PREFIX_SDPA

KV = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LlamaParts:
    """The modules of a Llama-like causal LM that a forward walks through, in order."""

    embed: torch.nn.Module
    rotary: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    cache_keyword: str  # the decoder layer's cache argument: past_key_values (<= 5.23) or cache (5.24+)


def llama_parts(model: torch.nn.Module) -> LlamaParts:
    """The parts of ``model``; ValueError naming what is missing, or a wrong attention."""
    inner = getattr(model, "model", None)
    names = ("embed_tokens", "rotary_emb", "layers", "norm")
    missing = [n for n in names if getattr(inner, n, None) is None] + (
        [] if getattr(model, "lm_head", None) is not None else ["lm_head"])
    if missing:
        raise ValueError(f"{type(model).__name__} is not Llama-like (CUDA graphs need model.model."
                         f"{{embed_tokens, rotary_emb, layers, norm}} and model.lm_head): no {', '.join(missing)}")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != PREFIX_SDPA:
        raise ValueError(f"CUDA graphs need attn_implementation={PREFIX_SDPA!r} (it takes no mask); "
                         f"the model uses {impl!r}")
    layers = list(getattr(inner, "layers"))  # noqa: B009 - checked above
    params = inspect.signature(layers[0].forward).parameters
    return LlamaParts(getattr(inner, "embed_tokens"), getattr(inner, "rotary_emb"), layers,  # noqa: B009
                      getattr(inner, "norm"), getattr(model, "lm_head"),  # noqa: B009
                      "cache" if "cache" in params else "past_key_values")


class StaticLayerCache:
    """The cache a decoder layer's attention sees in a graphed forward: one K and one V buffer of
    ``prefix + suffix`` tokens (``[1, kv_heads, tokens, head_dim]``), the prefix copied in before the layer
    runs; ``update`` writes the suffix's K/V behind it in place and returns the buffers: the values
    ``DynamicCache.update``'s concatenation gives, in memory that stays put for a graph to replay.

    Only ``update`` is provided: what Llama-like attention calls on its cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prefix: int) -> None:
        self.keys, self.values, self.prefix = keys, values, prefix
        # the prefix as ``[tokens, kv_heads, head_dim]`` views: rows of the paged pool copy in with one op
        self.prefix_rows = (keys[0, :, :prefix].permute(1, 0, 2), values[0, :, :prefix].permute(1, 0, 2))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_args: Any,
               **_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, self.prefix:].copy_(key_states)
        self.values[:, :, self.prefix:].copy_(value_states)
        return self.keys, self.values


def _layer_forward(parts: LlamaParts, layer: int, hidden: torch.Tensor, cache: StaticLayerCache,
                   position_ids: torch.Tensor, rope: KV) -> torch.Tensor:
    """Decoder layer ``layer`` with the arguments ``LlamaModel.forward`` gives it; its hidden states out
    (the layer's K/V are then ``cache``'s buffers)."""
    out: torch.Tensor = parts.layers[layer](hidden, attention_mask=None, position_ids=position_ids, use_cache=True,
                                            position_embeddings=rope, **{parts.cache_keyword: cache})
    return out


class SuffixGraphs:
    """The decoder layers of ``model`` for a ``suffix``-token prefill after ``prefix`` cached tokens.

    ``capture`` (CUDA only): the K/V buffers are allocated once and each layer is captured here (after
    one warm-up pass on zeros); else :meth:`run` calls the layers eagerly over fresh buffers, the same
    computation."""

    def __init__(self, model: torch.nn.Module, prefix: int, suffix: int, capture: bool) -> None:
        from flexkv.integration.hf.models import kv_shape

        if prefix < 1 or suffix < 1:
            raise ValueError(f"SuffixGraphs needs prefix >= 1 and suffix >= 1 tokens, got {prefix} and {suffix}")
        self.parts = llama_parts(model)
        self.config: Any = getattr(model, "config")  # noqa: B009 - a PreTrainedModel's config
        self.prefix, self.suffix, self.capture = prefix, suffix, capture
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        _, self.kv_heads, self.head_dim = kv_shape(self.config)
        self.position_ids = torch.arange(prefix, prefix + suffix, device=self.device).unsqueeze(0)
        self.hidden_in = torch.zeros(1, suffix, int(self.config.hidden_size), dtype=self.dtype, device=self.device)
        rope = self.parts.rotary(self.hidden_in, position_ids=self.position_ids)
        self.rope: KV = (rope[0], rope[1])  # the same positions every run: computed once
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.caches: list[StaticLayerCache] = []
        self.hidden_out: list[torch.Tensor] = []
        if capture:
            self._capture()

    def _new_cache(self) -> StaticLayerCache:
        shape = (1, self.kv_heads, self.prefix + self.suffix, self.head_dim)
        return StaticLayerCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                                torch.zeros(shape, dtype=self.dtype, device=self.device), self.prefix)

    def _capture(self) -> None:
        self.caches = [self._new_cache() for _ in self.parts.layers]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up: libraries pick and initialize their kernels outside capture
            hidden = self.hidden_in
            for i, cache in enumerate(self.caches):
                hidden = _layer_forward(self.parts, i, hidden, cache, self.position_ids, self.rope)
        current.wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs always replay in capture order
        hidden = self.hidden_in
        for i, cache in enumerate(self.caches):
            graph = torch.cuda.CUDAGraph()
            # thread_local: an engine-side lane's thread keeps syncing its copy events while this captures
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                hidden = _layer_forward(self.parts, i, hidden, cache, self.position_ids, self.rope)
            self.graphs.append(graph)
            self.hidden_out.append(hidden)

    def run(self, embedded: torch.Tensor, prefix_rows: Callable[[int], KV]) -> tuple[torch.Tensor, list[KV]]:
        """The last layer's hidden states for ``embedded`` (``[1, suffix, hidden]``) and each layer's K/V
        (``[1, kv_heads, prefix + suffix, head_dim]``), layer i's prefix copied from ``prefix_rows(i)``
        (``[prefix, kv_heads, head_dim]``, the paged pool's layout) just before layer i runs. Captured, both
        are the static buffers the next run overwrites."""
        if embedded.shape[1] != self.suffix:
            raise ValueError(f"these graphs take {self.suffix} tokens, got {embedded.shape[1]}")
        hidden = embedded
        if self.capture:
            self.hidden_in.copy_(embedded)
        caches = self.caches if self.capture else [self._new_cache() for _ in self.parts.layers]  # (fresh: a run
        for i, cache in enumerate(caches):  # that raised midway leaves nothing behind for the next)
            key, value = prefix_rows(i)
            if key.shape[0] != self.prefix or value.shape[0] != self.prefix:
                raise ValueError(f"layer {i}: a prefix of {key.shape[0]} tokens, these graphs take {self.prefix}")
            cache.prefix_rows[0].copy_(key)
            cache.prefix_rows[1].copy_(value)
            if self.capture:
                self.graphs[i].replay()
            else:
                hidden = _layer_forward(self.parts, i, hidden, cache, self.position_ids, self.rope)
        return (self.hidden_out[-1] if self.capture else hidden), [(c.keys, c.values) for c in caches]


class GraphCache:
    """The :class:`SuffixGraphs` of the last ``size`` shapes (prefix, suffix) a model ran, least recently
    used dropped first (its memory with it).

    A capture costs a warm-up pass and the capture itself, and a conversation gives every turn a new
    shape: with ``capture_after`` = n, a shape is captured the n-th time it is asked for (of the last
    ``_SEEN`` shapes asked for); :meth:`get` returns None before, and the engine runs the model's forward.
    Uncaptured (no CUDA) there is nothing to save: every shape is run at once."""

    _SEEN = 256

    def __init__(self, model: torch.nn.Module, capture: bool, size: int = 4, capture_after: int = 2) -> None:
        if size < 1:
            raise ValueError(f"GraphCache size must be >= 1, got {size}")
        if capture_after < 1:
            raise ValueError(f"GraphCache capture_after must be >= 1, got {capture_after}")
        llama_parts(model)  # fail at construction, not at the first restore
        self.model, self.capture, self.size, self.capture_after = model, capture, size, capture_after
        self._shapes: collections.OrderedDict[tuple[int, int], SuffixGraphs] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()  # shape -> times
        self.num_captured = 0

    def get(self, prefix: int, suffix: int) -> SuffixGraphs | None:
        key = (prefix, suffix)
        graphs = self._shapes.get(key)
        if graphs is not None:
            self._shapes.move_to_end(key)
            return graphs
        if self.capture:
            times = self._seen.pop(key, 0) + 1
            if times < self.capture_after:
                self._seen[key] = times
                while len(self._seen) > self._SEEN:
                    self._seen.popitem(last=False)
                return None
        while len(self._shapes) >= self.size:
            self._shapes.popitem(last=False)
        graphs = SuffixGraphs(self.model, prefix, suffix, self.capture)
        self._shapes[key] = graphs
        self.num_captured += int(self.capture)
        return graphs

    def __len__(self) -> int:
        return len(self._shapes)
