"""A small paged engine over HF transformers: flexkv's reference engine and real-model proof.

One request at a time, greedy decoding. A prompt's life (``generate``):

1. ``get_match`` on the prompt's whole blocks (never the last token: one token is always computed so
   there are logits), ``launch`` into free pages of the :class:`PagedKVPool` (without the cost check, both
   in one round trip: ``get_match_launch`` into pages for every whole block, the unmatched ones freed
   when the reply comes);
2. the restored prefix goes into a fresh ``DynamicCache`` (``[1, kv_heads, tokens, head_dim]`` per
   layer): after ``wait``, or, with ``layerwise``, layer by layer: a pre-hook on decoder layer i calls
   ``KVManager.wait_layer(task, i)`` and fills layer i just before it runs, so the suffix computes
   while later layers still move;
3. only the uncached suffix is prefilled; the first token is the argmax of its last logits (TTFT);
4. the prompt's whole blocks are written into pages and ``put_async``; decoding continues meanwhile,
   the put is waited for (and its pages freed) at the end of the turn.

Any flexkv trouble (no manager, server gone, task FAILED/TIMEOUT, no free pages) makes the engine
recompute: the output never depends on flexkv, only the time to the first token does. Pages whose
task might still be writing (a wait that timed out) are never reused.

Tested with transformers 5.17 and 5.24 (only API both have: ``DynamicCache(config=...)``,
``Cache.update``, ``cache.layers[i].keys/values``, ``logits_to_keep``; the cache keyword is
``past_key_values`` up to 5.23 and ``cache`` from 5.24, chosen by signature).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from flexkv.integration.hf.cost import CostCheck, CostDecision, RestoreChoice
from flexkv.integration.hf.graphs import KV, GraphCache, SuffixGraphs
from flexkv.integration.hf.pool import PagedKVPool, cache_layout
from flexkv.kvmanager import KVManager
from flexkv.types import CapacityError, ConfigError, FlexKVError, InvalidRequest, KVResponse, TaskStatus

log = logging.getLogger("flexkv.hf")


@dataclasses.dataclass
class TurnStats:
    """What one prompt cost. ``fallback`` says why flexkv's prefix was not used ("" = it was, or none).

    ``choice`` is what the cost check decided (None: it did not run: off, no flexkv, nothing matched)
    and ``choice_reason`` why, with its estimates; ``num_matched_tokens`` is what flexkv had cached,
    ``num_restored_tokens`` what the engine took of it."""

    num_prompt_tokens: int
    num_restored_tokens: int
    num_computed_tokens: int
    ttft_s: float
    restore_wait_s: float = 0.0  # time the prefill spent waiting for restored layers
    layerwise: bool = False
    fallback: str = ""
    # with HFPagedEngine(profile=True): seconds per phase of the prefill, device synchronized at each
    # boundary of a whole restore ("match": get_match + launch, "restore_wait", "fill", "forward"); a
    # layer-wise restore is not synchronized inside the forward, its "layer_waits" add up the hooks' waits
    # and "last_layer_landed" is when the last layer's wait returned, from the prefill's start
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    choice: RestoreChoice | None = None
    choice_reason: str = ""
    num_matched_tokens: int = 0


@dataclasses.dataclass
class _Restore:
    task_id: int
    pages: list[int]
    num_tokens: int
    layerwise: bool
    rows: torch.Tensor | slice  # the restored tokens in the pages, as PagedKVPool.row_index finds them
    filled: set[int] = dataclasses.field(default_factory=set)
    wait_s: float = 0.0
    final: TaskStatus | None = None  # once a wait returned it
    last_landed: float = 0.0  # perf_counter when the last layer wait returned


@dataclasses.dataclass
class _Matched:
    """What ``_match`` reserved (``task_id`` None: nothing) and what flexkv had."""

    task_id: int | None
    mask: Any
    num_matched_tokens: int
    decision: CostDecision | None
    pages: list[int] | None = None  # get_match_launch: the pages it was launched into (one per block matched)


@dataclasses.dataclass
class PendingPut:
    """A put started after a prefill; its pages stay allocated until ``finish_put``."""

    task_id: int
    pages: list[int]


def _delivered(resp: KVResponse) -> int:
    """Tokens a finished GET loaded: its return mask is a prefix of the matched tokens."""
    return int(resp.return_mask.sum()) if resp.return_mask is not None else 0


class RestoreFailed(Exception):
    """A restore could not be used (raised inside the forward by a layer hook; the engine recomputes)."""


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a causal LM (``model.model.layers`` for Llama-like models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers")
    return list(layers)


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V in ``cache``, ``[batch, kv_heads, tokens, head_dim]``."""
    lay: Any = cache.layers[layer]
    return lay.keys, lay.values


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword of ``model.forward`` that takes the cache: ``past_key_values`` up to transformers 5.23,
    ``cache`` from 5.24."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def set_layer_kv(cache: DynamicCache, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Make the empty layer ``layer`` of ``cache`` hold ``key``/``value`` themselves (``Cache.update`` would
    concatenate them onto an empty tensor: one more copy of the whole prefix)."""
    cache.update(key[:, :, :0], value[:, :, :0], layer)  # initializes the layer the public way
    lay: Any = cache.layers[layer]
    if lay.keys.shape[2] != 0:
        raise ValueError(f"layer {layer} of the cache is not empty")
    lay.keys, lay.values = key, value


class HFPagedEngine:
    """Runs ``model`` with its KV restored from / stored to flexkv through ``pool``.

    ``kvm`` None: plain recompute (the reference). ``namespace`` (e.g. ``[lora_name, tenant]``) keeps
    caches apart. ``layerwise``: restores land layer by layer (the pool must be registered with
    ``layerwise=True``). ``put_completely``: a turn ends once its blocks also reached SSD/remote.
    ``cost_check`` (on by default; a :class:`CostCheck` to configure it, False to restore whatever
    flexkv matched): restore only what is faster to load than to recompute (flexkv.integration.hf.cost).
    ``cuda_graphs``: a suffix of at most ``graph_max_suffix_tokens`` after a restored prefix runs one
    CUDA graph per decoder layer (flexkv.integration.hf.graphs; Llama-like models with ``flexkv_sdpa``),
    captured the ``graph_capture_after``-th time a (prefix, suffix) shape is seen (the model's forward
    before: one-off shapes never pay a capture) and kept for the last ``graph_shapes`` shapes; on the CPU
    the same per-layer loop runs uncaptured, every time.
    Single-threaded: one request at a time.
    """

    def __init__(self, model: torch.nn.Module, pool: PagedKVPool, kvm: KVManager | None = None, *,
                 namespace: Sequence[str] | None = None, layerwise: bool = False, wait_timeout_s: float = 60.0,
                 put_completely: bool = False, profile: bool = False, cost_check: bool | CostCheck = True,
                 cuda_graphs: bool = False, graph_max_suffix_tokens: int = 256, graph_shapes: int = 4,
                 graph_capture_after: int = 2) -> None:
        self.model = model.eval()
        self.config: Any = getattr(model, "config")  # noqa: B009 - a PreTrainedModel's config
        self.pool, self.kvm = pool, kvm
        self.namespace = list(namespace) if namespace is not None else None
        self.layerwise = layerwise
        self.wait_timeout_s = wait_timeout_s
        self.put_completely = put_completely
        self.profile = profile
        self.cost_check = cost_check if isinstance(cost_check, CostCheck) else CostCheck() if cost_check else None
        self.tokens_per_block = pool.tokens_per_page
        self.num_layers = len(decoder_layers(model))
        self._cache_kw = cache_keyword(model)
        self._active: tuple[_Restore, DynamicCache] | None = None
        self._hooks = [layer.register_forward_pre_hook(self._hook_for(i))
                       for i, layer in enumerate(decoder_layers(model))]
        self.num_quarantined_pages = 0
        self.graph_max_suffix_tokens = graph_max_suffix_tokens
        self.graphs = GraphCache(model, pool.device.type == "cuda", graph_shapes,
                                 graph_capture_after) if cuda_graphs else None

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the model -----------------------------------------------------------------------------
    def _forward(self, token_ids: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
        """Run tokens at positions start.. through the model; the last position's logits (float32)."""
        device = self.pool.device
        ids = token_ids.to(device).unsqueeze(0)
        pos = torch.arange(start, start + ids.shape[1], device=device).unsqueeze(0)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return out.logits[0, -1].float()

    def _hook_for(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            if self._active is not None:
                restore, cache = self._active
                self._fill(restore, cache, layer)
        return hook

    def _fill(self, restore: _Restore, cache: DynamicCache, layer: int) -> None:
        """Put layer ``layer`` of the restored prefix into ``cache`` (waiting for it when layer-wise)."""
        if layer in restore.filled:
            return
        key, value = self._landed(restore, layer)
        set_layer_kv(cache, layer, key, value)
        restore.filled.add(layer)

    def _landed(self, restore: _Restore, layer: int) -> KV:
        """Layer ``layer`` of the restored prefix, read from its pages (once it landed, when layer-wise), in
        the cache's layout."""
        return cache_layout(self._landed_rows(restore, layer))

    def _landed_rows(self, restore: _Restore, layer: int) -> KV:
        """:meth:`_landed` in the pool's row layout ``[tokens, kv_heads, head_dim]`` (a graphed forward's input)."""
        self._await_layer(restore, layer)
        return self.pool.read_rows(layer, restore.rows)

    def _await_layer(self, restore: _Restore, layer: int) -> None:
        """Return once layer ``layer`` of a layer-wise restore landed; RestoreFailed if it cannot."""
        if restore.layerwise:
            assert self.kvm is not None
            t0 = time.perf_counter()
            resp = self.kvm.wait_layer(restore.task_id, layer, timeout=self.wait_timeout_s)
            restore.wait_s += time.perf_counter() - t0
            restore.last_landed = time.perf_counter()
            if resp.status is not TaskStatus.SUCCESS:
                raise RestoreFailed(f"layer {layer}: {resp.status.name} {resp.error}".strip())

    def _graphs_for(self, prefix: int, suffix: int) -> SuffixGraphs | None:
        """The CUDA graphs of this shape (captured now if its time came), or None: off, no prefix, too long a
        suffix, a shape not seen often enough yet."""
        if self.graphs is None or prefix == 0 or not 0 < suffix <= self.graph_max_suffix_tokens:
            return None
        try:
            return self.graphs.get(prefix, suffix)
        except RuntimeError as e:  # a capture CUDA refused (torch.AcceleratorError is one): the forward from now on
            log.warning("CUDA graphs turned off: capturing a %d-token suffix after %d cached tokens failed: %s",
                        suffix, prefix, e)
            self.graphs = None
            return None

    def _forward_graphed(self, graphs: SuffixGraphs, token_ids: torch.Tensor, prefix_rows: Callable[[int], KV],
                         cache: DynamicCache) -> tuple[torch.Tensor, Callable[[], None]]:
        """``_forward`` of the suffix through ``graphs``: the last position's logits, and a function that
        puts every layer's K/V into ``cache`` (copies of the graphs' static outputs: call it once the logits
        are read, it is off the time to the first token)."""
        parts = graphs.parts
        hidden, kvs = graphs.run(parts.embed(token_ids.to(self.pool.device).unsqueeze(0)), prefix_rows)
        logits = parts.lm_head(parts.norm(hidden)[:, -1:, :])[0, -1].float()

        def finish() -> None:
            for layer, (key, value) in enumerate(kvs):
                if graphs.capture:  # the next run of these graphs overwrites them
                    key, value = key.clone(), value.clone()
                set_layer_kv(cache, layer, key, value)
        return logits, finish

    def _prefix_source(self, restore: _Restore | None, reuse: tuple[DynamicCache, int] | None) -> Callable[[int], KV]:
        """Layer i's prefix K/V for a graphed forward, ``[tokens, kv_heads, head_dim]``: from the restore's
        pages (waiting for the layer when layer-wise), or the first ``n`` tokens of the reused cache."""
        if restore is not None:
            return lambda layer: self._landed_rows(restore, layer)
        assert reuse is not None
        earlier, num_tokens = reuse

        def reused(layer: int) -> KV:
            key, value = layer_kv(earlier, layer)
            if key.shape[2] < num_tokens:
                raise ValueError(f"reuse of {num_tokens} tokens from a cache of {key.shape[2]}")
            return key[0, :, :num_tokens].permute(1, 0, 2), value[0, :, :num_tokens].permute(1, 0, 2)
        return reused

    @torch.inference_mode()
    def calibrate_cost(self, max_tokens: int, repeats: int = 2) -> None:
        """Teach the cost check this engine's prefill time before it sees prompts: forwards of random
        tokens in chunks [0, L/16), [L/16, L/4), [L/4, L/2), [L/2, L) of an ``L = max_tokens`` prompt,
        ``repeats`` times; the first pass only warms up. ValueError with the check off."""
        if self.cost_check is None:
            raise ValueError("calibrate_cost: this engine has no cost check (cost_check=False)")
        if max_tokens < 4:
            raise ValueError(f"calibrate_cost: max_tokens must be >= 4, got {max_tokens}")
        bounds = sorted({0, max_tokens // 16, max_tokens // 4, max_tokens // 2, max_tokens})
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, int(self.config.vocab_size), (max_tokens,), generator=gen)
        for r in range(max(repeats, 2)):
            cache = DynamicCache(config=self.config)
            for begin, end in itertools.pairwise(bounds):
                t0 = time.perf_counter()
                _ = float(self._forward(tokens[begin:end], cache, begin)[0])  # synchronizes a GPU
                if r:
                    self.cost_check.model.observe(begin, end - begin, time.perf_counter() - t0)

    # -- one prompt ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, token_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                 reuse: tuple[DynamicCache, int] | None = None) -> tuple[list[int], TurnStats]:
        """Greedy-decode ``max_new_tokens`` tokens after ``token_ids`` (1-D); returns them and the stats.

        ``reuse``: see :meth:`prefill`."""
        tokens = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
        if tokens.numel() == 0 or max_new_tokens < 1:
            raise ValueError("generate needs at least one prompt token and max_new_tokens >= 1")
        logits, cache, stats, put = self.prefill(tokens, reuse)
        try:
            out = self.decode(logits, cache, tokens.numel(), max_new_tokens)
        finally:
            self.finish_put(put)
        return out, stats

    @torch.inference_mode()
    def decode(self, logits: torch.Tensor, cache: DynamicCache, num_tokens: int, max_new_tokens: int) -> list[int]:
        """Greedy tokens after a prefill of ``num_tokens`` tokens whose last logits are ``logits``."""
        out = [int(logits.argmax())]
        pos = num_tokens
        for _ in range(max_new_tokens - 1):
            nxt = torch.tensor([out[-1]], dtype=torch.long)
            logits = self._forward(nxt, cache, pos)
            pos += 1
            out.append(int(logits.argmax()))
        return out

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, reuse: tuple[DynamicCache, int] | None = None,
                ) -> tuple[torch.Tensor, DynamicCache, TurnStats, PendingPut | None]:
        """Restore what flexkv has, compute the rest; returns the last logits, the cache, the stats and
        the started put (pass it to ``finish_put`` once done with the pages; ``generate`` does).

        ``reuse=(cache, n)`` (only without flexkv: the bit-exact reference): start from the first ``n``
        tokens of ``cache``, which this engine computed for an earlier prompt starting with the same
        tokens, and compute only the rest. Given the cache flexkv stored, that is the same sequence of
        forwards (same shapes, same inputs) a flexkv run makes, so its outputs are bit-identical; a
        plain recompute of the whole prompt is only numerically close (other kernel shapes round
        differently, and greedy decoding of a random model may flip a token).
        """
        t0 = time.perf_counter()
        n = tokens.numel()
        if reuse is not None and (self.kvm is not None or not 0 < reuse[1] < n):
            raise ValueError(f"reuse needs an engine without flexkv and 0 < {reuse[1]} < {n} prompt tokens")
        phases: dict[str, float] = {}
        restore, fallback, matched = self._start_restore(tokens)
        self._phase(phases, "match", t0)
        cache = DynamicCache(config=self.config)
        sampled = False  # the prefill forward alone is a cost-check sample, unless a restore failed or it was graphed
        finish: Callable[[], None] | None = None  # a graphed forward's cache, filled after the first token
        try:
            if restore is not None and not restore.layerwise:
                self._wait_whole(restore, phases)  # (may shrink it to what it delivered)
            start = restore.num_tokens if restore is not None else reuse[1] if reuse is not None else 0
            graphs = self._graphs_for(start, n - start)
            if restore is not None:
                self._begin_restore(restore, cache, phases, fill=graphs is None)
            if reuse is not None and graphs is None:
                start = self._reuse(reuse[0], reuse[1], cache)
            t1 = time.perf_counter()
            if graphs is None:
                logits = self._forward(tokens[start:], cache, start)
            else:
                logits, finish = self._forward_graphed(graphs, tokens[start:], self._prefix_source(restore, reuse),
                                                       cache)
            self._phase(phases, "forward", t1)
            if restore is not None:
                self._end_restore(restore)
            sampled = graphs is None  # a recompute would not be graphed: graphed forwards teach the check nothing
        except RestoreFailed as e:
            assert restore is not None
            fallback = f"restore failed: {e}"
            log.warning("flexkv restore of task %d unusable (%s); recomputing", restore.task_id, e)
            self._abandon(restore)
            restore, cache, finish = None, DynamicCache(config=self.config), None  # (a graphed run's K/V: dropped)
            logits = self._forward(tokens, cache, 0)
        except BaseException:
            if restore is not None:  # e.g. out of memory mid-forward: end the task, then free its pages
                self._active = None
                self._abandon(restore)
            raise
        finally:
            self._active = None
        _ = float(logits[0])  # the first token exists once its logits do (synchronizes a GPU)
        t_end = time.perf_counter()
        if finish is not None:
            finish()
        ttft = t_end - t0
        num_restored = restore.num_tokens if restore is not None else 0
        wait_s = restore.wait_s if restore else 0.0
        if self.profile and restore is not None and restore.layerwise:
            phases["layer_waits"] = restore.wait_s
            phases["last_layer_landed"] = restore.last_landed - t0
        if self.cost_check is not None and sampled:
            layer_waits = wait_s if self.layerwise and restore is not None else 0.0  # they ran inside the forward
            self.cost_check.model.observe(num_restored, n - num_restored, t_end - t1 - layer_waits)
        decision = matched.decision if matched is not None else None
        stats = TurnStats(n, num_restored, n - num_restored, ttft, wait_s, self.layerwise and restore is not None,
                          fallback, phases if self.profile else {}, decision.choice if decision else None,
                          decision.reason if decision else "", matched.num_matched_tokens if matched is not None else 0)
        put = self._start_put(tokens, cache, restore)
        return logits, cache, stats, put

    def _phase(self, phases: dict[str, float], name: str, since: float) -> None:
        """With ``profile``: record the seconds since ``since`` as phase ``name``, the device synchronized."""
        if self.profile:
            if self.pool.device.type == "cuda":
                torch.cuda.synchronize(self.pool.device)
            phases[name] = time.perf_counter() - since

    def _reuse(self, earlier: DynamicCache, num_tokens: int, cache: DynamicCache) -> int:
        """Copy the first ``num_tokens`` of ``earlier`` into the fresh ``cache``, as a restore fills it."""
        for layer in range(self.num_layers):
            key, value = layer_kv(earlier, layer)
            if key.shape[2] < num_tokens:
                raise ValueError(f"reuse of {num_tokens} tokens from a cache of {key.shape[2]}")
            keep = torch.contiguous_format  # the layer's first forward concatenates it, as a restore's
            set_layer_kv(cache, layer, key[:, :, :num_tokens].clone(memory_format=keep),
                         value[:, :, :num_tokens].clone(memory_format=keep))
        return num_tokens

    def _start_restore(self, tokens: torch.Tensor) -> tuple[_Restore | None, str, _Matched | None]:
        t = self.tokens_per_block
        limit = (tokens.numel() - 1) // t * t  # keep at least one token to compute
        if self.kvm is None or limit == 0:
            return None, "" if self.kvm is not None else "no flexkv", None
        try:
            matched = self._match(tokens, limit)
        except FlexKVError as e:
            return None, f"get_match: {e}", None
        if matched.task_id is None:
            return None, "", matched
        task_id, mask = matched.task_id, matched.mask
        num = int(mask.sum())
        launched = matched.pages is not None and num > 0  # get_match_launch launched it (unless nothing matched)
        if num == 0 or not mask[:num].all():
            if launched:  # (never for a GET without a token mask) it runs: its pages come back after it
                self._release(matched.pages or [], self._wait(task_id))
            else:
                self.kvm.cancel(task_id)
                self.pool.free(matched.pages or [])
            return None, "" if num == 0 else "mask is not a prefix", matched
        if matched.pages is not None:
            pages = matched.pages[: num // t]
            self.pool.free(matched.pages[num // t:])  # no copy writes them: the task moves matched blocks only
        else:
            if not self.pool.can_allocate(num // t):
                self.kvm.cancel(task_id)
                return None, "no free pages", matched
            pages = self.pool.allocate(num // t)
            try:
                self.kvm.launch(task_id, self.pool.slot_mapping(pages, num), layerwise=self.layerwise)
            except FlexKVError as e:
                self.kvm.cancel(task_id)
                self.pool.free(pages)
                return None, f"launch: {e}", matched
        return _Restore(task_id, pages, num, self.layerwise, self.pool.row_index(pages, num)), "", matched

    def _match(self, tokens: torch.Tensor, limit: int) -> _Matched:
        """get_match of ``tokens[:limit]``, weighed by the cost check (when on): what to restore.

        ``CPU_PREFIX``: the first match is cancelled (the cancel reaches the server before the second
        match, so its locks and promotion blocks are gone by then) and the CPU-resident prefix matched
        again; should that second match reach below the CPU tier (the CPU prefix was evicted in between),
        it is cancelled too and the prompt recomputed. ``RECOMPUTE``: cancelled, nothing restored."""
        assert self.kvm is not None
        if self.cost_check is None:
            t = self.tokens_per_block
            if not self.pool.can_allocate(limit // t):  # match first, then find pages for what matched
                task_id, mask = self.kvm.get_match(tokens[:limit].numpy(), namespace=self.namespace)
                return _Matched(task_id, mask, int(mask.sum()), None)
            pages = self.pool.allocate(limit // t)
            try:
                task_id, mask = self.kvm.get_match_launch(tokens[:limit].numpy(), self.pool.slot_mapping(pages, limit),
                                                          namespace=self.namespace, layerwise=self.layerwise)
            except (InvalidRequest, CapacityError, ConfigError):
                self.pool.free(pages)  # the server refused it before any launch
                raise
            except BaseException:  # no answer (ServerUnavailable), or we stopped listening: it may have
                self._release(pages, TaskStatus.UNREADY)  # launched into them, so they are never handed out
                raise
            return _Matched(task_id, mask, int(mask.sum()), None, pages)
        info = self.kvm.get_match_info(tokens[:limit].numpy(), namespace=self.namespace)
        if info.num_tokens == 0:
            return _Matched(info.task_id, info.mask, 0, None)
        decision = self.cost_check.decide(info, tokens.numel())
        if decision.choice is RestoreChoice.ALL:
            return _Matched(info.task_id, info.mask, info.num_tokens, decision)
        self.kvm.cancel(info.task_id)
        if decision.choice is RestoreChoice.RECOMPUTE:
            return _Matched(None, None, info.num_tokens, decision)
        again = self.kvm.get_match_info(tokens[:info.num_cpu_tokens].numpy(), namespace=self.namespace)
        if again.num_ssd_blocks or again.num_remote_blocks:
            self.kvm.cancel(again.task_id)
            why = f"the CPU prefix left the CPU tier before its match; recomputed. {decision.reason}"
            return _Matched(None, None, info.num_tokens, CostDecision(RestoreChoice.RECOMPUTE, why,
                                                                      decision.estimates_s))
        return _Matched(again.task_id, again.mask, info.num_tokens, decision)

    def _wait_whole(self, restore: _Restore, phases: dict[str, float]) -> None:
        """Wait for a whole (not layer-wise) restore; RestoreFailed unless it delivered something. A GET may
        end SUCCESS with less than its match promised (a corrupt SSD block and the rest of the prompt are a
        miss, as is a key the remote store evicted): the restore shrinks to the delivered prefix, and the
        pages past it, which no copy wrote, go back to the pool (they must feed neither the model nor a put)."""
        t0 = time.perf_counter()
        resp = self._wait_response(restore.task_id)
        restore.final = resp.status
        restore.wait_s = time.perf_counter() - t0
        self._phase(phases, "restore_wait", t0)
        if resp.status is not TaskStatus.SUCCESS:
            raise RestoreFailed(resp.status.name)
        delivered = _delivered(resp)
        if delivered >= restore.num_tokens:
            return
        if delivered == 0:
            raise RestoreFailed(f"it delivered none of the {restore.num_tokens} tokens it matched")
        log.warning("flexkv restore of task %d delivered %d of the %d tokens it matched; using those", restore.task_id,
                    delivered, restore.num_tokens)
        keep = delivered // self.tokens_per_block
        self.pool.free(restore.pages[keep:])  # the task is final: nothing writes them any more
        restore.pages, restore.num_tokens = restore.pages[:keep], delivered
        restore.rows = self.pool.row_index(restore.pages, delivered)

    def _begin_restore(self, restore: _Restore, cache: DynamicCache, phases: dict[str, float],
                       fill: bool = True) -> None:
        """Put a whole restore (waited for: :meth:`_wait_whole`) into ``cache``; or, layer-wise, arm the layer
        hooks. ``fill`` False: nothing (a graphed forward reads the layers itself)."""
        if not restore.layerwise:
            if not fill:
                return
            t1 = time.perf_counter()
            for layer in range(self.num_layers):
                self._fill(restore, cache, layer)
            self._phase(phases, "fill", t1)
            return
        if not fill:
            return
        t0 = time.perf_counter()
        self._fill(restore, cache, 0)  # the model reads the cache length off layer 0 before it runs
        self._phase(phases, "layer0", t0)
        self._active = (restore, cache)  # the hooks fill layers 1.. as the forward reaches them

    def _end_restore(self, restore: _Restore) -> None:
        """After the forward used every layer: end the task. Its layers all landed, yet its result decides: a
        GET that delivered less than it matched (see :meth:`_wait_whole`) landed only those blocks' layers,
        and the forward read unwritten pages past them, so it is thrown away and the prompt recomputed."""
        if restore.layerwise:
            resp = self._wait_response(restore.task_id)
            restore.final = resp.status
            if resp.status is not TaskStatus.SUCCESS:  # cannot happen once every layer landed; never trust it
                raise RestoreFailed(f"final status {resp.status.name} after every layer landed")
            if _delivered(resp) < restore.num_tokens:
                raise RestoreFailed(f"it delivered {_delivered(resp)} of the {restore.num_tokens} tokens it matched")

    def _wait(self, task_id: int, completely: bool = False) -> TaskStatus:
        return self._wait_response(task_id, completely).status

    def _wait_response(self, task_id: int, completely: bool = False) -> KVResponse:
        """The task's final response; TIMEOUT when the wait itself failed (server gone, deadline)."""
        assert self.kvm is not None
        try:
            return self.kvm.wait(task_id, timeout=self.wait_timeout_s, completely=completely)[task_id]
        except FlexKVError as e:
            log.warning("flexkv wait for task %d failed: %s", task_id, e)
            return KVResponse(TaskStatus.TIMEOUT, task_id, None, str(e))

    def _abandon(self, restore: _Restore) -> None:
        """Give up on a restore; its pages come back only once the task can no longer write them."""
        final = restore.final
        self._release(restore.pages, final if final not in (None, TaskStatus.TIMEOUT) else self._wait(restore.task_id))

    def _release(self, pages: list[int], status: TaskStatus) -> None:
        if status in (TaskStatus.TIMEOUT, TaskStatus.UNREADY):
            self.num_quarantined_pages += len(pages)  # its copy may still run: never reuse these pages
            log.warning("quarantined %d pages of a task that did not finish", len(pages))
        else:
            self.pool.free(pages)

    def _start_put(self, tokens: torch.Tensor, cache: DynamicCache, restore: _Restore | None) -> PendingPut | None:
        t = self.tokens_per_block
        num_blocks = tokens.numel() // t
        have = restore.pages if restore is not None else []
        if self.kvm is None or num_blocks <= len(have):
            if restore is not None:
                self.pool.free(restore.pages)
            return None
        if not self.pool.can_allocate(num_blocks - len(have)):
            self.pool.free(have)
            return None
        new = self.pool.allocate(num_blocks - len(have))
        begin, end = len(have) * t, num_blocks * t
        index = self.pool.page_index(new)
        for layer in range(self.num_layers):
            key, value = layer_kv(cache, layer)
            self.pool.write_layer(layer, index, key[:, :, begin:end], value[:, :, begin:end])
        if self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)  # the worker's D2H must see the pages written
        pages = have + new
        try:
            task_id = self.kvm.put_async(tokens[:end].numpy(), self.pool.slot_mapping(pages, end),
                                         namespace=self.namespace)
        except FlexKVError as e:
            log.warning("flexkv put failed: %s", e)
            self.pool.free(pages)
            return None
        return PendingPut(task_id, pages)

    def finish_put(self, put: PendingPut | None) -> None:
        """Wait for ``put`` (completely, with ``put_completely``) and free its pages."""
        if put is not None:
            self._release(put.pages, self._wait(put.task_id, self.put_completely))
