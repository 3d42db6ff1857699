"""Replay the Mooncake conversation trace through the ControlPlane: hit rate and requests/s.

Each request, in trace order: get_match of its prompt -> launch -> every op completes at once ->
release; then put_match of the whole prompt -> launch -> complete -> release (workers are
simulated as finishing instantly, CPU tier only, 16-token blocks). Token j of 512-token id b is
``b * 512 + j``, so equal ids give equal tokens. Tokens are synthesized before the timed loop.

Hit rate = cached prefix / prompt, reported in the README's 512-token id units (an id counts when
all of its whole 16-token blocks were hit) beside the README's block-LRU reference, and in
16-token blocks. The ceiling column is the reference hit rate; req/s is compared to the 5,000 goal.

    python benchmarks/trace_replay.py                 # full trace, 4 capacities (~1 min)
    python benchmarks/trace_replay.py --limit 2000    # quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.scheduler.control import ControlPlane

ID_TOKENS = 512
BLOCK_TOKENS = 16
REFERENCE = {"3M": (3_000_000, 0.136), "10M": (10_000_000, 0.285), "50M": (50_000_000, 0.364),
             "unlimited": (None, 0.366)}
GOAL_REQ_S = 5000
DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "../shared/traces/conversation_trace.jsonl"


def load(path: Path, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["timestamp"])  # stable: ties keep file order
    return rows[:limit] if limit else rows


def synthesize(rows: list[dict]) -> list[np.ndarray]:
    offsets = np.arange(ID_TOKENS, dtype=np.int64)
    out = []
    for r in rows:
        ids = np.asarray(r["hash_ids"], dtype=np.int64)
        out.append((ids[:, None] * ID_TOKENS + offsets).ravel()[:r["input_length"]].copy())
    return out


def ids_hit(matched_tokens: int, input_length: int, num_ids: int) -> int:
    """512-token ids whose whole 16-token blocks lie in the matched prefix."""
    whole = input_length // BLOCK_TOKENS * BLOCK_TOKENS
    hit = 0
    for i in range(num_ids):
        end = min((i + 1) * ID_TOKENS, whole)
        if end <= i * ID_TOKENS or end > matched_tokens:
            break
        hit += 1
    return hit


def replay(rows: list[dict], prompts: list[np.ndarray], num_cpu_blocks: int) -> tuple[list[int], float, dict]:
    model = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
    cp = ControlPlane(model, CacheConfig(tokens_per_block=BLOCK_TOKENS, num_cpu_blocks=num_cpu_blocks))
    slots = np.arange(max(p.size for p in prompts), dtype=np.int64)
    matched = []
    start = time.perf_counter()
    for i, tokens in enumerate(prompts):
        for key, match in (((0, 2 * i), cp.get_match), ((0, 2 * i + 1), cp.put_match)):
            mask = match(key, tokens)
            pending = cp.launch(key, slots[:tokens.size])
            while pending:
                pending += cp.complete_op(pending.pop().op_id, True)
            cp.release(key)
            if key[1] % 2 == 0:
                matched.append(int(np.count_nonzero(mask)))
    elapsed = time.perf_counter() - start
    cp.check_invariants()
    return matched, elapsed, cp.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--capacities", default=",".join(REFERENCE), help="subset of " + ",".join(REFERENCE))
    args = parser.parse_args()
    rows = load(args.trace, args.limit)
    t0 = time.perf_counter()
    prompts = synthesize(rows)
    synth_s = time.perf_counter() - t0
    total_blocks = sum(p.size // BLOCK_TOKENS for p in prompts)
    total_ids = sum(len(r["hash_ids"]) for r in rows)
    print(f"{len(rows)} requests, {total_ids} ids, {total_blocks} blocks of {BLOCK_TOKENS} tokens; "
          f"token synthesis {synth_s:.2f} s ({len(rows) / synth_s:,.0f} req/s)")
    print(f"{'capacity':>10} {'ref LRU':>8} {'hit(512)':>9} {'hit(16)':>8} {'req/s':>8} {'req/s+synth':>11} "
          f"{'vs goal':>8} {'evicted':>10}")
    for name in args.capacities.split(","):
        tokens_cap, reference = REFERENCE[name]
        num_blocks = tokens_cap // BLOCK_TOKENS if tokens_cap else total_blocks
        matched, elapsed, stats = replay(rows, prompts, num_blocks)
        hit512 = sum(ids_hit(m, r["input_length"], len(r["hash_ids"])) for m, r in zip(matched, rows, strict=True))
        req_s = len(rows) / elapsed
        with_synth = len(rows) / (elapsed + synth_s)
        print(f"{name:>10} {reference:>8.1%} {hit512 / total_ids:>9.1%} "
              f"{sum(matched) / BLOCK_TOKENS / total_blocks:>8.1%} {req_s:>8,.0f} {with_synth:>11,.0f} "
              f"{req_s / GOAL_REQ_S:>7.2f}x {stats['cpu_evicted_blocks']:>10,}")


if __name__ == "__main__":
    main()
