"""Radix index latency: match and insert p50/p99 for 1K-128K-token prompts, and the tree layout choice.

For each prompt length a tree is first filled with prompts that share prefixes (each new prompt
continues a random earlier one for a random length, then diverges), then measured:

* hash:    hash_blocks of the prompt (C, chained XXH3) - the floor every match pays
* match:   RadixIndex.match + block ids + ready prefix, one tier
* insert:  allocate + insert the prompt's new suffix (unready), one tier
* 2 trees: match in a CPU tree and an SSD tree (per-tier trees, the layout built here)
* 1 tree:  match in one union tree + gather an SSD residency column (one tree with per-tier residency)
* e2e:     ControlPlane get_match + launch + complete + release (CPU hit path)

    python benchmarks/index_latency.py                 # ~20 s
    python benchmarks/index_latency.py --prompts 400   # more prompts per size
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import hash_blocks
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.eviction import LRUEvictor
from flexkv.scheduler.index import RadixIndex
from flexkv.scheduler.pool import BlockPool
from flexkv.types import Medium

T = 16
SIZES = (1024, 8192, 32768, 131072)


def make_prompts(num_tokens: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    prompts = [rng.integers(0, 1 << 40, num_tokens, dtype=np.int64)]
    for _ in range(count - 1):
        base = prompts[rng.integers(len(prompts))]
        keep = int(rng.integers(0, num_tokens))
        prompts.append(np.concatenate([base[:keep], rng.integers(0, 1 << 40, num_tokens - keep, dtype=np.int64)]))
    return prompts


def new_index(medium: Medium, num_blocks: int) -> RadixIndex:
    return RadixIndex(medium, BlockPool(num_blocks), LRUEvictor())


def store(index: RadixIndex, hashes: np.ndarray, now: int) -> None:
    match = index.match(hashes)
    ids = index.allocate(hashes.size - match.num_blocks, match)
    index.insert(match, hashes[match.num_blocks:match.num_blocks + ids.size], ids, now)
    index.publish(ids)


def timed(fn: Callable[[int], object], count: int) -> np.ndarray:
    out = np.empty(count)
    for i in range(count):
        t0 = time.perf_counter()
        fn(i)
        out[i] = time.perf_counter() - t0
    return out * 1e6


def run_size(num_tokens: int, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    prompts = make_prompts(num_tokens, 2 * count, rng)
    hashes = [hash_blocks(p, T) for p in prompts]
    capacity = sum(h.size for h in hashes) + 16
    cpu, ssd, union = new_index(Medium.CPU, capacity), new_index(Medium.SSD, capacity), new_index(Medium.CPU, capacity)
    ssd_column = np.full(capacity, -1, dtype=np.int64)
    for i, h in enumerate(hashes[:count]):  # warm trees: the first half of the prompts
        store(cpu, h, i)
        store(ssd, h, i)
        store(union, h, i)
    ssd_column[union.pool.is_used(np.arange(capacity))] = 0

    def match_one(index: RadixIndex, h: np.ndarray) -> int:
        return index.ready_prefix(index.match(h).block_ids())

    def one_tree(h: np.ndarray) -> int:
        ids = union.match(h).block_ids()
        res = ssd_column[ids] >= 0
        return union.ready_prefix(ids) + (res.size if res.all() else int(np.argmin(res)))

    probe = hashes[count:]
    results = {
        "hash": timed(lambda i: hash_blocks(prompts[count + i], T), count),
        "match": timed(lambda i: match_one(cpu, probe[i]), count),
        "2 trees": timed(lambda i: (match_one(cpu, probe[i]), match_one(ssd, probe[i])), count),
        "1 tree": timed(lambda i: one_tree(probe[i]), count),
        "insert": timed(lambda i: store(cpu, probe[i], count + i), count),
    }
    cp = ControlPlane(ModelConfig(32, 8, 128), CacheConfig(tokens_per_block=T, num_cpu_blocks=capacity))
    slots = np.arange(num_tokens, dtype=np.int64)
    for i, p in enumerate(prompts[:count]):
        cp.put_match((0, i), p)
        for op in cp.launch((0, i), slots):
            cp.complete_op(op.op_id, True)
        cp.release((0, i))

    def e2e(i: int) -> None:
        key = (1, i)
        cp.get_match(key, prompts[count + i])
        pending = cp.launch(key, slots)
        while pending:
            pending += cp.complete_op(pending.pop().op_id, True)
        cp.release(key)

    results["e2e get"] = timed(e2e, count)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="measured prompts per size (as many warm the tree)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    names = ["hash", "match", "insert", "2 trees", "1 tree", "e2e get"]
    print("latency in microseconds, p50 / p99 (hash = the hashing floor measured in the same run)")
    print(f"{'tokens':>7} " + " ".join(f"{n:>15}" for n in names))
    for size in SIZES:
        count = max(50, args.prompts * 8192 // size) if size > 8192 else args.prompts
        res = run_size(size, count, rng)
        cells = [f"{np.percentile(res[n], 50):>7.1f}/{np.percentile(res[n], 99):<7.1f}" for n in names]
        print(f"{size:>7} " + " ".join(cells))


if __name__ == "__main__":
    main()
