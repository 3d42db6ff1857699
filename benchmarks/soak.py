"""Soak: N minutes of mixed put/get from several client processes against one server (CPU + SSD,
+ a loopback redis-server when one is installed), watching for growth.

Every interval it prints, per interval: operations, get/put latency p50/p99, wrong-byte gets (each
block's KV is a function of its prompt position, so any client can check any get), the server's
and the workers' RSS and open fds, and flexkv's /dev/shm segments. At the end it prints each
resource's growth per hour (least-squares slope over the samples after the first, warm-up, one).
Everything it starts (server, workers, clients, redis, temp dirs, shm) is stopped and removed.

    python benchmarks/soak.py --minutes 3
    python benchmarks/soak.py --minutes 30 --clients 4 --interval 30
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from flexkv.common.config import CacheConfig, ModelConfig, RemoteConfig, configs_to_json
from flexkv.layout import LayoutKind

T = 16
MODEL_ARGS = {"num_layers": 4, "num_kv_heads": 4, "head_size": 32, "dtype": "float16"}  # 32 KiB blocks
NUM_PROMPTS = 96  # prompt pool shared by every client; 8 families share their first blocks
ENGINE_BLOCKS = 64


def prompt_tokens(idx: int) -> np.ndarray:
    """Prompt ``idx``: 4..16 blocks; prompts of one family (idx % 8) share their first 3 blocks."""
    rng = np.random.default_rng(1000 + idx)
    family = np.random.default_rng(idx % 8).integers(0, 50_000, 3 * T, dtype=np.int64)
    rest = rng.integers(0, 50_000, int(rng.integers(1, 14)) * T, dtype=np.int64)
    return np.concatenate([family, rest])


def block_fill(toks: np.ndarray, block: int, nbytes: int) -> np.ndarray:
    """The KV bytes of ``block`` of a prompt: a function of its token prefix, as a real engine's are."""
    seed = int(np.frombuffer(toks[:(block + 1) * T].tobytes(), dtype=np.uint64).sum() % (2**63))
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def client_main(address: str, cache_json: str, client_id: int, seed: int, stop: Any, out: Any,
                landing: bool = False) -> None:
    """One engine: a KVManager with host KV buffers, random puts and gets until ``stop`` is set (``landing``:
    buffers registered with a progress table, so every get's wait ends from it; docs/layerwise.md)."""
    from flexkv.client import allocate_host_kv_buffers
    from flexkv.common.config import configs_from_json
    from flexkv.kvmanager import KVManager
    from flexkv.types import TaskStatus

    model, cache = configs_from_json(cache_json)
    kvm = KVManager(model, cache, address, dp_client_id=client_id)
    kvm.start()
    layout = _rank_layout(model)
    bufs = allocate_host_kv_buffers(layout, model.dtype, tag="soak")
    try:
        kvm.register_kv_buffers(bufs, bufs.layout, layerwise=landing)
        kvm.wait_ready(60)
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {"get": [], "put": []}
        wrong = errors = 0
        last = time.monotonic()
        while not stop.is_set():
            toks = prompt_tokens(int(rng.integers(0, NUM_PROMPTS)))
            n = len(toks) // T
            blocks = [int(b) for b in rng.choice(ENGINE_BLOCKS, n, replace=False)]
            slots = (np.asarray(blocks)[np.arange(len(toks)) // T] * T + np.arange(len(toks)) % T).astype(np.int64)
            t0 = time.perf_counter()
            if rng.random() < 0.5:
                for i, b in enumerate(blocks):
                    _write_block(bufs, b, block_fill(toks, i, _block_nbytes(bufs)))
                tid = kvm.put_async(toks, slots)
                status = kvm.wait(tid, timeout=30)[tid].status
                samples["put"].append(time.perf_counter() - t0)
            else:
                for b in blocks:
                    _write_block(bufs, b, np.full(_block_nbytes(bufs), 0xAB, dtype=np.uint8))
                tid = kvm.get_async(toks, slots)
                resp = kvm.wait(tid, timeout=30)[tid]
                status = resp.status
                samples["get"].append(time.perf_counter() - t0)
                loaded = int(resp.return_mask.sum()) // T if resp.return_mask is not None else 0
                wrong += sum(not np.array_equal(_read_block(bufs, blocks[i]), block_fill(toks, i, _block_nbytes(bufs)))
                             for i in range(loaded))
            errors += status is not TaskStatus.SUCCESS
            if time.monotonic() - last >= 1.0:
                out.put((client_id, samples, wrong, errors))
                samples, wrong, errors, last = {"get": [], "put": []}, 0, 0, time.monotonic()
        out.put((client_id, samples, wrong, errors))
    finally:
        kvm.shutdown()
        bufs.close()


def _rank_layout(model: ModelConfig) -> Any:
    from flexkv.layout import KVCacheLayout

    return KVCacheLayout(kind=LayoutKind.VLLM_KV_FIRST, num_layers=model.num_layers, num_blocks=ENGINE_BLOCKS,
                         tokens_per_block=T, num_heads=model.num_kv_heads, head_size=model.head_size,
                         itemsize=model.itemsize)


def _block_views(bufs: Any, block: int) -> Iterator[np.ndarray]:
    lay = bufs.layout
    for layer in range(lay.num_layers):
        for kv in range(lay.kv_dim):
            t, off = lay.chunk_offset(layer, kv, block)
            yield bufs.arrays[t].reshape(-1).view(np.uint8)[off: off + lay.chunk_bytes]


def _block_nbytes(bufs: Any) -> int:
    return int(bufs.layout.num_layers * bufs.layout.kv_dim * bufs.layout.chunk_bytes)


def _write_block(bufs: Any, block: int, data: np.ndarray) -> None:
    pos = 0
    for view in _block_views(bufs, block):
        view[:] = data[pos: pos + view.size]
        pos += view.size


def _read_block(bufs: Any, block: int) -> np.ndarray:
    return np.concatenate(list(_block_views(bufs, block)))


# ---- the parent: server, redis, sampling ----------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(stat.split("/")[2]))
    return out


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _num_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _shm(pids: list[int]) -> tuple[int, float]:
    """(count, MiB) of /dev/shm segments named after one of ``pids`` (flexkv-<kind>-<pid>-<suffix>)."""
    names = [p for p in glob.glob("/dev/shm/flexkv-*") if _segment_pid(p) in pids]
    return len(names), sum(_size(p) for p in names) / 2**20


def _segment_pid(path: str) -> int:
    parts = os.path.basename(path).split("-")
    return int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else -1


def _size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def _slope_per_hour(times: list[float], values: list[float]) -> float:
    if len(times) < 3:
        return float("nan")
    t, v = np.asarray(times[1:]), np.asarray(values[1:])
    return float(np.polyfit(t, v, 1)[0] * 3600) if np.ptp(t) > 0 else float("nan")


@contextlib.contextmanager
def _redis(enabled: bool) -> Iterator[int | None]:
    if not enabled or shutil.which("redis-server") is None:
        yield None
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        yield server.port


def run(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="flexkv-soak-")
    procs: list[Any] = []
    server: subprocess.Popen[bytes] | None = None
    pids: list[int] = []
    try:
        with _redis(not args.no_redis) as redis_port:
            model = ModelConfig(**MODEL_ARGS, dp_size=args.clients)  # type: ignore[arg-type]
            os.makedirs(os.path.join(work, "ssd"))
            remote = RemoteConfig(port=redis_port) if redis_port else RemoteConfig()
            cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=args.cpu_blocks, enable_ssd=True,
                                num_ssd_blocks=args.ssd_blocks, ssd_cache_dir=(os.path.join(work, "ssd"),),
                                enable_remote=redis_port is not None, remote=remote)
            address = f"ipc://{work}/server.sock"
            log = open(os.path.join(work, "server.log"), "wb")
            server = subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                                       configs_to_json(model, cache), "--address", address], stdout=log, stderr=log)
            redis_text = f"on port {redis_port}" if redis_port else "off"
            print(f"soak: {args.minutes} min, {args.clients} clients, CPU {args.cpu_blocks} + SSD {args.ssd_blocks} "
                  f"blocks of {model.block_bytes(T) >> 10} KiB, redis {redis_text}, get waits "
                  f"{'from the progress table' if args.landing else 'through the server'}", flush=True)
            ctx = mp.get_context("spawn")
            stop, out = ctx.Event(), ctx.Queue()
            cfg = configs_to_json(model, cache)
            procs = [ctx.Process(target=client_main, args=(address, cfg, i, 7 + i, stop, out, args.landing))
                     for i in range(args.clients)]
            for p in procs:
                p.start()
            sample(args, server, procs, out, stop, pids)
            for p in procs:
                p.join(60)
            server.send_signal(signal.SIGINT)
            rc = server.wait(60)
            log.close()
            leftover = _shm([server.pid, *[p.pid for p in procs if p.pid]])
            print(f"server exit code {rc}; flexkv shm segments left by server/clients: {leftover[0]}")
            return 0 if rc == 0 else 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in glob.glob("/dev/shm/flexkv-*"):
            if server is not None and _segment_pid(path) in (server.pid, *[p.pid for p in procs if p.pid]):
                os.unlink(path)
        shutil.rmtree(work, ignore_errors=True)


def sample(args: argparse.Namespace, server: subprocess.Popen[bytes], procs: list[Any], out: Any, stop: Any,
           pids: list[int]) -> None:
    """Collect latencies from the clients and resource samples from the server side until the end."""
    start = time.monotonic()
    end = start + args.minutes * 60
    series: dict[str, list[float]] = {k: [] for k in ("t", "server_rss", "worker_rss", "fds", "shm_mb", "shm_n")}
    print(f"{'t s':>6} {'ops':>6} {'get p50':>8} {'get p99':>8} {'put p50':>8} {'put p99':>8} {'wrong':>5} {'fail':>4} "
          f"{'srv MB':>7} {'wrk MB':>7} {'fds':>5} {'shm n':>5} {'shm MB':>7}", flush=True)
    next_t = start + args.interval
    lat: dict[str, list[float]] = {"get": [], "put": []}
    wrong = fails = 0
    done = False
    while not done:
        now = time.monotonic()
        if now >= end:
            stop.set()
            done = True
        with contextlib.suppress(queue.Empty):
            while True:
                _, s, w, e = out.get(timeout=0.2 if not done else 5)
                lat["get"] += s["get"]
                lat["put"] += s["put"]
                wrong, fails = wrong + w, fails + e
                if done and all(not p.is_alive() for p in procs):
                    break
        if time.monotonic() < next_t and not done:
            continue
        next_t += args.interval
        if server.poll() is not None or (not done and not any(p.is_alive() for p in procs)):
            print(f"server exit code {server.poll()}, clients alive {sum(p.is_alive() for p in procs)}: stopping",
                  flush=True)
            stop.set()
            break
        workers = _children(server.pid)
        pids[:] = workers
        shm_n, shm_mb = _shm([server.pid, *workers, *[p.pid for p in procs if p.pid]])
        t = time.monotonic() - start
        row = {"t": t, "server_rss": _rss_mb(server.pid), "worker_rss": sum(_rss_mb(p) for p in workers),
               "fds": _num_fds(server.pid) + sum(_num_fds(p) for p in workers), "shm_mb": shm_mb, "shm_n": shm_n}
        if not done:  # the last row is taken while the clients exit: printed, not fitted
            for k, v in row.items():
                series[k].append(float(v))
        num_ops = len(lat["get"]) + len(lat["put"])
        print(f"{t:6.0f} {num_ops:6d} {_pct(lat['get'], 50):8.2f} {_pct(lat['get'], 99):8.2f} "
              f"{_pct(lat['put'], 50):8.2f} {_pct(lat['put'], 99):8.2f} {wrong:5d} {fails:4d} {row['server_rss']:7.1f} "
              f"{row['worker_rss']:7.1f} {row['fds']:5.0f} {shm_n:5d} {shm_mb:7.1f}", flush=True)
        lat, wrong, fails = {"get": [], "put": []}, 0, 0
    print("growth per hour (slope after the first sample): " + ", ".join(
        f"{k} {_slope_per_hour(series['t'], series[k]):+.1f}" for k in ("server_rss", "worker_rss", "fds", "shm_mb")),
        "(MB, MB, fds, MB)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=3, help="client processes (one DP client id each)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--cpu-blocks", type=int, default=256, help="CPU tier blocks (small: SSD gets traffic)")
    parser.add_argument("--ssd-blocks", type=int, default=2048)
    parser.add_argument("--no-redis", action="store_true", help="never start a redis-server")
    parser.add_argument("--landing", action="store_true",
                        help="register each client's buffers with a progress table: get waits end from it")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
