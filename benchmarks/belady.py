"""Belady's offline optimum for a prefix cache: the hit rate no eviction policy can beat.

At every eviction, drop the cached block whose next use lies farthest in the future (never used
again = infinitely far). In a prefix cache a block is only ever used together with its whole
prefix, so a block's next use is never earlier than its parent's; breaking ties toward the deeper
block keeps the cache prefix-closed, as flexkv's tiers are. Every request is looked up (the leading
run of its blocks that is cached counts as hit), then all of its blocks are inserted, as a put of
the whole prompt does; a block that will never be used again is evicted before anything else, so
the optimum may "not cache" it.

    python benchmarks/belady.py                       # the conversation trace at 3M, 10M, 50M tokens
    python benchmarks/belady.py --unit block          # 16-token blocks instead of 512-token ids
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections.abc import Sequence
from pathlib import Path

ID_TOKENS = 512
BLOCK_TOKENS = 16
NEVER = 1 << 62
DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "../shared/traces/conversation_trace.jsonl"
CAPACITIES = {"3M": 3_000_000, "10M": 10_000_000, "50M": 50_000_000}


def load_requests(path: Path, unit: str) -> tuple[list[list[int]], int]:
    """Each request's keys in prompt order (512-token ids, or the whole 16-token blocks of each id),
    in trace order; and the tokens per key."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["timestamp"])
    if unit == "id":
        return [list(r["hash_ids"]) for r in rows], ID_TOKENS
    per_id = ID_TOKENS // BLOCK_TOKENS
    out = []
    for r in rows:
        num_blocks = r["input_length"] // BLOCK_TOKENS
        ids = r["hash_ids"]
        out.append([ids[k // per_id] * per_id + k % per_id for k in range(num_blocks)])
    return out, BLOCK_TOKENS


def belady_hits(requests: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """Leading keys of each request found cached under the optimal policy with ``capacity`` keys."""
    next_use: list[list[int]] = [[] for _ in requests]
    seen: dict[int, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        keys = requests[i]
        next_use[i] = [seen.get(k, NEVER) for k in keys]
        for k in keys:
            seen[k] = i
    cached: dict[int, tuple[int, int]] = {}  # key -> (next use, depth) of its live heap entry
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, key): farthest, then deepest, first
    hits = []
    for i, keys in enumerate(requests):
        hit = 0
        for k in keys:
            if k not in cached:
                break
            hit += 1
        hits.append(hit)
        for depth, (k, nu) in enumerate(zip(keys, next_use[i], strict=True)):
            cached[k] = (nu, depth)
            heapq.heappush(heap, (-nu, -depth, k))
        while len(cached) > capacity:
            neg_nu, neg_depth, k = heapq.heappop(heap)
            if cached.get(k) == (-neg_nu, -neg_depth):
                del cached[k]
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--unit", choices=("id", "block"), default="id")
    parser.add_argument("--capacities", default=",".join(CAPACITIES))
    args = parser.parse_args()
    requests, tokens_per_key = load_requests(args.trace, args.unit)
    total = sum(len(r) for r in requests)
    print(f"{len(requests)} requests, {total} keys of {tokens_per_key} tokens")
    for name in args.capacities.split(","):
        t0 = time.perf_counter()
        hits = belady_hits(requests, CAPACITIES[name] // tokens_per_key)
        print(f"{name:>4}: Belady hit rate {sum(hits) / total:.1%} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
