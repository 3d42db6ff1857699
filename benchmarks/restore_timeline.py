"""Where the time of one layer-wise restore goes, restore by restore (issue 14: the 8K TTFT).

The HF engine's pool (Llama-3-8B shape by default: 32 layers, 8 KV heads of 128, bf16, 16 tokens a page)
is registered layer-wise with one server; the prompt's blocks are stored once, then restored ``--repeats``
times exactly as the engine restores them (get_match, launch(layerwise=True), wait_layer for every layer),
with the hop trace on (flexkv/hoptrace.py) and the per-layer marks of the device worker. Per restore it
prints, in ms since get_match was called: the match's reply, the launch sent, the server's launch and
dispatch, the worker's receipt, each layer's enqueue returning (``enq``) and its landing published
(``pub``) for layers 0, 1, L/2 and L-1, and the engine's wait for the last layer. Then the spread of each
over the restores, the whole restore (plain ``wait``) of the same blocks beside it, and the pinned
host -> device ceiling of the bytes, measured in the same run.

    python benchmarks/restore_timeline.py --tokens 8192 --repeats 20 --copies lane worker
    python benchmarks/restore_timeline.py --tiny          # CPU, host buffers: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from ttft import ceiling_s  # the same pinned host -> device ceiling ttft.py measures (this directory)

from flexkv import hoptrace
from flexkv.common.config import CacheConfig
from flexkv.integration.hf.models import flexkv_model_config, kv_shape, llama3_8b_config, tiny_llama_config
from flexkv.integration.hf.pool import PagedKVPool
from flexkv.kvmanager import KVManager
from flexkv.layout import BlockFirstLayout
from flexkv.types import TaskStatus


def say(msg: str) -> None:
    print(f"[restore_timeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# name, layer-wise, get_match_launch
CASES = (("layer-wise restores, get_match then launch", True, False),
         ("whole restores, get_match then launch", False, False),
         ("layer-wise restores, get_match_launch", True, True),
         ("whole restores, get_match_launch", False, True))


@dataclasses.dataclass
class Run:
    marks: dict[str, float]  # name -> ms since get_match was called


def restore_once(kvm: KVManager, pool: PagedKVPool, tokens: np.ndarray, layers: int, layerwise: bool,
                 merged: bool) -> Run:
    """One restore of ``tokens`` (all cached): get_match then launch, or (``merged``) get_match_launch."""
    t = pool.tokens_per_page
    t0 = time.monotonic_ns()
    if merged:
        pages = pool.allocate(tokens.size // t)
        tid, mask = kvm.get_match_launch(tokens, pool.slot_mapping(pages, tokens.size), layerwise=layerwise)
        t1 = t2 = time.monotonic_ns()
        num = int(mask.sum())
    else:
        tid, mask = kvm.get_match(tokens)
        t1 = time.monotonic_ns()
        num = int(mask.sum())
        pages = pool.allocate(num // t)
    if num != tokens.size // t * t:
        raise RuntimeError(f"{num} of {tokens.size} tokens matched: the prompt is not cached")
    if not merged:
        kvm.launch(tid, pool.slot_mapping(pages, num), layerwise=layerwise)
        t2 = time.monotonic_ns()
    waits = {}
    try:
        if layerwise:
            for layer in range(layers):
                resp = kvm.wait_layer(tid, layer, timeout=120)
                if resp.status is not TaskStatus.SUCCESS:
                    raise RuntimeError(f"layer {layer}: {resp.status.name} {resp.error}")
                waits[layer] = time.monotonic_ns()
        status = kvm.wait(tid, timeout=120)[tid].status
        if status is not TaskStatus.SUCCESS:
            raise RuntimeError(f"restore: {status.name}")
        t3 = time.monotonic_ns()
    finally:
        pool.free(pages)
    marks = {"matched": t1, "launched": t2, "waited": t3}
    for layer, ns in waits.items():
        marks[f"wait{layer}"] = ns
    return Run({k: (v - t0) / 1e6 for k, v in marks.items()} | {"_tid": tid, "_t0": t0})


def attach_hops(runs: list[Run], directory: str) -> None:
    hoptrace.flush()
    time.sleep(0.2)
    traced = hoptrace.load(directory)
    for run in runs:
        hops = traced.get(int(run.marks["_tid"]), {})
        for hop, ns in hops.items():
            run.marks[hop] = (ns - run.marks["_t0"]) / 1e6


def show(title: str, runs: list[Run], layers: int) -> None:
    spans = sorted({int(k[3:]) for r in runs for k in r.marks if k.startswith("enq")})
    shown = sorted({spans[0], spans[1], spans[len(spans) // 2], spans[-1]}) if len(spans) > 3 else spans
    cols = ["matched", "launched", "server_launch", "server_dispatched", "worker_received", "copy_started"]
    cols += [f"{kind}{i}" for i in shown for kind in ("enq", "pub")] + [f"wait{layers - 1}", "waited"]
    cols = [c for c in cols if any(c in r.marks for r in runs)]
    say(title + " (ms since get_match was called; enqN/pubN: layer N enqueued / its landing published)")
    print("  run " + "".join(f"{c[:12]:>13}" for c in cols))
    for i, r in enumerate(runs):
        print(f"  {i:3d} " + "".join(f"{r.marks[c]:13.2f}" if c in r.marks else f"{'-':>13}" for c in cols))
    print("  p50 " + "".join(f"{statistics.median([r.marks[c] for r in runs if c in r.marks]):13.2f}" for c in cols))
    print("  min " + "".join(f"{min(r.marks[c] for r in runs if c in r.marks):13.2f}" for c in cols))
    print("  max " + "".join(f"{max(r.marks[c] for r in runs if c in r.marks):13.2f}" for c in cols))
    enq = []  # per restore, the time each layer-major call took to enqueue (the calls are the enq marks)
    for r in runs:
        ends = [r.marks[f"enq{i}"] for i in range(layers) if f"enq{i}" in r.marks]
        if ends and "copy_started" in r.marks:
            starts = [r.marks["copy_started"], *ends[:-1]]
            enq.append([b - a for a, b in zip(starts, ends, strict=True)])
    if enq:
        flat = [x for row in enq for x in row]
        print(f"  {len(enq[0])} enqueue calls a restore: each p50 {statistics.median(flat):.3f} ms, max "
              f"{max(flat):.3f}; all of a restore p50 {statistics.median([sum(row) for row in enq]):.2f} ms")
    lag = [r.marks[f"wait{layers - 1}"] - r.marks[f"pub{layers - 1}"] for r in runs
           if f"wait{layers - 1}" in r.marks and f"pub{layers - 1}" in r.marks]
    if lag:
        print(f"  last layer published -> engine's wait returned: p50 {statistics.median(lag):.3f} ms, "
              f"max {max(lag):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--copies", nargs="+", choices=["lane", "worker"], default=["lane", "worker"])
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a tiny 4-layer shape on the CPU (checks the script)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = tiny_llama_config(num_layers=4, num_kv_heads=2, hidden_size=128, num_heads=4) if args.tiny \
        else llama3_8b_config()
    layers, heads, head_dim = kv_shape(config)
    t = args.tokens_per_block
    mc = flexkv_model_config(config, dtype)
    block_bytes = BlockFirstLayout(mc, t).block_bytes
    num_blocks = args.tokens // t
    nbytes = num_blocks * block_bytes
    tokens = np.random.default_rng(0).integers(0, 32000, size=num_blocks * t, dtype=np.int64)
    say(f"{layers} layers x {heads} KV heads x {head_dim}, {dtype}, {args.tokens} tokens = {num_blocks} blocks "
        f"({nbytes / 2**30:.3f} GiB), {device}")
    for copies in args.copies:
        trace_dir = tempfile.mkdtemp(prefix="flexkv-hops-")  # one per server: task ids start over
        hoptrace.enable(trace_dir)
        cache = CacheConfig(tokens_per_block=t, num_cpu_blocks=2 * num_blocks + 16)
        pool = PagedKVPool(layers, heads, head_dim, num_blocks + 8, t, dtype, device)
        kvm = KVManager(mc, cache, start_timeout_s=300)
        try:
            kvm.start()
            kvm.register_kv_buffers(pool.register_with(), pool.layout, device_id=device.index or 0, layerwise=True,
                                    engine_side=copies == "lane")
            kvm.wait_ready(300)
            pages = pool.allocate(num_blocks)
            for k in pool.tensors:
                k.normal_() if k.is_floating_point() else None
            tid, mask = kvm.put_match(tokens)
            kvm.launch(tid, pool.slot_mapping(pages, int(mask.sum())))
            if kvm.wait(tid, timeout=120)[tid].status is not TaskStatus.SUCCESS:
                raise RuntimeError("the put failed")
            pool.free(pages)
            for merged in (False, True, False):  # warm-up
                restore_once(kvm, pool, tokens, layers, True, merged)
            cases = {}
            for name, layerwise, merged in CASES:
                cases[name] = [restore_once(kvm, pool, tokens, layers, layerwise, merged)
                               for _ in range(args.repeats)]
        finally:
            kvm.shutdown()  # the server and its workers write their marks as they exit
            pool.close()
        attach_hops([r for runs in cases.values() for r in runs], trace_dir)
        hoptrace.disable()
        for f in os.listdir(trace_dir):
            os.unlink(os.path.join(trace_dir, f))
        os.rmdir(trace_dir)
        ceiling = 1e3 * ceiling_s(nbytes, device, repeats=5)
        for name, runs in cases.items():
            show(f"{copies}: {name} of {args.tokens} tokens", runs, layers)
        for name, runs in cases.items():
            end = [r.marks.get(f"wait{layers - 1}", r.marks["waited"]) for r in runs]
            say(f"{copies}, {name}: {'last layer' if name.startswith('layer') else 'done'} p50 "
                f"{statistics.median(end):.2f} ms (min {min(end):.2f}, max {max(end):.2f}); pinned ceiling "
                f"{ceiling:.2f} ms: {statistics.median(end) / ceiling:.2f}x")


if __name__ == "__main__":
    main()
