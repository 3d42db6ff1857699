"""SSD tier throughput: flexkv's SSDStore (io_uring, O_DIRECT) against fio on the same file.

For each block size and queue depth, every block of a ``--size`` file is written once in random
order from a memory pool, then read back once in random order, first by flexkv, then by fio
(ioengine=io_uring, direct=1, same iodepth, block size and file). Each point runs ``--repeats``
times; the table shows every run. Page cache is dropped before reads where permitted.

flexkv's writes include what makes them durable and verifiable: the XXH3 checksum of every block,
an fdatasync of the data file and the journal records (fdatasync'ed too) -- fio's writes have none
of that, so ``--fio-extra=--end_fsync=1`` gives fio the same final flush. ``--durable 0`` skips
flexkv's fdatasyncs (records reach the page cache only). Reads verify every block's checksum.

``--rebuild N`` instead measures the restart path for N blocks: appending N journal records (the
write path's extra cost per block), scanning the journal and rebuilding the SSD radix index
(blocks/s), and, for the alternative design of a header in every slot scanned at start, reading
one 4 KiB page per slot with io_uring + O_DIRECT (slots 4 KiB apart: an upper bound).

    python benchmarks/ssd.py                      # 1 GiB in /tmp, 2 MiB and 256 KiB, depths 32/128/512
    python benchmarks/ssd.py --dir /mnt/nvme0 --size 8 --repeats 3
    python benchmarks/ssd.py --rebuild 1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from flexkv.native.checksum import checksum_blocks
from flexkv.workers.ssd_store import SSDStore

GIB = 1 << 30


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def run_fio(path: str, is_write: bool, block_bytes: int, size: int, depth: int, extra: list[str]) -> float:
    """fio's bandwidth in GB/s for one pass over ``path`` in random block order."""
    cmd = ["fio", "--name=flexkv-ref", f"--filename={path}", f"--rw={'randwrite' if is_write else 'randread'}",
           f"--bs={block_bytes}", f"--size={size}", f"--iodepth={depth}", "--ioengine=io_uring", "--direct=1",
           "--randrepeat=0", "--output-format=json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["write" if is_write else "read"]["bw_bytes"]) / 1e9


def run_flexkv(store: SSDStore, is_write: bool, pool_addr: int, block_bytes: int) -> float:
    """flexkv's GB/s for one pass over every block in random order (random pool slots too)."""
    rng = np.random.default_rng()
    n = store.layout.num_blocks
    ssd_ids, cpu_ids = rng.permutation(n), rng.permutation(n)
    io = store.write_blocks if is_write else store.read_blocks
    start = time.perf_counter()
    results = io(ssd_ids, pool_addr, block_bytes, cpu_ids)
    elapsed = time.perf_counter() - start
    if np.any(results):
        raise RuntimeError(f"{int(np.count_nonzero(results))} block I/O(s) failed, first {results[results != 0][0]}")
    return n * block_bytes / elapsed / 1e9


def measure_pair(args: argparse.Namespace, store: SSDStore, is_write: bool, depth: int, pool_addr: int,
                 fio_first: bool) -> tuple[float, float]:
    """(flexkv GB/s, fio GB/s) for one pass each; ``fio_first`` picks who runs first."""
    block_bytes = store.layout.block_bytes
    path, _ = store.locate(0)
    order = ["fio", "flexkv"] if fio_first else ["flexkv", "fio"]
    speeds = {"fio": float("nan")}
    for who in order:
        if who == "fio" and args.no_fio:
            continue
        if not is_write:
            drop_caches()
        if who == "flexkv":
            speeds[who] = run_flexkv(store, is_write, pool_addr, block_bytes)
        else:
            speeds[who] = run_fio(path, is_write, block_bytes, store.layout.num_blocks * block_bytes, depth,
                                  args.fio_extra.split())
    return speeds["flexkv"], speeds["fio"]


def bench_point(args: argparse.Namespace, block_bytes: int, depth: int, pool_addr: int) -> None:
    num_blocks = args.size // block_bytes
    with SSDStore([args.dir], num_blocks, block_bytes, num_blocks * block_bytes, depth=depth,
                  durable=bool(args.durable)) as store:
        run_flexkv(store, True, pool_addr, block_bytes)  # untimed: turn preallocated extents into written ones
        for op in args.ops.split(","):
            if op == "read":  # fio's write passes replaced our blocks: reads of them would fail verification
                run_flexkv(store, True, pool_addr, block_bytes)
            runs = []
            for rep in range(args.repeats):
                # Alternate who goes first: a virtual disk's burst budget favours the first runner.
                fio_first = rep % 2 == 1
                ours, ref = measure_pair(args, store, op == "write", depth, pool_addr, fio_first)
                runs.append((ours, ref))
                print(f"{op:5} {block_bytes >> 10:>7}K {depth:>5} {rep + 1:>3} {'fio' if fio_first else 'flexkv':>6}  "
                      f"{ours:>11.3f} {ref:>9.3f} {ours / ref:>7.1%}", flush=True)
            med_ours, med_ref = (float(np.median([r[i] for r in runs])) for i in (0, 1))
            print(f"{op:5} {block_bytes >> 10:>7}K {depth:>5} median       {med_ours:>11.3f} {med_ref:>9.3f} "
                  f"{med_ours / med_ref:>7.1%}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory on the drive to test (default: a temp dir in /tmp)")
    parser.add_argument("--ops", default="write,read",
                        help="which passes to time, in order (default write,read; 'read' alone measures reads "
                             "without the write passes before them, which slow this virtual disk's reads)")
    parser.add_argument("--size", type=parse_bytes, default=GIB, help="file size, e.g. 1G (default), 8G")
    parser.add_argument("--block-sizes", default="2M,256K", help="comma-separated block sizes")
    parser.add_argument("--depths", default="32,128,512", help="comma-separated queue depths")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point (the disk may be noisy)")
    parser.add_argument("--no-fio", action="store_true", help="skip the fio reference")
    parser.add_argument("--fio-extra", default="", help='extra fio options, e.g. "--fixedbufs=1 --registerfiles=1"')
    parser.add_argument("--durable", type=int, default=1, help="1 (default): fdatasync data, then journal records")
    parser.add_argument("--rebuild", type=int, default=0, help="measure the restart path for this many blocks")
    args = parser.parse_args()
    if args.rebuild:
        return bench_rebuild(args)
    if not args.no_fio and shutil.which("fio") is None:
        print("fio not found; install it or pass --no-fio", file=sys.stderr)
        return 2
    temp_dir = None
    if args.dir is None:
        args.dir = temp_dir = tempfile.mkdtemp(prefix="flexkv_ssd_bench_", dir="/tmp")
    logging.basicConfig(level=logging.WARNING)
    block_sizes = [parse_bytes(b) for b in args.block_sizes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    print(f"dir {args.dir}, file {args.size / GIB:.2f} GiB, page cache drop "
          f"{'ok' if drop_caches() else 'not permitted'}")
    print(f"{'op':5} {'block':>8} {'depth':>5} {'run':>3} {'first':>6}  {'flexkv GB/s':>11} {'fio GB/s':>9} "
          f"{'ratio':>7}")
    pool = mmap.mmap(-1, args.size)
    pool_addr = np.frombuffer(pool, dtype=np.uint8).ctypes.data
    np.frombuffer(pool, dtype=np.uint8)[:] = np.random.default_rng(0).integers(0, 256, args.size, dtype=np.uint8)
    for block_bytes in block_sizes:  # the checksum alone, over the same pool: it runs beside the I/O
        n = args.size // block_bytes
        addrs = pool_addr + np.arange(n, dtype=np.uint64) * np.uint64(block_bytes)
        t0 = time.perf_counter()
        checksum_blocks(addrs, block_bytes, np.zeros(n, dtype=np.uint64))
        print(f"XXH3 block checksums, one thread, {block_bytes >> 10}K blocks: "
              f"{args.size / (time.perf_counter() - t0) / 1e9:.2f} GB/s")
    try:
        for block_bytes in block_sizes:
            for depth in depths:
                bench_point(args, block_bytes, depth, pool_addr)
            SSDStore.remove_files([args.dir])
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def bench_rebuild(args: argparse.Namespace) -> int:
    """Journal append, journal scan + index rebuild, and a per-slot header scan, for ``args.rebuild`` blocks."""
    from flexkv.common.config import CacheConfig, ModelConfig
    from flexkv.native.uring import UringEngine
    from flexkv.scheduler.control import ControlPlane
    from flexkv.ssd_journal import Journal, journal_path, scan

    n, prompt = args.rebuild, 64
    temp_dir = tempfile.mkdtemp(prefix="flexkv_rebuild_bench_", dir=args.dir or "/tmp")
    try:
        hashes = np.random.default_rng(1).integers(1, 2**63, n, dtype=np.uint64)
        depths = np.arange(n, dtype=np.int64) % prompt
        parents = np.where(depths > 0, np.roll(hashes, 1), 0).astype(np.uint64)
        ids = np.random.default_rng(2).permutation(n).astype(np.int64)
        for sync in (True, False):
            journal = Journal(temp_dir, "bench", {"bench": 1}, n, sync=sync)
            batch = 256  # blocks per write batch (one op of a 4K-token prompt at 16 tokens per block)
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                sl = slice(i, i + batch)
                journal.append(ids[sl], hashes[sl], parents[sl], depths[sl], hashes[sl])
            dt = time.perf_counter() - t0
            journal.close()
            print(f"journal append, {batch}-block batches, fdatasync {'on ' if sync else 'off'}: "
                  f"{n / dt:,.0f} blocks/s ({dt / (n / batch) * 1e3:.3f} ms per batch)")
        t0 = time.perf_counter()
        found = scan(journal_path(temp_dir), "bench", None, n)
        t1 = time.perf_counter()
        model = ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float16")
        cache = CacheConfig(tokens_per_block=16, num_cpu_blocks=16, enable_ssd=True, num_ssd_blocks=n,
                            ssd_cache_dir=(temp_dir,))
        restored = ControlPlane(model, cache).restore_ssd_index(found.records)
        t2 = time.perf_counter()
        print(f"journal scan: {n / (t1 - t0):,.0f} records/s; index rebuild: {restored:,} blocks in {t2 - t1:.2f} s "
              f"({restored / (t2 - t1):,.0f} blocks/s); total {restored / (t2 - t0):,.0f} blocks/s")
        path = os.path.join(temp_dir, "slots.data")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (n * 4096 // (1 << 20) + 1))
            os.fsync(f.fileno())
        drop_caches()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        page = mmap.mmap(-1, 4096 * 512)
        addr = np.frombuffer(page, dtype=np.uint8).ctypes.data
        with UringEngine(512) as ring:
            t0 = time.perf_counter()
            for i in range(0, n, 512):
                m = min(512, n - i)
                offs = (np.arange(i, i + m, dtype=np.uint64)) * np.uint64(4096)
                ring.read(np.full(m, fd), offs, addr + np.arange(m, dtype=np.uint64) * np.uint64(4096), 4096)
            dt = time.perf_counter() - t0
        os.close(fd)
        print(f"per-slot header scan (one 4 KiB O_DIRECT read per slot, depth 512): {n / dt:,.0f} blocks/s")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
