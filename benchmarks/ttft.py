"""Time to first token of the HF engine with flexkv (issue 14 §4): Llama-3-8B shape, random weights, bf16, SDPA.

Part 1, per prompt length (default 2K, 8K, 32K tokens):
* recompute: the whole prompt prefilled, nothing cached;
* cached: the whole prompt but its last block restored from flexkv's CPU tier, one block computed;
* 50% / 90% cached, without and with layer-wise restores (the suffix's layer i runs once layer i
  landed), beside the restore alone and the suffix compute: the layer-wise goal is max(restore, suffix);
* restore: get_match + launch + wait of the cached prefix into the engine's pages, beside its bytes over
  the contiguous pinned host -> device copy measured in this run (the ceiling).
Two DP clients share one server: DP 0 registers its pages layer-wise, DP 1 plainly, so "without
layer-wise" rows copy whole ops exactly as an engine that never asked for layers would. Part 1 runs once
per ``--copies``: the copies made by the ranks' device worker processes (CUDA IPC), or by engine-side
lanes in this process (its CUDA context: the copies overlap the model's kernels instead of
time-slicing the GPU with another process's context).

Part 2, a multi-turn replay of the first N multi-request conversations of the Mooncake trace
(../shared/traces/conversation_trace.jsonl; a conversation = requests sharing at least two leading
512-token ids with an earlier request of it; token j of id b drawn from a generator seeded by b, so
equal ids give equal tokens and distinct ids distinct ones; prompts capped at --max-prompt tokens):
TTFT p50/p99 and hit rate without flexkv and with it, twice, each on a fresh server: the engine's cost
check off (every match restored) and on (only what loads faster than it recomputes: the CPU prefix
alone when the SSD part is slow, or nothing; docs/hf_engine.md), the CPU tier sized below the replay's
data so some turns come back from the SSD tier (when this machine has io_uring; else CPU only, said so).

    python benchmarks/ttft.py                  # the H200 run (~3 min; prints progress)
    python benchmarks/ttft.py --tiny           # CPU, a tiny random Llama: checks the script end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexkv import native
from flexkv.common.config import CacheConfig
from flexkv.integration.hf import HFPagedEngine, PagedKVPool, flexkv_model_config, llama3_8b_config, random_model
from flexkv.integration.hf.cost import RestoreChoice
from flexkv.integration.hf.models import kv_shape, tiny_llama_config
from flexkv.kvmanager import KVManager
from flexkv.layout import BlockFirstLayout
from flexkv.types import TaskStatus

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "../shared/traces/conversation_trace.jsonl"
ID_TOKENS = 512
COPIES = {"worker": "the rank's device worker process (CUDA IPC)",
          "lane": "an engine-side lane in the engine process (its own CUDA context)"}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@dataclasses.dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    tokens_per_block: int
    lengths: list[int]
    repeats: int
    model: Any
    vocab: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- stack
class Stack:
    """One flexkv server; DP 0 = pages registered layer-wise, DP 1 (optional) = plain pages."""

    def __init__(self, s: Setup, cache: CacheConfig, num_pages: int, plain_client: bool,
                 engine_side: bool = False) -> None:
        self.s = s
        layers, heads, head_dim = kv_shape(s.model.config)
        mc = dataclasses.replace(flexkv_model_config(s.model.config, s.dtype), dp_size=2 if plain_client else 1)
        self.pools = [PagedKVPool(layers, heads, head_dim, num_pages, s.tokens_per_block, s.dtype, s.device)
                      for _ in range(2 if plain_client else 1)]
        self.kvms = [KVManager(mc, cache, start_timeout_s=300)]
        self.kvms[0].start()
        if plain_client:
            self.kvms.append(KVManager(mc, cache, server_address=self.kvms[0].server_address, dp_client_id=1))
            self.kvms[1].start()
        device_id = s.device.index or 0
        for i, (kvm, pool) in enumerate(zip(self.kvms, self.pools, strict=True)):
            kvm.register_kv_buffers(pool.register_with(), pool.layout, device_id=device_id, layerwise=i == 0,
                                    engine_side=engine_side)
        self.kvms[0].wait_ready(300)
        # Part 1 measures the restore path itself: every match is restored (no cost check).
        self.layerwise = HFPagedEngine(s.model, self.pools[0], self.kvms[0], layerwise=True, cost_check=False)
        # the same with the 16-token suffix as one CUDA graph per layer (flexkv_sdpa only: it takes no mask)
        graphs = s.model.config._attn_implementation == "flexkv_sdpa"
        self.graphed = HFPagedEngine(s.model, self.pools[0], self.kvms[0], layerwise=True, cost_check=False,
                                     cuda_graphs=True, graph_capture_after=1) if graphs else None
        self.graphed_whole = HFPagedEngine(s.model, self.pools[-1], self.kvms[-1], layerwise=False, cost_check=False,
                                           cuda_graphs=True, graph_capture_after=1) if graphs else None
        self.plain = HFPagedEngine(s.model, self.pools[-1], self.kvms[-1], layerwise=False, cost_check=False)
        self.recompute = HFPagedEngine(s.model, self.pools[-1], None)

    def close(self) -> None:
        for eng in (self.layerwise, self.plain, self.recompute, self.graphed, self.graphed_whole):
            if eng is not None:
                eng.close()
        for kvm in reversed(self.kvms):
            kvm.shutdown()
        for pool in self.pools:
            pool.close()


def ttft(engine: HFPagedEngine, tokens: torch.Tensor) -> Any:
    """One prompt, the first token only; returns the engine's TurnStats."""
    _, stats = engine.generate(tokens, 1)
    synchronize(engine.pool.device)
    return stats


def restore_s(stack: Stack, tokens: torch.Tensor, dp: int = -1) -> float:
    """get_match_launch + wait (the engine's restore without its cost check) of the cached whole blocks of
    ``tokens`` into DP 1's pages (plain ops), or with ``dp=0`` into DP 0's (a rank with a progress table: the
    wait ends when its table says every layer landed, without the worker -> server -> client round;
    docs/layerwise.md)."""
    kvm, pool, t = stack.kvms[dp], stack.pools[dp], stack.s.tokens_per_block
    t0 = time.perf_counter()
    pages = pool.allocate(tokens.numel() // t)
    tid, mask = kvm.get_match_launch(tokens.numpy(), pool.slot_mapping(pages, tokens.numel() // t * t))
    num = int(mask.sum())
    if num == 0:
        kvm.cancel(tid)  # an empty match is not launched
    status = kvm.wait(tid, timeout=120)[tid].status
    elapsed = time.perf_counter() - t0
    pool.free(pages)
    if status is not TaskStatus.SUCCESS or num != tokens.numel() // t * t:
        raise RuntimeError(f"restore of {tokens.numel()} tokens: {status.name}, {num} tokens matched")
    return elapsed


def layer_landing_s(stack: Stack, tokens: torch.Tensor) -> list[float]:
    """A layer-wise restore of the cached whole blocks of ``tokens`` into DP 0's pages: seconds from
    get_match_launch to each layer's ``wait_layer`` returning."""
    kvm, pool, t = stack.kvms[0], stack.pools[0], stack.s.tokens_per_block
    t0 = time.perf_counter()
    pages = pool.allocate(tokens.numel() // t)
    tid, mask = kvm.get_match_launch(tokens.numpy(), pool.slot_mapping(pages, tokens.numel() // t * t),
                                     layerwise=True)
    if not mask.all():
        kvm.cancel(tid)  # (nothing launched unless something matched; a launched task ignores the cancel)
        kvm.wait(tid, timeout=120)
        pool.free(pages)
        raise RuntimeError(f"layer-wise restore of {tokens.numel()} tokens: only {int(mask.sum())} matched")
    landed = []
    try:
        for layer in range(stack.layerwise.num_layers):
            resp = kvm.wait_layer(tid, layer, timeout=120)
            if resp.status is not TaskStatus.SUCCESS:
                raise RuntimeError(f"layer {layer} of a layer-wise restore: {resp.status.name} {resp.error}")
            landed.append(time.perf_counter() - t0)
    finally:
        kvm.wait(tid, timeout=120)
        pool.free(pages)
    return landed


def landing_under_load_s(stack: Stack, tokens: torch.Tensor, kind: str) -> float:
    """:func:`layer_landing_s`'s last layer while this process keeps the GPU busy on another stream:
    ``gemm`` (bf16 8192^2 matmuls: compute-bound) or ``copy`` (a 1 GiB device copy: memory-bound)."""
    device, stop = stack.s.device, threading.Event()
    ready = threading.Event()

    def load() -> None:
        with torch.cuda.stream(torch.cuda.Stream(device)):
            if kind == "gemm":
                a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

                def work() -> None:
                    torch.mm(a, a)
            else:
                src = torch.empty(2**30, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)

                def work() -> None:
                    dst.copy_(src)
            ready.set()
            while not stop.is_set():
                for _ in range(4):
                    work()
                torch.cuda.current_stream().synchronize()

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    ready.wait(30)
    time.sleep(0.05)
    try:
        return layer_landing_s(stack, tokens)[-1]
    finally:
        stop.set()
        thread.join()


def ceiling_s(nbytes: int, device: torch.device, repeats: int = 3) -> float:
    """The fastest contiguous copy of ``nbytes`` into the engine's memory: pinned host -> GPU (or memcpy)."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return best


def random_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------- part 1
@dataclasses.dataclass
class LengthRow:
    length: int
    recompute_ms: float
    cached_ms: float
    restored_tokens: int
    restore_ms: float
    restore_bytes: int
    ceiling_ms: float
    fractions: list[tuple[float, float, float, float, float]]  # frac, plain ms, layerwise ms, restore ms, suffix ms
    cached_lw_ms: float = 0.0  # all but the last block cached, layer-wise restore
    landing_ms: list[float] = dataclasses.field(default_factory=list)  # per layer, a layer-wise restore
    under_load_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # load kind -> last layer landed
    profiles: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # case -> phase -> s
    restore_landing_ms: float = 0.0  # the restore alone into DP 0's pages: its wait ends from the progress table
    cached_graphs_ms: float = 0.0  # layer-wise with the suffix as CUDA graphs (0: not run)
    cached_graphs_whole_ms: float = 0.0  # the whole restore first, then the suffix as CUDA graphs
    graph_logits_diff: float = 0.0  # max |logits| difference, graphs vs the model's forward, same prompt
    graph_capture_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # case -> first prefill of the shape


def profiled(engine: HFPagedEngine, tokens: torch.Tensor) -> dict[str, float]:
    """One more prefill of ``tokens`` with the engine's phase profile on (device synchronized between phases)."""
    engine.profile = True
    try:
        st = ttft(engine, tokens)
    finally:
        engine.profile = False
    return {**st.phases, "ttft": st.ttft_s}


def measure_length(stack: Stack, length: int, seed: int) -> LengthRow:
    s, t = stack.s, stack.s.tokens_per_block
    block_bytes = BlockFirstLayout(flexkv_model_config(s.model.config, s.dtype), t).block_bytes
    prompt = random_tokens(length, s.vocab, seed)
    ttft(stack.recompute, prompt)  # warm-up at this length
    recompute = [ttft(stack.recompute, prompt).ttft_s for _ in range(s.repeats)]
    say(f"{length}: recompute {1e3 * median(recompute):.1f} ms")

    first = ttft(stack.plain, prompt)  # computes and stores every whole block
    assert first.num_restored_tokens == 0, first
    cached, restored = [], 0
    for _ in range(s.repeats):
        st = ttft(stack.plain, prompt)
        assert not st.fallback, st
        cached.append(st.ttft_s)
        restored = st.num_restored_tokens
    cached_lw = []
    for _ in range(s.repeats):
        st = ttft(stack.layerwise, prompt)
        assert not st.fallback and st.num_restored_tokens == restored, st
        cached_lw.append(st.ttft_s)
    cached_graphs: list[float] = []
    cached_graphs_whole: list[float] = []
    capture_ms: dict[str, float] = {}
    graph_diff = 0.0
    if stack.graphed is not None and stack.graphed_whole is not None:
        logits_eager = stack.layerwise.prefill(prompt)
        stack.layerwise.finish_put(logits_eager[3])
        for name, engine, out in (("layer-wise", stack.graphed, cached_graphs),
                                  ("whole", stack.graphed_whole, cached_graphs_whole)):
            synchronize(s.device)
            t0 = time.perf_counter()
            warm = engine.prefill(prompt)  # captures this shape's graphs
            synchronize(s.device)
            capture_ms[name] = 1e3 * (time.perf_counter() - t0)
            engine.finish_put(warm[3])
            assert engine.graphs is not None, "the engine turned CUDA graphs off (its warning says why)"
            graph_diff = max(graph_diff, float((warm[0] - logits_eager[0]).abs().max()))
            for _ in range(s.repeats):
                st = ttft(engine, prompt)
                assert not st.fallback and st.num_restored_tokens == restored, st
                out.append(st.ttft_s)
    profiles = {"cached": profiled(stack.plain, prompt), "cached, layer-wise": profiled(stack.layerwise, prompt),
                "recompute": profiled(stack.recompute, prompt)}
    if stack.graphed is not None and stack.graphed_whole is not None:
        profiles["cached, layer-wise, graphs"] = profiled(stack.graphed, prompt)
        profiles["cached, whole, graphs"] = profiled(stack.graphed_whole, prompt)
    whole = prompt[: (length - 1) // t * t]
    restores = [restore_s(stack, whole) for _ in range(s.repeats)]
    restores_landing = [restore_s(stack, whole, dp=0) for _ in range(s.repeats)]
    nbytes = whole.numel() // t * block_bytes
    landing = min((layer_landing_s(stack, whole) for _ in range(s.repeats)), key=lambda xs: xs[-1])
    under_load = {}
    if s.device.type == "cuda" and length == max(s.lengths):
        under_load = {kind: 1e3 * min(landing_under_load_s(stack, whole, kind) for _ in range(s.repeats))
                      for kind in ("gemm", "copy")}
    ceiling = ceiling_s(nbytes, s.device)
    say(f"{length}: cached {1e3 * median(cached):.1f} ms, layer-wise {1e3 * median(cached_lw):.1f} ms "
        f"({restored} tokens restored), restore "
        f"{1e3 * median(restores):.1f} ms vs ceiling {1e3 * ceiling:.1f} ms")

    fractions = []
    for frac in (0.5, 0.9):
        num_cached = int(length * frac) // t * t
        base = prompt[:num_cached]
        ttft(stack.plain, torch.cat([base, random_tokens(1, s.vocab, seed + 1)]))  # stores the prefix
        plain: list[float] = []
        layer: list[float] = []
        suffix: list[float] = []
        for r in range(s.repeats):
            for k, (engine, out) in enumerate(((stack.plain, plain), (stack.layerwise, layer))):
                tail = random_tokens(length - num_cached, s.vocab, seed + 1000 * (r + 1) + 100 * k + int(10 * frac))
                st = ttft(engine, torch.cat([base, tail]))  # a fresh suffix: exactly the prefix is cached
                assert st.num_restored_tokens == num_cached and not st.fallback, st
                out.append(st.ttft_s)
                if engine is stack.plain:
                    suffix.append(st.ttft_s - st.restore_wait_s)
        for name, engine in (("plain", stack.plain), ("layer-wise", stack.layerwise)):
            tail = random_tokens(length - num_cached, s.vocab, seed + 7777 + int(10 * frac))
            profiles[f"{frac:.0%} cached, {name}"] = profiled(engine, torch.cat([base, tail]))
        rest = median([restore_s(stack, base) for _ in range(s.repeats)])
        fractions.append((frac, 1e3 * median(plain), 1e3 * median(layer), 1e3 * rest, 1e3 * median(suffix)))
        say(f"{length}: {frac:.0%} cached: plain {fractions[-1][1]:.1f} ms, layer-wise {fractions[-1][2]:.1f} ms")
    return LengthRow(length, 1e3 * median(recompute), 1e3 * median(cached), restored, 1e3 * median(restores),
                     nbytes, 1e3 * ceiling, fractions, 1e3 * median(cached_lw), [1e3 * x for x in landing], under_load,
                     profiles, restore_landing_ms=1e3 * median(restores_landing),
                     cached_graphs_ms=1e3 * median(cached_graphs) if cached_graphs else 0.0,
                     cached_graphs_whole_ms=1e3 * median(cached_graphs_whole) if cached_graphs_whole else 0.0,
                     graph_logits_diff=graph_diff, graph_capture_ms=capture_ms)


def print_part1(rows: list[LengthRow], s: Setup) -> None:
    goals = {8192: 10.0, 32768: 14.0}
    print("\n== TTFT, whole prompt but its last block cached (recompute / cached = speedup), whole and layer-wise")
    print("   (graphs: layer-wise with the suffix as one CUDA graph per layer; whole+g: the whole restore, then "
          "the graphs; diff: max |logits| of either against the model's forward, same prompt)")
    print(f"{'tokens':>7} {'recompute ms':>12} {'cached ms':>10} {'speedup':>8} {'layer-wise ms':>13} {'speedup':>8} "
          f"{'graphs ms':>9} {'speedup':>8} {'whole+g ms':>10} {'speedup':>8} {'diff':>8} {'goal':>6}")
    for r in rows:
        goal = goals.get(r.length)
        none = f"{'-':>9} {'-':>8} {'-':>10} {'-':>8} {'-':>8}"
        graphs = (f"{r.cached_graphs_ms:>9.1f} {r.recompute_ms / r.cached_graphs_ms:>7.1f}x "
                  f"{r.cached_graphs_whole_ms:>10.1f} {r.recompute_ms / r.cached_graphs_whole_ms:>7.1f}x "
                  f"{r.graph_logits_diff:>8.2g}") if r.cached_graphs_ms else none
        print(f"{r.length:>7} {r.recompute_ms:>12.1f} {r.cached_ms:>10.1f} {r.recompute_ms / r.cached_ms:>7.1f}x "
              f"{r.cached_lw_ms:>13.1f} {r.recompute_ms / r.cached_lw_ms:>7.1f}x {graphs} "
              f"{(f'{goal:.0f}x') if goal else '-':>6}")
    for r in rows:
        if r.graph_capture_ms:
            print(f"   {r.length}: the first graphed prefill of this shape (restore + capture of its graphs): "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in r.graph_capture_ms.items()))
    what = "pinned H2D" if s.device.type == "cuda" else "memcpy"
    print(f"\n== restore alone (get_match_launch + wait) vs the same bytes at the {what} ceiling (goal <= 1.15x)")
    print("   (landing: into a rank registered layer-wise, whose wait ends from its progress table)")
    print(f"{'tokens':>7} {'GiB':>6} {'restore ms':>10} {'ceiling ms':>10} {'GB/s':>6} {'ceiling GB/s':>12} "
          f"{'ratio':>6} {'landing ms':>10} {'ratio':>6}")
    for r in rows:
        gb = r.restore_bytes / 1e9
        print(f"{r.restored_tokens:>7} {r.restore_bytes / 2**30:>6.2f} {r.restore_ms:>10.2f} {r.ceiling_ms:>10.2f} "
              f"{gb / (r.restore_ms / 1e3):>6.1f} {gb / (r.ceiling_ms / 1e3):>12.1f} "
              f"{r.restore_ms / r.ceiling_ms:>5.2f}x {r.restore_landing_ms:>10.2f} "
              f"{r.restore_landing_ms / r.ceiling_ms:>5.2f}x")
    print("\n== a layer-wise restore of the same bytes: ms from get_match until layer i landed (the best of the "
          "repeats), beside the ceiling's share of the bytes up to that layer")
    for r in rows:
        n = len(r.landing_ms)
        marks = sorted({0, 1, n // 4, n // 2, n - 1})
        print(f"{r.restored_tokens:>7} " + ", ".join(
            f"layer {i}: {r.landing_ms[i]:.1f} ({r.ceiling_ms * (i + 1) / n:.1f})" for i in marks))
        if r.under_load_ms:
            print(f"{'':>7} the same with this process keeping the GPU busy on another stream, last layer: " +
                  ", ".join(f"{k} {v:.1f} ms" for k, v in r.under_load_ms.items()))
    print("\n== partly cached: TTFT without / with layer-wise vs max(restore, suffix compute) (goal at 32K: <= 1.1x)")
    print(f"{'tokens':>7} {'cached':>6} {'plain ms':>9} {'layerwise ms':>12} {'restore ms':>10} {'suffix ms':>9} "
          f"{'max ms':>7} {'lw/max':>6}")
    for r in rows:
        for frac, plain, layer, rest, suffix in r.fractions:
            top = max(rest, suffix)
            print(f"{r.length:>7} {frac:>6.0%} {plain:>9.1f} {layer:>12.1f} {rest:>10.1f} {suffix:>9.1f} {top:>7.1f} "
                  f"{layer / top:>5.2f}x")
    print("\n== where the time goes: one profiled prefill per case, ms (the device synchronized between phases of a "
          "whole restore; match = get_match + launch)")
    for r in rows:
        for case, ph in r.profiles.items():
            parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in ph.items())
            print(f"{r.length:>7} {case:<24} {parts}")


# ---------------------------------------------------------------------------------------------- part 2
def conversations(path: Path, count: int) -> list[dict[str, Any]]:
    """The requests of the first ``count`` conversations with more than one request, in trace order."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["timestamp"])
    owner: dict[tuple[int, ...], int] = {}
    members: list[list[int]] = []
    for i, r in enumerate(rows):
        ids = tuple(r["hash_ids"])
        conv = next((owner[ids[:k]] for k in range(len(ids), 1, -1) if ids[:k] in owner), None)
        if conv is None:
            conv = len(members)
            members.append([])
        members[conv].append(i)
        for k in range(2, len(ids) + 1):
            owner.setdefault(ids[:k], conv)
    chosen = [m for m in members if len(m) > 1][:count]
    keep = sorted(i for m in chosen for i in m)
    conv_of = {i: c for c, m in enumerate(chosen) for i in m}
    return [{**rows[i], "conversation": conv_of[i]} for i in keep]


def trace_tokens(row: dict[str, Any], vocab: int, max_tokens: int) -> torch.Tensor:
    parts = [np.random.default_rng(b).integers(0, vocab, ID_TOKENS, dtype=np.int64) for b in row["hash_ids"]]
    n = min(row["input_length"], max_tokens)
    return torch.from_numpy(np.concatenate(parts)[:n].copy())


def replay(s: Setup, requests: list[dict[str, Any]], max_tokens: int, cpu_bytes: int, ssd_dir: str | None,
           ssd_bytes: int) -> None:
    """The replay twice, on a fresh server (and a fresh SSD directory) each time: flexkv with the
    engine's cost check off (every match restored) and on (restore only what loads faster than it
    recomputes; the engine calibrates its prefill cost first). Recompute runs beside flexkv in both passes
    (each prompt: recompute, then flexkv), so each policy is compared with the recompute of its own pass
    (a shared machine's load drifts)."""
    block_bytes = BlockFirstLayout(flexkv_model_config(s.model.config, s.dtype), s.tokens_per_block).block_bytes
    prompts = [trace_tokens(r, s.vocab, max_tokens) for r in requests]
    total_blocks = sum(p.numel() // s.tokens_per_block for p in prompts)
    say(f"replay: {len(requests)} requests of {len({r['conversation'] for r in requests})} conversations, "
        f"{sum(p.numel() for p in prompts)} prompt tokens ({total_blocks} blocks); CPU tier "
        f"{cpu_bytes // block_bytes} blocks, SSD tier {ssd_bytes // block_bytes if ssd_dir else 'off (no io_uring)'}")
    results: dict[str, list[Any]] = {}
    counters: dict[str, dict[str, Any]] = {}
    for policy in ("cost check off", "cost check on"):
        sub = None if ssd_dir is None else os.path.join(ssd_dir, policy.replace(" ", "-"))
        recompute: list[Any] = []
        flexkv, counters[policy] = replay_once(s, prompts, cpu_bytes, block_bytes, sub, ssd_bytes,
                                               policy.endswith("on"), recompute)
        results[f"recompute ({policy.split()[-1]})"] = recompute
        results[f"flexkv, {policy}"] = flexkv
    print(f"\n== multi-turn replay of {len(requests)} trace requests (TTFT; hit rate = restored / prompt tokens; "
          "choices of the cost check: all / CPU prefix only / recompute; vs recompute = p50 over the p50 of the "
          "recompute run beside it)")
    print(f"{'':>24} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'hit rate':>8} {'matched':>8} {'fallback':>8} "
          f"{'choices':>10} {'vs recompute':>12}")
    p50_beside = 0.0
    for name, sts in results.items():
        xs = sorted(1e3 * st.ttft_s for st in sts)
        tokens = sum(st.num_prompt_tokens for st in sts)
        hit = sum(st.num_restored_tokens for st in sts) / tokens
        matched = sum(st.num_matched_tokens for st in sts) / tokens
        p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
        is_recompute = name.startswith("recompute")
        choices = "/".join(str(sum(1 for st in sts if st.choice is c)) for c in RestoreChoice)
        if is_recompute:
            p50_beside = median(xs)
        print(f"{name:>24} {median(xs):>8.1f} {p99:>8.1f} {statistics.fmean(xs):>8.1f} {hit:>8.1%} {matched:>8.1%} "
              f"{sum(1 for st in sts if st.fallback and st.fallback != 'no flexkv'):>8} "
              f"{'-' if is_recompute else choices:>10} "
              f"{'-' if is_recompute else f'{median(xs) / p50_beside:.2f}x':>12}")
    for name, c in counters.items():
        print(f"flexkv, {name}: CPU tier {c.get('cpu_evicted_blocks', 0)} blocks evicted, SSD tier "
              f"{c.get('ssd_used_blocks', 'off')} blocks held, {c.get('get_hit_blocks_ssd', 0)} SSD blocks matched; "
              f"read rates at the end: CPU {c.get('read_bps_cpu', 0) / 1e9:.1f} GB/s, SSD "
              f"{c.get('read_bps_ssd', 0) / 1e9:.2f} GB/s ({c.get('read_samples_ssd', 0)} reads measured)")


def replay_once(s: Setup, prompts: list[torch.Tensor], cpu_bytes: int, block_bytes: int, ssd_dir: str | None,
                ssd_bytes: int, cost_check: bool, recompute: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """One pass of the replay on a fresh server: each prompt recomputed (appended to ``recompute``), then
    through flexkv; returns flexkv's TurnStats and the server's stats at the end."""
    cache_kw: dict[str, Any] = {}
    if ssd_dir is not None:
        shutil.rmtree(ssd_dir, ignore_errors=True)  # our own subdirectory: a cold start, never an old index
        os.makedirs(ssd_dir)
        cache_kw = {"enable_ssd": True, "num_ssd_blocks": ssd_bytes // block_bytes, "ssd_cache_dir": (ssd_dir,)}
    cache = CacheConfig(tokens_per_block=s.tokens_per_block, num_cpu_blocks=cpu_bytes // block_bytes, **cache_kw)
    num_pages = max(p.numel() for p in prompts) // s.tokens_per_block + 8
    stack = Stack(s, cache, num_pages, plain_client=False)
    out: list[Any] = []
    engine = HFPagedEngine(s.model, stack.pools[0], stack.kvms[0], layerwise=True, cost_check=cost_check)
    try:
        ttft(stack.recompute, prompts[0][:256])  # warm-up
        if cost_check:
            t0 = time.perf_counter()
            engine.calibrate_cost(max(p.numel() for p in prompts))
            say(f"replay: cost check calibrated in {time.perf_counter() - t0:.1f} s")
        for i, p in enumerate(prompts):
            recompute.append(ttft(stack.recompute, p))
            out.append(ttft(engine, p))
            if (i + 1) % 8 == 0 or i + 1 == len(prompts):
                say(f"replay ({'cost check on' if cost_check else 'cost check off'}): {i + 1}/{len(prompts)} requests")
        counters = stack.kvms[0].stats()
    finally:
        engine.close()
        stack.close()
        if ssd_dir is not None:
            shutil.rmtree(ssd_dir, ignore_errors=True)  # the next pass starts cold (and the disk has room)
    return out, counters


# ---------------------------------------------------------------------------------------------- main
def setup(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        config = tiny_llama_config(args.attention, num_layers=4, vocab_size=1024, hidden_size=128, num_heads=4,
                                   num_kv_heads=2)
    else:
        config = llama3_8b_config(args.attention, max_position_embeddings=max(65536, 2 * max(args.lengths)))
    say(f"building a random {'tiny Llama' if args.tiny else 'Llama-3-8B'} on {device} ({dtype}, attention "
        f"{config._attn_implementation})")
    model = random_model(config, dtype, seed=0, device=device)
    synchronize(device)
    return Setup(device, dtype, args.tokens_per_block, args.lengths, args.repeats, model, config.vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on the CPU (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (default 2K 8K 32K)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--attention", default="flexkv_sdpa", choices=["flexkv_sdpa", "sdpa", "eager"],
                    help="the model's attention (default flexkv_sdpa: SDPA with a lower-right causal bias, so a "
                         "suffix over a cached prefix takes the flash kernel; sdpa = transformers' own)")
    ap.add_argument("--cpu-gb", type=float, default=None, help="CPU tier of part 1 (default: 12, tiny: 0.25)")
    ap.add_argument("--conversations", type=int, default=None, help="trace conversations (default 12, tiny 4)")
    ap.add_argument("--max-prompt", type=int, default=None, help="trace prompts are cut here (default 32K, tiny 1K)")
    ap.add_argument("--replay-cpu-gb", type=float, default=None, help="CPU tier of the replay (default 6, tiny 0.003)")
    ap.add_argument("--replay-ssd-gb", type=float, default=None, help="SSD tier of the replay (default 24, tiny 1)")
    ap.add_argument("--ssd-dir", default=None, help="SSD tier directory of the replay (default: a temp dir in /tmp)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--skip-lengths", action="store_true")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for this process (how soon a lane thread gets the GIL from the "
                         "model's thread; Python's default is 5 ms)")
    ap.add_argument("--copies", nargs="+", choices=sorted(COPIES), default=["lane", "worker"],
                    help="part 1 once per choice: " + "; ".join(f"{k} = {v}" for k, v in COPIES.items()))
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.lengths = args.lengths or ([128, 512] if tiny else [2048, 8192, 32768])
    cpu_gb = args.cpu_gb or (0.25 if tiny else 12.0)
    if not tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny on a CPU machine")
    torch.set_grad_enabled(False)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    s = setup(args)
    if not args.skip_lengths:
        block_bytes = BlockFirstLayout(flexkv_model_config(s.model.config, s.dtype), s.tokens_per_block).block_bytes
        cache = CacheConfig(tokens_per_block=s.tokens_per_block, num_cpu_blocks=int(cpu_gb * 2**30) // block_bytes)
        num_pages = max(s.lengths) // s.tokens_per_block + 8
        say(f"part 1: server with {cache.num_cpu_blocks} CPU blocks ({cpu_gb} GiB), 2 x {num_pages} engine pages")
        for copies in args.copies:
            say(f"part 1, copies by {COPIES[copies]}")
            stack = Stack(s, cache, num_pages, plain_client=True, engine_side=copies == "lane")
            try:
                rows = [measure_length(stack, n, seed=n) for n in s.lengths]
            finally:
                stack.close()
            print(f"\n######## copies by {COPIES[copies]}")
            print_part1(rows, s)
    if not args.skip_replay:
        requests = conversations(args.trace, args.conversations or (4 if tiny else 12))
        max_prompt = args.max_prompt or (1024 if tiny else 32768)
        cpu = int((args.replay_cpu_gb or (0.003 if tiny else 6.0)) * 2**30)
        ssd = int((args.replay_ssd_gb or (1.0 if tiny else 24.0)) * 2**30)
        ssd_built = native.built("uring")
        if args.ssd_dir is not None or not ssd_built:
            replay(s, requests, max_prompt, cpu, args.ssd_dir if ssd_built else None, ssd)
        else:
            with tempfile.TemporaryDirectory(prefix="flexkv-ttft-ssd-", dir="/tmp") as d:
                replay(s, requests, max_prompt, cpu, d, ssd)
    say("done")


if __name__ == "__main__":
    main()
