"""Replay the Mooncake conversation trace through the ControlPlane: hit rate and requests/s per policy.

Each request, in trace order: get_match of its prompt -> launch -> every op completes at once ->
release; then put_match of the whole prompt -> launch -> complete -> release (workers are
simulated as finishing instantly, CPU tier only, 16-token blocks). Token j of 512-token id b is
``b * 512 + j``, so equal ids give equal tokens. Tokens are synthesized before the timed loop.

Hit rate = cached prefix / prompt, reported in the README's 512-token id units (an id counts when
all of its whole 16-token blocks were hit) beside the README's block-LRU reference, and in
16-token blocks. The ceiling column is the reference hit rate; req/s is compared to the 5,000 goal. The clock the
eviction policies see is the trace's own time (its timestamps), so FLRU's hit reward is in trace
seconds. ``--policy all`` replays every policy and adds Belady's offline optimum (benchmarks/belady.py,
over 512-token ids; its hit(16) is that id-granular optimum counted in blocks, a lower bound of the
block-level optimum).

    python benchmarks/trace_replay.py                         # LRU, full trace, 4 capacities (~1 min)
    python benchmarks/trace_replay.py --policy all --capacities 3M,10M,50M
    python benchmarks/trace_replay.py --policy slru,flru --hit-reward-seconds 30 --json
    python benchmarks/trace_replay.py --limit 2000            # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.scheduler.control import ControlPlane
from flexkv.types import EvictionPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from belady import belady_hits  # a sibling script

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


def replay(rows: list[dict], prompts: list[np.ndarray], cache: CacheConfig) -> tuple[list[int], float, dict]:
    """Matched tokens per request, replay seconds, final stats. The policies' clock is the trace's."""
    model = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
    now = [0.0]
    cp = ControlPlane(model, cache, clock=lambda: now[0])
    slots = np.arange(max(p.size for p in prompts), dtype=np.int64)
    matched = []
    start = time.perf_counter()
    for i, tokens in enumerate(prompts):
        now[0] = rows[i]["timestamp"] / 1000.0
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


@dataclasses.dataclass
class Row:
    policy: str
    capacity: str
    hit_512: float
    hit_16: float
    req_s: float | None
    evicted: int | None


def policy_row(policy: str, capacity: str, rows: list[dict], prompts: list[np.ndarray], num_blocks: int,
               args: argparse.Namespace) -> Row:
    cache = CacheConfig(tokens_per_block=BLOCK_TOKENS, num_cpu_blocks=num_blocks, eviction_policy=policy,
                        hit_reward_seconds=args.hit_reward_seconds, slru_promote_hits=args.slru_promote_hits,
                        slru_protected_ratio=args.slru_protected_ratio)
    matched, elapsed, stats = replay(rows, prompts, cache)
    hit512 = sum(ids_hit(m, r["input_length"], len(r["hash_ids"])) for m, r in zip(matched, rows, strict=True))
    total_ids = sum(len(r["hash_ids"]) for r in rows)
    total_blocks = sum(p.size // BLOCK_TOKENS for p in prompts)
    return Row(policy, capacity, hit512 / total_ids, sum(matched) / BLOCK_TOKENS / total_blocks,
               len(rows) / elapsed, stats["cpu_evicted_blocks"])


def belady_row(capacity: str, rows: list[dict], tokens_cap: int | None) -> Row:
    requests = [list(r["hash_ids"]) for r in rows]
    total_ids = sum(len(r) for r in requests)
    hits = belady_hits(requests, tokens_cap // ID_TOKENS if tokens_cap else total_ids)
    blocks = [min(h * ID_TOKENS, r["input_length"]) // BLOCK_TOKENS for h, r in zip(hits, rows, strict=True)]
    total_blocks = sum(r["input_length"] // BLOCK_TOKENS for r in rows)
    hit512 = sum(ids_hit(h * ID_TOKENS, r["input_length"], len(r["hash_ids"])) for h, r in zip(hits, rows, strict=True))
    return Row("belady", capacity, hit512 / total_ids, sum(blocks) / total_blocks, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--capacities", default=",".join(REFERENCE), help="subset of " + ",".join(REFERENCE))
    parser.add_argument("--policy", default="lru",
                        help="comma-separated policies (" + ",".join(p.value for p in EvictionPolicy) + ") or 'all'")
    defaults = CacheConfig()
    parser.add_argument("--hit-reward-seconds", type=float, default=defaults.hit_reward_seconds)
    parser.add_argument("--slru-promote-hits", type=int, default=defaults.slru_promote_hits)
    parser.add_argument("--slru-protected-ratio", type=float, default=defaults.slru_protected_ratio)
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = parser.parse_args()
    policies = [p.value for p in EvictionPolicy] if args.policy == "all" else args.policy.split(",")
    for p in policies:
        EvictionPolicy(p)  # a clear error for a typo before minutes of replay
    rows = load(args.trace, args.limit)
    t0 = time.perf_counter()
    prompts = synthesize(rows)
    synth_s = time.perf_counter() - t0
    total_blocks = sum(p.size // BLOCK_TOKENS for p in prompts)
    total_ids = sum(len(r["hash_ids"]) for r in rows)
    out = print if not args.json else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    out(f"{len(rows)} requests, {total_ids} ids, {total_blocks} blocks of {BLOCK_TOKENS} tokens; "
        f"token synthesis {synth_s:.2f} s ({len(rows) / synth_s:,.0f} req/s)")
    out(f"{'policy':>7} {'capacity':>9} {'ref LRU':>8} {'hit(512)':>9} {'hit(16)':>8} {'req/s':>8} {'vs goal':>8} "
        f"{'evicted':>10}")
    results: list[Row] = []
    for name in args.capacities.split(","):
        tokens_cap, reference = REFERENCE[name]
        num_blocks = tokens_cap // BLOCK_TOKENS if tokens_cap else total_blocks
        jobs: list[tuple[Any, ...]] = [(policy_row, p, name, rows, prompts, num_blocks, args) for p in policies]
        if args.policy == "all":
            jobs.append((belady_row, name, rows, tokens_cap))
        for run, *run_args in jobs:
            row = run(*run_args)
            results.append(row)
            speed = f"{row.req_s:>8,.0f} {row.req_s / GOAL_REQ_S:>7.2f}x" if row.req_s else f"{'-':>8} {'-':>8}"
            out(f"{row.policy:>7} {name:>9} {reference:>8.1%} {row.hit_512:>9.1%} {row.hit_16:>8.1%} {speed} "
                f"{row.evicted if row.evicted is not None else '-':>10}", flush=True)
    if args.json:
        print(json.dumps([{"policy": r.policy, "capacity": r.capacity, "hit_512": round(r.hit_512, 5),
                           "hit_16": round(r.hit_16, 5), "req_s": round(r.req_s, 1) if r.req_s else None}
                          for r in results]))


if __name__ == "__main__":
    main()
