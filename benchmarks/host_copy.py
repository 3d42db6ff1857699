"""Host copy engine throughput beside a plain large memcpy measured in the same run.

Default: Llama-3-8B KV (32 layers, 8 KV heads, head 128, bf16), 16 tokens per block, per-layer vLLM
tensors, 1024 random engine block ids <-> 1024 random pool block ids (2 GiB each way). The ceiling is one
contiguous ``np.copyto`` of the same total bytes. Goal: >= 80% of it.

    python benchmarks/host_copy.py                       # default, ~10 s
    python benchmarks/host_copy.py --threads 1 2 4 8 --layout vllm_block_first --repeat 5
    python benchmarks/host_copy.py --num-ids 64          # small copies (thread start cost)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from flexkv.common.config import ModelConfig
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind, tensor_addresses
from flexkv.native.hostcopy import CopyDirection, buffer_address, copy_blocks


def best_seconds(fns: list[Callable[[], None]], repeat: int) -> list[float]:
    """Best time of each function; runs are interleaved so a noisy neighbour hits them alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # warm up: page faults, caches
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def engine_tensors(kind: LayoutKind, model: ModelConfig, t: int,
                   num_blocks: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One arena holding every engine tensor back to back (so memcpy can copy it whole), and the tensors."""
    h, d, nl = model.num_kv_heads, model.head_size, model.num_layers
    layout = KVCacheLayout(kind, nl, num_blocks, t, h, d, 2)
    arena = np.ones((layout.num_tensors, *layout.tensor_shape(0)), dtype=np.uint16)  # one arena, contiguous views
    return arena, [arena[i] for i in range(layout.num_tensors)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--num-ids", type=int, default=1024, help="blocks copied per call (random ids)")
    ap.add_argument("--layout", default="vllm_kv_first", choices=[k.value for k in LayoutKind if k.value != "mla"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1, help="split the ids over this many calls (small copies)")
    args = ap.parse_args()

    t, n = args.tokens_per_block, args.num_ids
    model = ModelConfig(args.layers, args.heads, args.head_size, "bfloat16")
    kind = LayoutKind(args.layout)
    pool_layout = BlockFirstLayout(model, t)
    arena, tensors = engine_tensors(kind, model, t, n)
    layout = KVCacheLayout.from_tensors(kind, tensors, t)
    table = layout.chunk_table(tensor_addresses(tensors))
    pool = np.zeros((n, pool_layout.block_bytes), dtype=np.uint8)
    offsets = pool_layout.shard_chunk_offsets(0)
    rng = np.random.default_rng(0)
    engine_ids, pool_ids = rng.permutation(n).astype(np.int64), rng.permutation(n).astype(np.int64)
    total = n * pool_layout.block_bytes

    flat_engine = arena.reshape(-1).view(np.uint8)
    flat_pool = pool.reshape(-1)
    assert flat_engine.nbytes == flat_pool.nbytes == total
    memcpy = {CopyDirection.TO_POOL: lambda: np.copyto(flat_pool, flat_engine),
              CopyDirection.FROM_POOL: lambda: np.copyto(flat_engine, flat_pool)}

    print(f"{kind.value}: {args.layers} layers x {layout.kv_dim} x {n} blocks, chunk {layout.chunk_bytes} B, "
          f"block {pool_layout.block_bytes} B, {total / 2**30:.2f} GiB per pass, {args.calls} call(s) per pass")
    print(f"{'direction':<10} {'threads':>7} {'GB/s':>8} {'memcpy GB/s':>12} {'ratio':>7}")
    addr = buffer_address(pool)
    for direction in CopyDirection:
        for threads in args.threads:
            def one_pass(direction: CopyDirection = direction, threads: int = threads) -> None:
                for e, p in zip(np.array_split(engine_ids, args.calls), np.array_split(pool_ids, args.calls),
                                strict=True):
                    copy_blocks(direction, table, addr, pool_layout.block_bytes, offsets, n, e, p, threads)
            sec, base_sec = best_seconds([one_pass, memcpy[direction]], args.repeat)
            gbps, base = total / sec / 1e9, total / base_sec / 1e9
            print(f"{direction.name:<10} {threads:>7} {gbps:>8.2f} {base:>12.2f} {gbps / base:>7.0%}")


if __name__ == "__main__":
    main()
