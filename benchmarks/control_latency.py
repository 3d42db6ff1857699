"""get_match latency through the socket (KVManager library mode) beside a bare ZeroMQ round trip.

Three things are timed per prompt length, interleaved iteration by iteration so a noisy neighbour
hits them alike:

* zmq echo: a DEALER -> ROUTER round trip over ipc to a bare echo process, with the real message
  sizes: the encoded GetMatchMsg header + the int64 token-id frame out, a reply header + a
  one-byte-per-token mask frame back. This is the ceiling: what the wire alone costs.
* miss:     ``KVManager.get_match`` of a prompt that is not cached (Llama-3-8B shape, 16 tokens per
  block, a 64-block CPU pool: a miss moves nothing, so the pool size does not matter).
* hit:      ``get_match`` of a prompt that is fully cached. It is stored first through the whole stack
  (put_async + host-device worker), so the pool must hold it: this server uses a tiny model shape
  (2 layers x 1 KV head x 16 dims, bf16: 2 KiB blocks) that keeps the pool small. Block bytes do not
  enter get_match. Each matched task is cancelled right after (not timed) so nothing stays locked.
* in-proc:  ``ControlPlane.get_match`` of the same cached prompt called directly in this process (no
  socket, no framing): the server's own work. hit - echo - in-proc = framing and dispatch overhead.

Goal: p50 <= 0.3 ms at 32K tokens and <= 0.5 ms at 128K.

``--metrics`` adds a fifth case, interleaved with the others: the same hit on a second cached server
with Prometheus metrics on (``metrics_port``) and scraped every second; the table then shows hit with
metrics off beside on (the exporter's cost on the request path).

    python benchmarks/control_latency.py                  # 1000 iterations per size, ~10 s
    python benchmarks/control_latency.py --iters 5000     # tighter p99 (~40 s)
    python benchmarks/control_latency.py --sizes 32768 131072
    python benchmarks/control_latency.py --metrics --sizes 1024 32768   # metrics off vs on, same run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import zmq
from scrape_load import Scraper, free_port

from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.protocol import client_msgs as cm
from flexkv.scheduler.control import ControlPlane
from flexkv.types import TaskStatus

T = 16
SIZES = (1024, 8192, 32768, 131072)
GOALS_MS = {32768: 0.3, 131072: 0.5}
LLAMA3_8B = ModelConfig(32, 8, 128, "bfloat16")
TINY = ModelConfig(2, 1, 16, "bfloat16")
RETIRE_EVERY = 64  # check that cancelled tasks report CANCELLED in batches of this many


# -- the ceiling: a bare echo process ---------------------------------------------------------------
def echo_server(address: str) -> None:
    """ROUTER that answers [header, token frame] with the reply header (the mask travels as a token
    range, like the server's MatchReplyMsg) until b"stop"."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    header = msgspec.msgpack.encode(cm.MatchReplyMsg(req_id=1, task_id=1, num_tokens=131072, mask_begin=0,
                                                     mask_end=131072))  # as SERVER_REPLIES encodes it
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        sock.send_multipart([frames[0], header], copy=False)
    ctx.destroy(linger=0)


class EchoClient:
    """The client half of the ceiling: the same pyzmq calls ServerConnection.request makes."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.connect(address)

    def round_trip(self, header: bytes, tokens: np.ndarray) -> None:
        # KVManager sends the block hashes it computed (8 bytes per block), not the token ids
        self._sock.send_multipart([header, tokens[: tokens.shape[0] // T].data], copy=False)
        if not self._sock.poll(10_000):
            raise RuntimeError("echo server did not answer")
        self._sock.recv_multipart(copy=False)

    def close(self) -> None:
        self._sock.send_multipart([b"stop"])
        time.sleep(0.05)
        self._ctx.destroy(linger=100)


def match_header(num_tokens: int) -> bytes:
    msg = cm.GetMatchMsg(client_id=0, req_id=num_tokens, task_id=10**6 + num_tokens, namespace=None, has_mask=False,
                         num_tokens=num_tokens)
    return msgspec.msgpack.encode(msg)  # the header frame KVManager sends (codec.CLIENT_REQUESTS)


# -- the two servers --------------------------------------------------------------------------------
class CachedServer:
    """A library-mode server (tiny model) holding every prompt fully cached in its CPU tier."""

    def __init__(self, prompts: dict[int, np.ndarray], metrics_port: int = 0) -> None:
        num_blocks = max(n // T for n in prompts)
        self.kvm = KVManager(TINY, CacheConfig(tokens_per_block=T, num_cpu_blocks=sum(n // T for n in prompts) + 16,
                                               metrics_port=metrics_port))
        self.kvm.start()
        layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, TINY.num_layers, num_blocks, T, TINY.num_kv_heads,
                               TINY.head_size, TINY.itemsize)
        self.bufs: HostKVBuffers = allocate_host_kv_buffers(layout, TINY.dtype, tag="bench")
        self.kvm.register_kv_buffers(self.bufs, layout)
        self.kvm.wait_ready(60)
        for n, toks in prompts.items():
            tid = self.kvm.put_async(toks, np.arange(n, dtype=np.int64))
            status = self.kvm.wait([tid], timeout=60)[tid].status
            if status is not TaskStatus.SUCCESS:
                raise RuntimeError(f"storing the {n}-token prompt failed: {status.name}")

    def close(self) -> None:
        self.kvm.shutdown()
        self.bufs.close()


class InProcessPlane:
    """A ControlPlane in this process with every prompt stored (ops completed by hand, no workers)."""

    def __init__(self, prompts: dict[int, np.ndarray]) -> None:
        num_blocks = sum(n // T for n in prompts) + 16
        self.plane = ControlPlane(TINY, CacheConfig(tokens_per_block=T, num_cpu_blocks=num_blocks))
        for i, (n, toks) in enumerate(prompts.items()):
            key = (0, i)
            self.plane.put_match(key, toks)
            pending = self.plane.launch(key, np.arange(n, dtype=np.int64))
            while pending:
                pending += self.plane.complete_op(pending.pop().op_id, True)
            self.plane.release(key)
        self._next_id = 0

    def timed_match(self, tokens: np.ndarray) -> tuple[float, int]:
        self._next_id += 1
        key = (1, self._next_id)
        t0 = time.perf_counter()
        mask = self.plane.get_match(key, tokens)
        dt = time.perf_counter() - t0
        self.plane.cancel(key)
        self.plane.release(key)
        return dt, int(mask.sum())


class Matcher:
    """Times get_match on one KVManager, cancels each task, and retires cancelled tasks in batches."""

    def __init__(self, kvm: KVManager) -> None:
        self.kvm = kvm
        self._cancelled: list[int] = []

    def timed_match(self, tokens: np.ndarray) -> tuple[float, int]:
        t0 = time.perf_counter()
        task_id, mask = self.kvm.get_match(tokens)
        dt = time.perf_counter() - t0
        self.kvm.cancel(task_id)
        self._cancelled.append(task_id)
        if len(self._cancelled) >= RETIRE_EVERY:
            self.retire()
        return dt, int(mask.sum())

    def retire(self) -> None:
        if self._cancelled:
            res = self.kvm.wait(self._cancelled, timeout=5.0)
            bad = [t for t, r in res.items() if r.status is not TaskStatus.CANCELLED]
            if bad:
                raise RuntimeError(f"tasks {bad[:4]} are not CANCELLED after cancel")
            self._cancelled = []


# -- measurement ------------------------------------------------------------------------------------
def measure_size(num_tokens: int, iters: int, warmup: int, echo: EchoClient, miss: Matcher, hit: Matcher,
                 inproc: InProcessPlane, prompt: np.ndarray, rng: np.random.Generator,
                 hit_metrics: Matcher | None = None) -> dict[str, np.ndarray]:
    """Interleaved echo / miss / hit / in-proc timings (seconds) for one prompt length; checks every mask."""
    header = match_header(num_tokens)
    uncached = rng.integers(0, 1 << 40, num_tokens, dtype=np.int64)
    expect_hit = (num_tokens // T) * T

    def run_echo() -> float:
        t0 = time.perf_counter()
        echo.round_trip(header, uncached)
        return time.perf_counter() - t0

    def run_miss() -> float:
        dt, loaded = miss.timed_match(uncached)
        if loaded:
            raise RuntimeError(f"an uncached prompt matched {loaded} tokens")
        return dt

    def run_hit() -> float:
        dt, loaded = hit.timed_match(prompt)
        if loaded != expect_hit:
            raise RuntimeError(f"a cached {num_tokens}-token prompt matched {loaded} tokens, not {expect_hit}")
        return dt

    def run_hit_metrics() -> float:
        assert hit_metrics is not None
        dt, loaded = hit_metrics.timed_match(prompt)
        if loaded != expect_hit:
            raise RuntimeError(f"a cached {num_tokens}-token prompt matched {loaded} tokens, not {expect_hit}")
        return dt

    def run_inproc() -> float:
        dt, loaded = inproc.timed_match(prompt)
        if loaded != expect_hit:
            raise RuntimeError(f"in-process match of a cached prompt gave {loaded} tokens, not {expect_hit}")
        return dt

    runs: dict[str, Callable[[], float]] = {"echo": run_echo, "miss": run_miss, "hit": run_hit, "inproc": run_inproc}
    if hit_metrics is not None:
        runs["hit_metrics"] = run_hit_metrics
    out = {name: np.empty(iters) for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for i in range(iters):
        for name, fn in runs.items():
            out[name][i] = fn()
    miss.retire()
    hit.retire()
    if hit_metrics is not None:
        hit_metrics.retire()
    return out


def print_table(results: dict[int, dict[str, np.ndarray]]) -> None:
    print("latency in ms (p50 / p99); ceiling = bare ZeroMQ echo with the same frame sizes, same run")
    print(f"{'tokens':>7} {'zmq echo':>15} {'get_match miss':>15} {'get_match hit':>15} {'in-proc hit':>15} "
          f"{'hit-echo p50':>12} {'goal p50':>8} {'met':>4}")
    for n, res in results.items():
        cells = [f"{np.percentile(res[k], 50) * 1e3:>7.3f}/{np.percentile(res[k], 99) * 1e3:<7.3f}"
                 for k in ("echo", "miss", "hit", "inproc")]
        p50_hit = float(np.percentile(res["hit"], 50)) * 1e3
        p50_miss = float(np.percentile(res["miss"], 50)) * 1e3
        extra = p50_hit - float(np.percentile(res["echo"], 50)) * 1e3
        goal = GOALS_MS.get(n)
        met = "-" if goal is None else ("yes" if max(p50_hit, p50_miss) <= goal else "NO")
        goal_s = "-" if goal is None else f"{goal:.1f}"
        print(f"{n:>7} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15} {extra:>12.3f} {goal_s:>8} "
              f"{met:>4}")
    if all("hit_metrics" in res for res in results.values()):
        print_metrics_table(results)


def print_metrics_table(results: dict[int, dict[str, np.ndarray]]) -> None:
    """get_match hit on two servers, metrics off and on (scraped every second), interleaved."""
    print("metrics off vs on (hit, same run, interleaved; ms):")
    print(f"{'tokens':>7} {'off p50':>8} {'on p50':>8} {'on-off':>8} {'off p99':>8} {'on p99':>8} {'mean on/off':>11}")
    for n, res in results.items():
        off, on = res["hit"] * 1e3, res["hit_metrics"] * 1e3
        print(f"{n:>7} {np.percentile(off, 50):>8.3f} {np.percentile(on, 50):>8.3f} "
              f"{np.percentile(on, 50) - np.percentile(off, 50):>8.3f} {np.percentile(off, 99):>8.3f} "
              f"{np.percentile(on, 99):>8.3f} {on.mean() / off.mean():>11.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=1000, help="timed get_match calls per size and case")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="prompt lengths in tokens")
    ap.add_argument("--metrics", action="store_true",
                    help="also time the hit on a server with metrics on, scraped every second")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(0, 1 << 40, n, dtype=np.int64) for n in args.sizes}
    tmp = tempfile.mkdtemp(prefix="flexkv-bench-")
    address = f"ipc://{tmp}/echo.sock"
    proc = mp.get_context("spawn").Process(target=echo_server, args=(address,), daemon=True)
    proc.start()
    echo = EchoClient(address)
    uncached_kvm = KVManager(LLAMA3_8B, CacheConfig(tokens_per_block=T, num_cpu_blocks=64))
    cached: CachedServer | None = None
    metered: CachedServer | None = None
    scraper: Scraper | None = None
    try:
        uncached_kvm.start()
        t0 = time.perf_counter()
        cached = CachedServer(prompts)
        inproc = InProcessPlane(prompts)
        if args.metrics:
            port = free_port()
            metered = CachedServer(prompts, metrics_port=port)
            scraper = Scraper(port)
        print(f"pid {os.getpid()}: servers up; {sum(prompts) // T} blocks stored for the hit case "
              f"in {time.perf_counter() - t0:.1f} s; {args.iters} iterations per size")
        results: dict[int, dict[str, Any]] = {}
        for n in args.sizes:
            results[n] = measure_size(n, args.iters, args.warmup, echo, Matcher(uncached_kvm), Matcher(cached.kvm),
                                      inproc, prompts[n], rng, Matcher(metered.kvm) if metered else None)
        cached.kvm.check_invariants()
        uncached_kvm.check_invariants()
        inproc.plane.check_invariants()
        print_table(results)
        if scraper is not None:
            print(f"{scraper.close()} scrapes of {scraper.last_bytes} bytes during the run")
    finally:
        if scraper is not None:
            scraper.close()
        if metered is not None:
            metered.close()
        echo.close()
        proc.join(5)
        if cached is not None:
            cached.close()
        uncached_kvm.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
