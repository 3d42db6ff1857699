"""The server's own work for one small get, hot and after the process has idled: the cost of a cold path.

A small op's hops measure far more than their code does when it runs in a loop (docs/benchmarks.md,
"Small ops": "server_request -> server_dispatched" is 0.4-0.5 ms for work that index_latency.py times
at ~40 us). This script times exactly that work, in this one process, with no socket and no other
process involved, so what changes between the rows is only how long the process did something else
first:

* the work: ``ControlPlane`` get_match -> launch -> complete every op -> release of a cached prompt of
  ``--blocks`` blocks (default 4, 16 tokens each): the server's planning and bookkeeping for one
  small get, as ``index_latency.py``'s in-process e2e;
* hot: the work right after an untimed run of itself (the ceiling: the same code, same run);
* after ``sleep``: ``time.sleep(idle)`` before each timed call: the process sleeps, as a server or
  worker does in ``poll`` between ops;
* after ``spin``: a busy loop of the same length (no sleep, the core stays awake, but this process's
  code and data are not touched meanwhile);
* after ``touch``: ``--touch-mib`` of memory is read before each call (what other processes or other
  work in this one do to the caches between two ops).

Each row prints p50/p99 in microseconds and the p50 as a multiple of the hot p50.

    python benchmarks/cold_path.py                    # 400 calls per row, ~20 s
    python benchmarks/cold_path.py --blocks 4 --idle-ms 0.1 1 3 10 --iters 1000
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.scheduler.control import ControlPlane

T = 16
MODEL = ModelConfig(32, 8, 128, "bfloat16")  # Llama-3-8B shape (block bytes do not enter the plan)


class SmallGet:
    """A ControlPlane holding one cached prompt; ``run`` plans and completes one get of it."""

    def __init__(self, blocks: int) -> None:
        self.plane = ControlPlane(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=4 * blocks + 16))
        rng = np.random.default_rng(0)
        self.tokens = rng.integers(0, 1 << 40, blocks * T, dtype=np.int64)
        self.slots = np.arange(blocks * T, dtype=np.int64)
        self._next = 0
        self._complete((0, 0), put=True)

    def _complete(self, key: tuple[int, int], put: bool) -> int:
        match = self.plane.put_match if put else self.plane.get_match
        mask = match(key, self.tokens)
        pending = self.plane.launch(key, self.slots)
        while pending:
            pending += self.plane.complete_op(pending.pop().op_id, True)
        self.plane.release(key)
        return int(mask.sum())

    def run(self) -> float:
        """Seconds for one get (checked: it must load every token)."""
        self._next += 1
        t0 = time.perf_counter()
        loaded = self._complete((1, self._next), put=False)
        dt = time.perf_counter() - t0
        if loaded != self.tokens.size:
            raise RuntimeError(f"the get loaded {loaded} of {self.tokens.size} tokens")
        return dt


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=400, help="timed calls per row (after 20 warm-up calls)")
    ap.add_argument("--idle-ms", type=float, nargs="+", default=[0.1, 1.0, 3.0, 10.0])
    ap.add_argument("--touch-mib", type=int, default=32, help="memory read before each call in the touch rows")
    args = ap.parse_args()

    work = SmallGet(args.blocks)
    junk = np.ones(args.touch_mib << 20, dtype=np.uint8)
    # hot: right after an untimed run of the same work (rows are interleaved, so "no step before" would
    # follow the previous row's step, not the work itself)
    def run_untimed() -> None:
        work.run()

    def touch() -> None:
        junk.sum(dtype=np.uint64)

    cases: list[tuple[str, Callable[[], None]]] = [("hot (back to back)", run_untimed)]
    for idle_ms in args.idle_ms:
        cases.append((f"after sleep {idle_ms:g} ms", functools.partial(time.sleep, idle_ms / 1e3)))
        cases.append((f"after spin {idle_ms:g} ms", functools.partial(spin, idle_ms / 1e3)))
    cases.append((f"after reading {args.touch_mib} MiB", touch))

    print(f"one small get's server work (ControlPlane match + launch + complete + release), {args.blocks} blocks "
          f"x {T} tokens; {args.iters} calls per row; p50/p99 us; {os.cpu_count()} CPUs; "
          f"{platform.processor() or platform.machine()}; python {platform.python_version()}", flush=True)
    times = {name: np.empty(args.iters) for name, _ in cases}
    for i in range(-20, args.iters):  # rows interleaved call by call: drift and neighbours hit them alike
        for name, before in cases:
            before()
            dt = work.run()
            if i >= 0:
                times[name][i] = dt
    hot = float(np.median(times[cases[0][0]]))
    print(f"{'case':<26} {'p50/p99 us':>16} {'p50 / hot':>10}")
    for name, _ in cases:
        t = times[name] * 1e6
        print(f"{name:<26} {np.median(t):7.1f}/{np.percentile(t, 99):<8.1f} {np.median(t) / (hot * 1e6):9.2f}x")
    work.plane.check_invariants()


if __name__ == "__main__":
    main()
