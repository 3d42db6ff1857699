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
    python benchmarks/trace_replay.py --policy all --measure-from 6016   # warm on the first half, count the second
    python benchmarks/trace_replay.py --metrics --capacities 10M   # telemetry + /metrics off vs on

``--metrics`` replays each capacity as the server loop does it (each task polled as the server retires
it) twice, alternating, three times each: off, and on with the server's telemetry hooks called where
the server calls them (requests, match, launch, every op's dispatch, worker report and completion, the
task's end), a live ``MetricsExporter`` answered from the loop and scraped every second. The table
gives the best req/s of each and on/off.
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
import zmq
from scrape_load import Scraper, free_port

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.worker_msgs import OpsDoneMsg
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.metrics import MetricsExporter
from flexkv.scheduler.telemetry import Telemetry, build_snapshot
from flexkv.types import EvictionPolicy, TaskType

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
    """Hit rates of requests ``args.measure_from`` on (all replayed: the earlier ones only warm the cache)."""
    cache = CacheConfig(tokens_per_block=BLOCK_TOKENS, num_cpu_blocks=num_blocks, eviction_policy=policy,
                        hit_reward_seconds=args.hit_reward_seconds, slru_promote_hits=args.slru_promote_hits,
                        slru_protected_ratio=args.slru_protected_ratio)
    matched, elapsed, stats = replay(rows, prompts, cache)
    first = args.measure_from
    counted = rows[first:]
    hit512 = sum(ids_hit(m, r["input_length"], len(r["hash_ids"]))
                 for m, r in zip(matched[first:], counted, strict=True))
    total_ids = sum(len(r["hash_ids"]) for r in counted)
    total_blocks = sum(p.size // BLOCK_TOKENS for p in prompts[first:])
    return Row(policy, capacity, hit512 / total_ids, sum(matched[first:]) / BLOCK_TOKENS / total_blocks,
               len(rows) / elapsed, stats["cpu_evicted_blocks"])


def belady_row(capacity: str, rows: list[dict], tokens_cap: int | None, first: int = 0) -> Row:
    requests = [list(r["hash_ids"]) for r in rows]
    hits = belady_hits(requests, tokens_cap // ID_TOKENS if tokens_cap else sum(len(r) for r in requests))
    hits, counted = hits[first:], rows[first:]
    total_ids = sum(len(r["hash_ids"]) for r in counted)
    blocks = [min(h * ID_TOKENS, r["input_length"]) // BLOCK_TOKENS for h, r in zip(hits, counted, strict=True)]
    total_blocks = sum(r["input_length"] // BLOCK_TOKENS for r in counted)
    hit512 = sum(ids_hit(h * ID_TOKENS, r["input_length"], len(r["hash_ids"]))
                 for h, r in zip(hits, counted, strict=True))
    return Row("belady", capacity, hit512 / total_ids, sum(blocks) / total_blocks, None, None)


def replay_server_like(prompts: list[np.ndarray], num_cpu_blocks: int, metered: bool) -> tuple[float, float, int]:
    """(seconds, seconds inside telemetry hooks and scrape answers, scrapes) of the replay with the server's
    per-task work; telemetry + exporter when metered."""
    model = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
    cp = ControlPlane(model, CacheConfig(tokens_per_block=BLOCK_TOKENS, num_cpu_blocks=num_cpu_blocks))
    block_bytes = model.block_bytes(BLOCK_TOKENS)
    slots = np.arange(max(p.size for p in prompts), dtype=np.int64)
    tele = Telemetry(BLOCK_TOKENS) if metered else None
    ctx = zmq.Context()
    exporter = MetricsExporter(ctx, "127.0.0.1", free_port()) if metered else None
    scraper = Scraper(exporter.port) if exporter is not None else None

    def snapshot() -> dict[str, Any]:
        assert tele is not None
        return build_snapshot(cp.stats(), tele, {}, {"manager": 1}, block_bytes, BLOCK_TOKENS)

    hook_s = 0.0
    clock = time.perf_counter
    start = time.perf_counter()
    for i, tokens in enumerate(prompts):
        for key, match, kind, msg_type in (((0, 2 * i), cp.get_match, TaskType.GET, cm.GetAsyncMsg),
                                           ((0, 2 * i + 1), cp.put_match, TaskType.PUT, cm.PutAsyncMsg)):
            t0 = time.monotonic()
            mask = match(key, tokens)
            pending = cp.launch(key, slots[:tokens.size])
            if tele is not None:
                h0 = clock()
                tele.on_matched(key, kind, t0, tokens.size, mask)
                tele.on_launched(key)
                tele.on_request(msg_type, ok=True)
                for op in pending:
                    tele.on_dispatch(op)
                hook_s += clock() - h0
            while pending:
                op = pending.pop()
                if tele is not None:  # the report the server decodes anyway (not timed), then the hooks
                    report = OpsDoneMsg(worker_id="device-0-0", op_ids=[op.op_id], errors=[""],
                                        num_bytes=[op.src_block_ids.size * block_bytes], queue_s=[0.0], busy_s=1e-5)
                    h0 = clock()
                    tele.on_reported(report)
                    tele.on_op_done(op.op_id, "")
                    hook_s += clock() - h0
                done = cp.complete_op(op.op_id, True)
                if tele is not None:
                    h0 = clock()
                    for new in done:
                        tele.on_dispatch(new)
                    hook_s += clock() - h0
                pending += done
            full, engine = cp.poll(key, completely=True), cp.poll(key)
            cp.release(key)
            if tele is not None:
                h0 = clock()
                tele.on_final(key, engine, full, kind)
                hook_s += clock() - h0
        if exporter is not None and i % 64 == 0 and exporter.sock.poll(0):
            h0 = clock()
            exporter.serve(snapshot)  # the server loop answers scrapes between messages
            hook_s += clock() - h0
    elapsed = time.perf_counter() - start
    scrapes = scraper.close() if scraper is not None else 0
    if exporter is not None:
        exporter.close()
    ctx.destroy(linger=0)
    cp.check_invariants()
    return elapsed, hook_s, scrapes


def compare_metrics(rows: list[dict], prompts: list[np.ndarray], names: list[str], total_blocks: int) -> None:
    print("req/s: best of 3 alternating runs each; hooks = time inside the telemetry hooks and scrape answers,\n"
          "measured in the metered runs themselves (per request = one GET task + one PUT task)")
    print(f"{'capacity':>10} {'off req/s':>10} {'on req/s':>10} {'on/off':>7} {'hooks us/req':>12} "
          f"{'hooks/loop':>10} {'scrapes':>8}")
    for name in names:
        tokens_cap, _ = REFERENCE[name]
        num_blocks = tokens_cap // BLOCK_TOKENS if tokens_cap else total_blocks
        best = {False: float("inf"), True: float("inf")}
        scrapes, hooks, loop = 0, 0.0, 0.0
        for _ in range(3):
            for metered in (False, True):
                elapsed, hook_s, n = replay_server_like(prompts, num_blocks, metered)
                best[metered] = min(best[metered], elapsed)
                scrapes += n
                if metered:
                    hooks, loop = hooks + hook_s, loop + elapsed
        off, on = len(rows) / best[False], len(rows) / best[True]
        print(f"{name:>10} {off:>10,.0f} {on:>10,.0f} {on / off:>7.1%} {hooks / 3 / len(rows) * 1e6:>12.2f} "
              f"{hooks / loop:>10.2%} {scrapes:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--measure-from", type=int, default=0,
                        help="count hits from request N on (the requests before it only warm the cache)")
    parser.add_argument("--capacities", default=",".join(REFERENCE), help="subset of " + ",".join(REFERENCE))
    parser.add_argument("--policy", default="lru",
                        help="comma-separated policies (" + ",".join(p.value for p in EvictionPolicy) + ") or 'all'")
    defaults = CacheConfig()
    parser.add_argument("--hit-reward-seconds", type=float, default=defaults.hit_reward_seconds)
    parser.add_argument("--slru-promote-hits", type=int, default=defaults.slru_promote_hits)
    parser.add_argument("--slru-protected-ratio", type=float, default=defaults.slru_protected_ratio)
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--metrics", action="store_true", help="compare telemetry + /metrics off and on")
    args = parser.parse_args()
    policies = [p.value for p in EvictionPolicy] if args.policy == "all" else args.policy.split(",")
    for p in policies:
        EvictionPolicy(p)  # a clear error for a typo before minutes of replay
    rows = load(args.trace, args.limit)
    if not 0 <= args.measure_from < len(rows):
        parser.error(f"--measure-from {args.measure_from}: the trace has {len(rows)} requests")
    t0 = time.perf_counter()
    prompts = synthesize(rows)
    synth_s = time.perf_counter() - t0
    total_blocks = sum(p.size // BLOCK_TOKENS for p in prompts)
    total_ids = sum(len(r["hash_ids"]) for r in rows)
    out = print if not args.json else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    out(f"{len(rows)} requests, {total_ids} ids, {total_blocks} blocks of {BLOCK_TOKENS} tokens; "
        f"token synthesis {synth_s:.2f} s ({len(rows) / synth_s:,.0f} req/s)"
        + (f"; hits counted from request {args.measure_from}" if args.measure_from else ""))
    if args.metrics:
        compare_metrics(rows, prompts, args.capacities.split(","), total_blocks)
        return
    out(f"{'policy':>7} {'capacity':>9} {'ref LRU':>8} {'hit(512)':>9} {'hit(16)':>8} {'req/s':>8} {'vs goal':>8} "
        f"{'evicted':>10}")
    results: list[Row] = []
    own_trace = args.trace.resolve() == DEFAULT_TRACE.resolve() and not args.measure_from
    for name in args.capacities.split(","):
        tokens_cap, reference = REFERENCE[name]
        num_blocks = tokens_cap // BLOCK_TOKENS if tokens_cap else total_blocks
        jobs: list[tuple[Any, ...]] = [(policy_row, p, name, rows, prompts, num_blocks, args) for p in policies]
        if args.policy == "all":
            jobs.append((belady_row, name, rows, tokens_cap, args.measure_from))
        for run, *run_args in jobs:
            row = run(*run_args)
            results.append(row)
            speed = f"{row.req_s:>8,.0f} {row.req_s / GOAL_REQ_S:>7.2f}x" if row.req_s else f"{'-':>8} {'-':>8}"
            ref = f"{reference:>8.1%}" if own_trace else f"{'-':>8}"  # the README's figures are of the whole trace
            out(f"{row.policy:>7} {name:>9} {ref} {row.hit_512:>9.1%} {row.hit_16:>8.1%} {speed} "
                f"{row.evicted if row.evicted is not None else '-':>10}", flush=True)
    if args.json:
        print(json.dumps([{"policy": r.policy, "capacity": r.capacity, "hit_512": round(r.hit_512, 5),
                           "hit_16": round(r.hit_16, 5), "req_s": round(r.req_s, 1) if r.req_s else None}
                          for r in results]))


if __name__ == "__main__":
    main()
