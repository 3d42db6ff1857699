"""Remote tier throughput: flexkv's Redis, filesystem and Mooncake stores beside raw baselines, same run.

Redis ceiling: raw redis-py (hiredis) SET/GET of the very same values (block + trailer) on the
same server, one command at a time, plus pipelined GET and MGET for the "which batching" question.
Filesystem ceiling: plain open/write/close and open/readinto/close of the same bytes, same directory.
Mooncake (when the package is installed): a master and one segment holder started on loopback;
flexkv's zero-copy MooncakeStore beside Mooncake's own bytes API (put_batch/get_batch) on the same
store, and beside the raw redis-py rows of the same run.
Each variant runs ``--repeat`` times interleaved with the others; the table shows the median.

    python benchmarks/remote.py                       # 256 x 2 MiB blocks, local redis-server, /tmp
    python benchmarks/remote.py --num-blocks 1024 --port 6379 --fs-path /mnt/nfs/bench
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import redis
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexkv.common.config import RemoteConfig
from flexkv.remote import FilesystemStore, RedisStore, RemoteStore
from flexkv.remote.base import make_trailer
from tests.mooncake_server import MooncakeStoreProcesses
from tests.mooncake_server import available as mooncake_available
from tests.redis_server import RedisServer

MIB = 1 << 20


class Bench:
    """The pool (random blocks), their hashes, the raw values, and the timing table."""

    def __init__(self, num_blocks: int, block_bytes: int) -> None:
        self.num_blocks, self.block_bytes = num_blocks, block_bytes
        rng = np.random.default_rng(0)
        self.src = rng.integers(0, 256, num_blocks * block_bytes, dtype=np.uint8)
        self.dst = np.zeros_like(self.src)
        self.hashes = rng.integers(1, 2**63, num_blocks, dtype=np.uint64)
        self.ids = np.arange(num_blocks)
        views = [self.src.data[i * block_bytes:(i + 1) * block_bytes] for i in range(num_blocks)]
        self.values = [bytes(v) + make_trailer(v, int(h)) for v, h in zip(views, self.hashes, strict=True)]
        self.results: dict[str, list[float]] = {}

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def time(self, name: str, run: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        run()
        self.results.setdefault(name, []).append(self.total_bytes / (time.perf_counter() - t0) / 1e9)

    def median(self, name: str) -> float:
        return statistics.median(self.results[name])

    def pool_args(self, pool: np.ndarray) -> tuple[np.ndarray, int, int, np.ndarray, int]:
        return self.hashes, int(pool.ctypes.data), self.block_bytes, self.ids, self.block_bytes


def redis_round(bench: Bench, client: redis.Redis, stores: dict[int, RedisStore]) -> None:
    """One interleaved round of every Redis variant."""
    keys = [b"raw:%d" % i for i in range(bench.num_blocks)]
    bench.time("raw SET", lambda: [client.set(k, v) for k, v in zip(keys, bench.values, strict=True)])
    for inflight, store in stores.items():
        bench.time(f"flexkv put (inflight {inflight})", functools.partial(_put, store, bench))
    bench.time("raw GET", lambda: [client.get(k) for k in keys])
    bench.time("raw pipeline GET x16", lambda: [_pipeline_get(client, keys[i:i + 16]) for i in range(0, len(keys), 16)])
    bench.time("raw MGET x16", lambda: [client.mget(keys[i:i + 16]) for i in range(0, len(keys), 16)])
    for inflight, store in stores.items():
        bench.dst[:] = 0
        bench.time(f"flexkv get (inflight {inflight})", functools.partial(_get, store, bench))
        assert np.array_equal(bench.dst, bench.src)


def _put(store: RemoteStore, bench: Bench) -> None:
    _check(store.put_blocks(*bench.pool_args(bench.src)))


def _get(store: RemoteStore, bench: Bench) -> None:
    _check(store.get_blocks(*bench.pool_args(bench.dst)))


def _check(ok: np.ndarray) -> None:
    if not ok.all():
        raise RuntimeError(f"{int((~ok).sum())} blocks failed")


def _pipeline_get(client: redis.Redis, keys: list[bytes]) -> list[object]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return pipe.execute()


def fs_round(bench: Bench, stores: dict[int, FilesystemStore], plain_dir: str) -> None:
    """One interleaved round of plain file I/O and the filesystem store on the same directory."""
    paths = [os.path.join(plain_dir, f"{i:08d}") for i in range(bench.num_blocks)]

    def plain_write() -> None:
        for path, value in zip(paths, bench.values, strict=True):
            with open(path, "wb") as f:
                f.write(value)

    def plain_read() -> None:
        view = bench.dst.data
        for i, path in enumerate(paths):
            with open(path, "rb", buffering=0) as f:
                f.readinto(view[i * bench.block_bytes:(i + 1) * bench.block_bytes])

    bench.time("plain file write", plain_write)
    for threads, store in stores.items():
        bench.time(f"flexkv fs put ({threads} threads)", functools.partial(_put, store, bench))
    bench.time("plain file read", plain_read)
    for threads, store in stores.items():
        bench.dst[:] = 0
        bench.time(f"flexkv fs get ({threads} threads)", functools.partial(_get, store, bench))
        assert np.array_equal(bench.dst, bench.src)


def mooncake_round(bench: Bench, store: RemoteStore) -> None:
    """One round on Mooncake: raw bytes API, then flexkv's zero-copy store; keys removed between
    puts (a put of an existing key is not a write)."""
    raw = store._store  # type: ignore[attr-defined]
    keys = [f"raw:{i}" for i in range(bench.num_blocks)]
    flexkv_keys = [store.key(int(h)) for h in bench.hashes]  # type: ignore[attr-defined]
    raw.batch_remove(keys + flexkv_keys, True)
    # the bytes API stages through the client's 16 MiB local buffer: batches of 4 blocks
    chunks = [slice(i, i + 4) for i in range(0, bench.num_blocks, 4)]
    def raw_put() -> None:
        for c in chunks:
            _check_code(raw.put_batch(keys[c], bench.values[c]))

    bench.time("raw mooncake put_batch (bytes)", raw_put)
    bench.time("flexkv mooncake put", functools.partial(_put, store, bench))
    bench.time("raw mooncake get_batch (bytes)", lambda: [raw.get_batch(keys[c]) for c in chunks])
    bench.dst[:] = 0
    bench.time("flexkv mooncake get", functools.partial(_get, store, bench))
    assert np.array_equal(bench.dst, bench.src)


def _check_code(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"mooncake put_batch returned {code}")


def checksum_round(bench: Bench) -> None:
    view = bench.src.data
    bs = bench.block_bytes
    bench.time("xxh3_64 of every block", lambda: [xxhash.xxh3_64_intdigest(view[i * bs:(i + 1) * bs])
                                                  for i in range(bench.num_blocks)])


def print_table(bench: Bench, rows: list[tuple[str, str | None]]) -> None:
    print(f"{'variant':34} {'GB/s':>7} {'ceiling':>38} {'ratio':>7}")
    for name, ceiling in rows:
        if name not in bench.results:
            continue
        value = bench.median(name)
        if ceiling is None:
            print(f"{name:34} {value:7.2f}")
        else:
            print(f"{name:34} {value:7.2f} {ceiling + f' {bench.median(ceiling):.2f}':>38} "
                  f"{value / bench.median(ceiling):6.0%}")


@contextlib.contextmanager
def redis_target(args: argparse.Namespace) -> Iterator[int]:
    if args.port:
        yield args.port
        return
    with RedisServer() as server:
        yield server.port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--block-mib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--fs-threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="use this redis server (default: start one)")
    parser.add_argument("--fs-path", default="", help="shared filesystem directory (default: a temp dir)")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--skip-fs", action="store_true")
    parser.add_argument("--skip-mooncake", action="store_true")
    args = parser.parse_args()
    bench = Bench(args.num_blocks, int(args.block_mib * MIB))
    print(f"{args.num_blocks} blocks x {args.block_mib} MiB, median of {args.repeat} interleaved rounds")
    rows: list[tuple[str, str | None]] = [("xxh3_64 of every block", None)]
    for _ in range(args.repeat):
        checksum_round(bench)
    if not args.skip_redis:
        with redis_target(args) as port:
            config = RemoteConfig(host=args.host, port=port, key_prefix="bench")
            stores = {k: RedisStore(config, max_inflight=k) for k in args.inflight}
            client = redis.Redis(host=args.host, port=port, protocol=2)
            for _ in range(args.repeat):
                redis_round(bench, client, stores)
            client.delete(*[b"raw:%d" % i for i in range(args.num_blocks)])
            client.delete(*[next(iter(stores.values())).key(int(h)) for h in bench.hashes])
        rows += [("raw SET", None)] + [(f"flexkv put (inflight {k})", "raw SET") for k in args.inflight]
        rows += [("raw GET", None), ("raw pipeline GET x16", "raw GET"), ("raw MGET x16", "raw GET")]
        rows += [(f"flexkv get (inflight {k})", "raw GET") for k in args.inflight]
    if not args.skip_fs:
        with tempfile.TemporaryDirectory(dir=args.fs_path or None, prefix="flexkv-bench-") as root:
            plain_dir = os.path.join(root, "plain")
            os.makedirs(plain_dir)
            config = RemoteConfig(backend="filesystem", path=root)
            fs_stores = {k: FilesystemStore(config, num_threads=k) for k in args.fs_threads}
            for _ in range(args.repeat):
                fs_round(bench, fs_stores, plain_dir)
        rows += [("plain file write", None)] + [(f"flexkv fs put ({k} threads)", "plain file write")
                                                 for k in args.fs_threads]
        rows += [("plain file read", None)] + [(f"flexkv fs get ({k} threads)", "plain file read")
                                                for k in args.fs_threads]
    if not args.skip_mooncake and mooncake_available():
        rows += run_mooncake(bench, args.repeat)
    print_table(bench, rows)


def run_mooncake(bench: Bench, repeat: int) -> list[tuple[str, str | None]]:
    from flexkv.remote.mooncake_store import MooncakeStore

    segment_mb = 3 * bench.total_bytes // MIB + 64  # raw copy + flexkv copy + slack
    with MooncakeStoreProcesses(segment_mb=segment_mb) as procs:
        store = MooncakeStore(RemoteConfig(backend="mooncake", port=procs.port, key_prefix="bench"))
        store.register_pool(int(bench.src.ctypes.data), bench.src.nbytes)
        store.register_pool(int(bench.dst.ctypes.data), bench.dst.nbytes)
        try:
            for _ in range(repeat):
                mooncake_round(bench, store)
        finally:
            store.close()
    return [("raw mooncake put_batch (bytes)", None), ("flexkv mooncake put", "raw mooncake put_batch (bytes)"),
            ("flexkv mooncake put", "raw SET"), ("raw mooncake get_batch (bytes)", None),
            ("flexkv mooncake get", "raw mooncake get_batch (bytes)"), ("flexkv mooncake get", "raw GET")]


if __name__ == "__main__":
    main()
