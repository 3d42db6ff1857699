"""A synthetic conversation trace in the Mooncake trace's format, for replaying policies on a
second workload (``trace_replay.py --trace``): statistics chosen here, not fitted to that trace.

Conversations start as a Poisson process; each opens with one of a few shared system prompts
(1-4 ids) and a first message (log-normal length); after each turn it continues with a
probability that grows with its depth (``--continue-p`` for the first turn, approaching
``--deep-continue-p``), after a log-normal think time (``--think-median-s``), adding the answer
and a new message (1-6 ids). One JSON object a line: timestamp (ms), input_length, output_length,
hash_ids (one id per 512 tokens; equal ids = equal prefix).

    python benchmarks/synth_trace.py --out /tmp/synth.jsonl
    python benchmarks/trace_replay.py --trace /tmp/synth.jsonl --policy all --capacities 3M,10M,50M
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
from pathlib import Path

ID_TOKENS = 512


def generate(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    ids = itertools.count(1)
    system = [[0, *(next(ids) for _ in range(rng.randint(0, 3)))] for _ in range(args.system_prompts)]
    events: list[tuple[float, int, list[int], int]] = []  # (time s, tie, prefix ids, depth)
    tie = itertools.count()
    t = 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.duration_s:
            break
        first = max(1, round(rng.lognormvariate(math.log(args.first_median_ids), 1.0)))
        heapq.heappush(events, (t, next(tie), rng.choice(system) + [next(ids) for _ in range(first)], 0))
    rows = []
    while events:
        t, _, prefix, depth = heapq.heappop(events)
        partial = rng.randint(1, ID_TOKENS)
        rows.append({"timestamp": round(t * 1000), "input_length": (len(prefix) - 1) * ID_TOKENS + partial,
                     "output_length": rng.randint(1, 1000), "hash_ids": prefix})
        p = args.deep_continue_p - (args.deep_continue_p - args.continue_p) * 0.5 ** depth
        if rng.random() < p and len(prefix) < args.max_ids:
            gap = rng.lognormvariate(math.log(args.think_median_s), args.think_sigma)
            # the next prompt keeps this one's whole ids (its partial last id becomes a new full one)
            grown = prefix[:-1] + [next(ids) for _ in range(1 + rng.randint(1, 6))]
            if t + gap < args.duration_s:
                heapq.heappush(events, (t + gap, next(tie), grown, depth + 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--rate", type=float, default=2.0, help="new conversations per second")
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--first-median-ids", type=float, default=8.0)
    parser.add_argument("--continue-p", type=float, default=0.3)
    parser.add_argument("--deep-continue-p", type=float, default=0.7)
    parser.add_argument("--think-median-s", type=float, default=60.0)
    parser.add_argument("--think-sigma", type=float, default=1.0)
    parser.add_argument("--max-ids", type=int, default=256)
    args = parser.parse_args()
    rows = generate(args)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} requests, {sum(len(r['hash_ids']) for r in rows)} ids -> {args.out}")


if __name__ == "__main__":
    main()
