"""Small-op latency through the whole stack (host-device worker) beside its ceilings, same run.

One prompt of ``--blocks`` blocks (default 4: Llama-3-8B shape, 16 tokens per block, 2 MiB blocks,
8 MiB) is put or got, timed from ``put_async``/``get_async`` to ``wait`` returning, in two modes:

* back to back: the next op starts as soon as the previous wait returned;
* idle: ``--idle-ms`` (default 10) of sleep before each op, so every process has gone to sleep.

KVManager in library mode (server + device worker as child processes), engine KV buffers in host
shared memory (``allocate_host_kv_buffers``, vLLM kv-first per-layer tensors): the host-device path,
the same GPU-worker code path as CUDA buffers. A put stores a new prompt each time (older ones are
evicted LRU); a get restores one stored prompt into blocks poisoned before every op, and after the
timing every restored block is compared with its source, so a broken path cannot look fast.

Ceilings measured in the same run, interleaved with the ops:

* zmq echo: a bare DEALER -> ROUTER round trip over ipc to an echo process (control_latency.py's),
  with a GetMatchMsg header and one frame of block hashes out, a reply header back: one message
  round trip between two processes, the least any op through the server can cost;
* memcpy: one ``np.copyto`` of the op's bytes between two buffers (the bytes' own time).

``--breakdown`` also prints per hop where an op's time goes, from the timestamps that the processes
record when ``FLEXKV_HOP_TRACE`` is set (see docs/benchmarks.md, "Small ops"); the timed rows then
include that recording.

Goal (issue 17 §3): p50 <= 0.3 ms for a 4-block put and get with host buffers on the 2-core sandbox.

    python benchmarks/small_ops.py                    # 300 ops per row, ~20 s
    python benchmarks/small_ops.py --iters 1000 --idle-ms 10
    python benchmarks/small_ops.py --breakdown --iters 200
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from control_latency import EchoClient, echo_server, match_header

from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import TaskStatus

T = 16
MODEL = ModelConfig(32, 8, 128, "bfloat16")  # Llama-3-8B: 2 MiB per 16-token block
GOAL_MS = 0.3
POISON = np.uint16(0xDEAD)


class SmallOpStack:
    """A library-mode server with one host-buffer rank; slots for one put source and one get destination."""

    def __init__(self, blocks: int, cpu_blocks: int, busy_poll_us: int = 0, landing: bool = False) -> None:
        self.blocks = blocks
        engine_blocks = 3 * blocks
        self.layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, MODEL.num_layers, engine_blocks, T, MODEL.num_kv_heads,
                                    MODEL.head_size, MODEL.itemsize)
        self.bufs: HostKVBuffers = allocate_host_kv_buffers(self.layout, MODEL.dtype, tag="smallops")
        rng = np.random.default_rng(0)
        for x in self.bufs.arrays:
            x[...] = rng.integers(0, 1 << 16, x.shape, dtype=np.uint16)
        perm = rng.permutation(engine_blocks).astype(np.int64)
        self.src, self.put_src, self.dst = perm[:blocks], perm[blocks: 2 * blocks], perm[2 * blocks:]
        cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=cpu_blocks)
        if busy_poll_us:  # (so that 0 also runs on builds without the key)
            cache = dataclasses.replace(cache, busy_poll_us=busy_poll_us)
        self.kvm = KVManager(MODEL, cache)
        self.kvm.start()
        self.kvm.register_kv_buffers(self.bufs, self.layout, layerwise=landing)
        self.kvm.wait_ready(60)
        self._rng = rng
        self.stored = self.new_prompt()
        tid = self.kvm.put_async(self.stored, self.slots(self.src))
        if self.kvm.wait([tid], timeout=60)[tid].status is not TaskStatus.SUCCESS:
            raise RuntimeError("storing the prompt that gets restore failed")
        self.bad_blocks = 0

    def new_prompt(self) -> np.ndarray:
        return self._rng.integers(0, 1 << 40, self.blocks * T, dtype=np.int64)

    def slots(self, blocks: np.ndarray) -> np.ndarray:
        k = np.arange(blocks.size * T)
        return blocks[k // T] * T + k % T

    def put(self) -> Callable[[], float]:
        tokens, slots = self.new_prompt(), self.slots(self.put_src)

        def run() -> float:
            t0 = time.perf_counter()
            tid = self.kvm.put_async(tokens, slots)
            r = self.kvm.wait([tid], timeout=30)[tid]
            dt = time.perf_counter() - t0
            if r.status is not TaskStatus.SUCCESS:
                raise RuntimeError(f"put: {r.status.name} {r.error}")
            return dt
        return run

    def get(self) -> Callable[[], float]:
        for x in self.bufs.arrays:
            x[:, self.dst] = POISON
        slots = self.slots(self.dst)

        def run() -> float:
            t0 = time.perf_counter()
            tid = self.kvm.get_async(self.stored, slots)
            r = self.kvm.wait([tid], timeout=30)[tid]
            dt = time.perf_counter() - t0
            if r.status is not TaskStatus.SUCCESS or r.return_mask is None or not r.return_mask.all():
                raise RuntimeError(f"get: {r.status.name} {r.error} (mask {r.return_mask})")
            self.bad_blocks += sum(int((x[:, self.src] != x[:, self.dst]).reshape(2, self.blocks, -1).any(2)
                                       .any(0).sum()) for x in self.bufs.arrays)
            return dt
        return run

    def close(self) -> None:
        self.kvm.shutdown()
        self.bufs.close()


def measure(stacks: dict[str, SmallOpStack], echo: EchoClient, iters: int, idle_s: float) -> dict[str, np.ndarray]:
    """Interleaved put / get (of every stack) / echo / memcpy timings (seconds), each after ``idle_s``
    of sleep; keys ``put@<busy_poll_us>``, ``get@<busy_poll_us>``, ``echo``, ``memcpy``."""
    blocks = next(iter(stacks.values())).blocks
    header = match_header(blocks * T)
    hashes = np.arange(blocks * T, dtype=np.int64)
    nbytes = blocks * MODEL.block_bytes(T)
    a, b = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)

    def run_echo() -> float:
        t0 = time.perf_counter()
        echo.round_trip(header, hashes)
        return time.perf_counter() - t0

    def run_memcpy() -> float:
        np.copyto(b, a)  # the bytes in cache, as an op's source is right after the engine wrote it
        t0 = time.perf_counter()
        np.copyto(b, a)
        return time.perf_counter() - t0

    cases: dict[str, Callable[[], Callable[[], float]]] = {"echo": lambda: run_echo, "memcpy": lambda: run_memcpy}
    for spin, stack in stacks.items():
        cases[f"put@{spin}"], cases[f"get@{spin}"] = stack.put, stack.get
    out = {name: np.empty(iters) for name in cases}
    for i in range(-10, iters):  # 10 warm-up rounds
        for name, prepare in cases.items():
            run = prepare()
            if idle_s:
                time.sleep(idle_s)
            dt = run()
            if i >= 0:
                out[name][i] = dt
    return out


def breakdown(trace_dir: str) -> None:
    """Per-hop medians from the FLEXKV_HOP_TRACE files the processes wrote (see flexkv/hoptrace.py)."""
    from flexkv import hoptrace

    hoptrace.flush()
    for line in hoptrace.summarize(trace_dir):
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300, help="timed ops per row")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per prompt (2 MiB each)")
    ap.add_argument("--idle-ms", type=float, default=10.0, help="sleep before each op in the idle rows")
    ap.add_argument("--cpu-blocks", type=int, default=128)
    ap.add_argument("--busy-poll-us", type=int, nargs="+", default=[0],
                    help="the busy_poll_us config key of the server and client; several: one server each, "
                         "their ops interleaved")
    ap.add_argument("--landing", choices=("off", "on", "both"), default="both",
                    help="register the rank with layerwise=True, so a get's wait ends from its progress table "
                         "(docs/layerwise.md); both: one server each way, their ops interleaved")
    ap.add_argument("--breakdown", action="store_true", help="record and print per-hop timestamps")
    args = ap.parse_args()
    if args.breakdown and (len(args.busy_poll_us) > 1 or args.landing == "both"):
        ap.error("--breakdown traces one server: give one --busy-poll-us value and --landing on or off")

    tmp = tempfile.mkdtemp(prefix="flexkv-smallops-")
    if args.breakdown:
        from flexkv import hoptrace  # (imported here: the script also runs on builds without it)

        os.makedirs(os.path.join(tmp, "hops"))
        hoptrace.enable(os.path.join(tmp, "hops"))  # the server and worker inherit it
    address = f"ipc://{tmp}/echo.sock"
    proc = mp.get_context("spawn").Process(target=echo_server, args=(address,), daemon=True)
    proc.start()
    echo = EchoClient(address)
    stacks: dict[str, SmallOpStack] = {}
    landings = {"off": [False], "on": [True], "both": [False, True]}[args.landing]
    try:
        for spin in args.busy_poll_us:
            for landing in landings:
                label = f"{spin}{' landing' if landing else ''}"
                stacks[label] = SmallOpStack(args.blocks, args.cpu_blocks, spin, landing)
        print(f"{args.blocks} blocks x {MODEL.block_bytes(T) >> 20} MiB per op (Llama-3-8B, T={T}), host buffers; "
              f"{args.iters} ops per row; p50/p99 ms; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        print(f"{'mode':<13} {'busy_poll_us':>18} {'put':>13} {'get':>13} {'zmq echo':>13} {'memcpy (hot)':>13} "
              f"{'goal p50':>8} {'met':>4}")
        for mode, idle in (("back to back", 0.0), (f"idle {args.idle_ms:g} ms", args.idle_ms / 1e3)):
            res = measure(stacks, echo, args.iters, idle)
            for spin in stacks:
                cells = [f"{np.percentile(res[k], 50) * 1e3:.3f}/{np.percentile(res[k], 99) * 1e3:.3f}"
                         for k in (f"put@{spin}", f"get@{spin}", "echo", "memcpy")]
                met = max(np.percentile(res[f"put@{spin}"], 50), np.percentile(res[f"get@{spin}"], 50)) * 1e3 <= GOAL_MS
                print(f"{mode:<13} {spin:>18} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>13} "
                      f"{GOAL_MS:>8.2f} {'yes' if met else 'NO':>4}", flush=True)
        bad = 0
        for stack in stacks.values():
            stack.kvm.check_invariants()
            bad += stack.bad_blocks
        print(f"restored blocks that differ from their source: {bad}")
        if bad:
            raise SystemExit(f"FAIL: {bad} restored blocks differ")
    finally:
        for stack in stacks.values():
            stack.close()
        echo.close()
        proc.join(5)
    if args.breakdown:
        breakdown(os.path.join(tmp, "hops"))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
