"""Put and get throughput through the whole stack (host-device worker) beside memcpy in the same run.

KVManager in library mode (server + device worker per TP rank as child processes), engine KV buffers
in host shared memory from ``allocate_host_kv_buffers`` registered with ``register_kv_buffers``
(one per TP rank, all from this process). Llama-3-8B shape (32 layers, 8 KV heads, head 128, bf16)
at 16 tokens per block = 2 MiB per block, per-layer vLLM tensors ``[2, num_blocks, T, H, D]``.

Each round stores ``engine_blocks / prompt_blocks`` new prompts whose blocks sit at random engine
block ids (put_async all, then wait all), then restores every prompt into another prompt's slots
(get_async all, then wait all). GB/s = bytes of the full-model blocks moved / wall time from the
first call to the return of the wait (control plane included). Ceilings, measured in each round:

* memcpy: one ``np.copyto`` of the whole engine buffer (1 GiB by default; the copy is also the
  snapshot that restored bytes are checked against);
* memcpy x2: the same copy split over two threads (the host-device worker copies with two threads);
* gather: ``np.take`` of the same number of 2 MiB blocks in random order between two numpy arrays;
* engine: the copy engine the worker runs (``hostcopy.copy_blocks``, 2 threads) called in this process
  on the same engine buffers and block ids (TO_POOL for put, FROM_POOL for get, ranks one after the
  other) with a private pool: stack / engine is what the processes and sockets cost.

The warm-up rounds (rows w*, not in the median) are where the worker processes first touch the
shared-memory pool and engine buffers they mapped: their puts pay those page faults (the last column
counts the workers' minor faults per phase, from /proc).

Restored bytes of a sample of blocks (``--verify-all``: every block) are compared with the snapshot,
so a broken path cannot look fast. Goal: >= 80% of memcpy.

    python benchmarks/throughput.py                     # TP=1 and TP=2, 2 warm-up + 5 rounds each, ~30 s
    python benchmarks/throughput.py --tp 1 --rounds 5 --verify-all
    python benchmarks/throughput.py --engine-blocks 1024 --cpu-blocks 1100 --prompt-blocks 128
    python benchmarks/throughput.py --tp 1 --metrics --prompt-blocks 1   # metrics off, then on; small ops

``--metrics`` runs every TP size on two fresh servers at once, one with metrics off, one with Prometheus
metrics on (``metrics_port``) and scraped every second, their rounds alternating; both medians are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scrape_load import Scraper, free_port

from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind, tensor_addresses
from flexkv.native.hostcopy import CopyDirection, copy_blocks
from flexkv.types import TaskStatus

T = 16


@dataclasses.dataclass
class RoundResult:
    put_s: float
    get_s: float
    memcpy_s: float
    memcpy2_s: float
    gather_s: float
    engine_put_s: float
    engine_get_s: float
    put_faults: int
    get_faults: int


class Rank:
    """One TP rank's engine buffers and a snapshot of them (the memcpy ceiling's destination)."""

    def __init__(self, model: ModelConfig, num_blocks: int, rank: int) -> None:
        layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, model.num_layers, num_blocks, T,
                               model.num_kv_heads // model.tp_size, model.head_size, model.itemsize)
        self.bufs: HostKVBuffers = allocate_host_kv_buffers(layout, model.dtype, tag=f"bench{rank}")
        self.table = layout.chunk_table(tensor_addresses(self.bufs.arrays))
        self.shard_offsets = BlockFirstLayout(model, T).shard_chunk_offsets(rank)
        self.flat = np.frombuffer(self.bufs.segment.buffer, dtype=np.uint8, count=self.bufs.segment.nbytes)
        fill_unique(self.flat.view(np.uint64), rank)
        self.snapshot = np.ones_like(self.flat)  # ones, not empty: fault its pages in now
        self.snap_arrays = [self.snapshot[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
                            for off, a in zip(self.bufs.offsets, self.bufs.arrays, strict=True)]

    def take_snapshot(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.snapshot, self.flat)
        return time.perf_counter() - t0

    def take_snapshot_2threads(self, pool: ThreadPoolExecutor) -> float:
        half = self.flat.size // 2
        t0 = time.perf_counter()
        parts = [pool.submit(np.copyto, self.snapshot[s], self.flat[s]) for s in (slice(0, half), slice(half, None))]
        for f in parts:
            f.result()
        return time.perf_counter() - t0

    def engine_copy(self, direction: CopyDirection, pool: np.ndarray, engine_ids: np.ndarray,
                    pool_ids: np.ndarray) -> float:
        """The worker's copy engine called here: this rank's shard of blocks engine <-> ``pool``."""
        t0 = time.perf_counter()
        copy_blocks(direction, self.table, int(pool.ctypes.data), pool.shape[1], self.shard_offsets, pool.shape[0],
                    engine_ids, pool_ids, num_threads=2)
        return time.perf_counter() - t0

    def num_mismatched(self, dst_ids: np.ndarray, src_ids: np.ndarray) -> int:
        """Blocks whose restored bytes (engine block dst) differ from the snapshot of engine block src."""
        bad = np.zeros(dst_ids.size, dtype=bool)
        for now, before in zip(self.bufs.arrays, self.snap_arrays, strict=True):  # one tensor per layer
            got, want = now[:, dst_ids], before[:, src_ids]
            bad |= (got != want).reshape(2, dst_ids.size, -1).any(axis=(0, 2))
        return int(bad.sum())

    def close(self) -> None:
        self.snap_arrays = []
        self.flat = self.snapshot = np.empty(0, dtype=np.uint8)
        self.bufs.close()


def fill_unique(words: np.ndarray, rank: int) -> None:
    """Give every 8-byte word of every rank a distinct value, so any misplaced byte range is caught."""
    step, base = 1 << 23, rank << 48
    for lo in range(0, words.size, step):
        hi = min(lo + step, words.size)
        words[lo:hi] = np.arange(base + lo, base + hi, dtype=np.uint64)


def slots_for(block_ids: np.ndarray) -> np.ndarray:
    i = np.arange(block_ids.size * T)
    return block_ids[i // T] * T + i % T


def worker_faults(worker_pids: list[int]) -> int:
    """Minor page faults of the worker processes so far (-1 where /proc is unavailable)."""
    try:
        total = 0
        for pid in worker_pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[7])  # field 10: minflt
        return total
    except (OSError, ValueError, IndexError):
        return -1


def run_phase(kvm: KVManager, start: str, prompts: list[np.ndarray], block_ids: list[np.ndarray],
              worker_pids: list[int]) -> tuple[float, int]:
    """put_async or get_async every prompt into its blocks, wait for all, all or nothing.
    Returns (seconds, minor page faults the workers took meanwhile)."""
    call = kvm.put_async if start == "put" else kvm.get_async
    faults = worker_faults(worker_pids)
    t0 = time.perf_counter()
    ids = [call(toks, slots_for(b)) for toks, b in zip(prompts, block_ids, strict=True)]
    res = kvm.wait(ids, timeout=120)
    dt = time.perf_counter() - t0
    faults = worker_faults(worker_pids) - faults if faults >= 0 else -1
    for toks, tid in zip(prompts, ids, strict=True):
        r = res[tid]
        moved = int(r.return_mask.sum()) if r.return_mask is not None else 0
        if r.status is not TaskStatus.SUCCESS or moved != toks.size:
            raise RuntimeError(f"{start} task {tid}: {r.status.name}, {moved}/{toks.size} tokens ({r.error})")
    return dt, faults


class Gather:
    """The gather ceiling: random-order 2 MiB block copies between two numpy arrays."""

    def __init__(self, num_blocks: int, block_bytes: int) -> None:
        self.src = np.ones((num_blocks, block_bytes), dtype=np.uint8)
        self.dst = np.zeros_like(self.src)

    def run(self, rng: np.random.Generator) -> float:
        order = rng.permutation(self.src.shape[0])
        t0 = time.perf_counter()
        np.take(self.src, order, axis=0, out=self.dst, mode="clip")  # "raise" would buffer the output
        return time.perf_counter() - t0


def one_round(kvm: KVManager, ranks: list[Rank], gather: Gather, threads: ThreadPoolExecutor,
              args: argparse.Namespace, rng: np.random.Generator) -> RoundResult:
    num_prompts = args.engine_blocks // args.prompt_blocks
    perm = rng.permutation(args.engine_blocks)[:num_prompts * args.prompt_blocks].astype(np.int64)
    pool_ids = rng.permutation(args.engine_blocks)[:perm.size].astype(np.int64)
    # engine ceiling: blocks out to a private pool and back into the same blocks (bytes unchanged)
    engine_put_s = sum(r.engine_copy(CopyDirection.TO_POOL, gather.dst, perm, pool_ids) for r in ranks)
    engine_get_s = sum(r.engine_copy(CopyDirection.FROM_POOL, gather.dst, perm, pool_ids) for r in ranks)
    memcpy2_s = sum(r.take_snapshot_2threads(threads) for r in ranks)
    memcpy_s = sum(r.take_snapshot() for r in ranks)
    put_ids = list(perm.reshape(num_prompts, args.prompt_blocks))
    get_ids = put_ids[1:] + put_ids[:1]  # prompt i lands in prompt i+1's blocks: no block stays in place
    prompts = [rng.integers(0, 1 << 40, args.prompt_blocks * T, dtype=np.int64) for _ in range(num_prompts)]
    worker_pids = [int(v) for k, v in kvm.stats().items() if k.startswith("pid:")]
    put_s, put_faults = run_phase(kvm, "put", prompts, put_ids, worker_pids)
    get_s, get_faults = run_phase(kvm, "get", prompts, get_ids, worker_pids)
    gather_s = gather.run(rng)
    src, dst = np.concatenate(put_ids), np.concatenate(get_ids)
    if not args.verify_all:
        pick = rng.choice(src.size, size=min(args.verify_blocks, src.size), replace=False)
        src, dst = src[pick], dst[pick]
    for rank_id, r in enumerate(ranks):
        bad = r.num_mismatched(dst, src)
        if bad:
            raise RuntimeError(f"rank {rank_id}: {bad} of {src.size} restored blocks differ from what was stored")
    return RoundResult(put_s, get_s, memcpy_s, memcpy2_s, gather_s, engine_put_s, engine_get_s, put_faults,
                       get_faults)


class Setup:
    """One library-mode server (metrics on when ``metrics_port`` is set) with its ranks' buffers registered."""

    def __init__(self, tp: int, args: argparse.Namespace, metrics_port: int = 0) -> None:
        self.model = ModelConfig(32, 8, 128, "bfloat16", tp_size=tp)
        self.kvm = KVManager(self.model, CacheConfig(tokens_per_block=T, num_cpu_blocks=args.cpu_blocks,
                                                     metrics_port=metrics_port))
        self.ranks: list[Rank] = []
        try:
            self.kvm.start()
            self.ranks = [Rank(self.model, args.engine_blocks, r) for r in range(tp)]
            for r, rank in enumerate(self.ranks):
                self.kvm.register_kv_buffers(rank.bufs, rank.bufs.layout, tp_rank=r)
            self.kvm.wait_ready(120)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.kvm.shutdown()
        for rank in self.ranks:
            rank.close()


def run_config(tp: int, args: argparse.Namespace,
               metrics_ports: tuple[int, ...] = (0,)) -> list[tuple[list[RoundResult], list[RoundResult]]]:
    """(warm-up rounds, measured rounds) for one TP size per server, fresh servers (metrics on where a port is
    given); with several servers their rounds alternate, so a noisy neighbour hits them alike."""
    setups: list[Setup] = []
    threads = ThreadPoolExecutor(2)
    try:
        setups = [Setup(tp, args, port) for port in metrics_ports]
        gather = Gather(args.engine_blocks, setups[0].model.block_bytes(T))
        rng = np.random.default_rng(tp)
        out: list[tuple[list[RoundResult], list[RoundResult]]] = [([], []) for _ in setups]
        for i in range(args.warmup_rounds + args.rounds):
            pairs = list(zip(setups, out, strict=True))
            for setup, (warmups, results) in pairs if i % 2 == 0 else pairs[::-1]:  # neither always goes first
                res = one_round(setup.kvm, setup.ranks, gather, threads, args, rng)
                (warmups if i < args.warmup_rounds else results).append(res)
        for setup in setups:
            setup.kvm.check_invariants()
        return out
    finally:
        threads.shutdown()
        for setup in setups:
            setup.close()


HEADER = (f"{'tp':>3} {'round':>5} {'put':>6} {'get':>6} {'memcpy':>6} {'memcpy2':>7} {'gather':>6} {'engD2H':>6} "
          f"{'engH2D':>6} {'put/mem':>7} {'get/mem':>7} {'put/eng':>7} {'get/eng':>7} {'faults put/get':>15}")


def print_rows(tp: int, warmups: list[RoundResult], results: list[RoundResult], moved: int) -> None:
    """One row per round (w*: warm-up) and a median of the measured rounds."""
    names = ("put_s", "get_s", "memcpy_s", "memcpy2_s", "gather_s", "engine_put_s", "engine_get_s")
    rows: list[tuple[str, list[float], str]] = [
        (f"w{i}", [getattr(r, k) for k in names], f"{r.put_faults}/{r.get_faults}") for i, r in enumerate(warmups)]
    rows += [(str(i), [getattr(r, k) for k in names], f"{r.put_faults}/{r.get_faults}")
             for i, r in enumerate(results)]
    rows.append(("med", [float(np.median([getattr(r, k) for r in results])) for k in names], ""))
    for label, secs, faults in rows:
        put, get, mem, mem2, gat, eput, eget = (moved / s / 1e9 for s in secs)
        print(f"{tp:>3} {label:>5} {put:>6.1f} {get:>6.1f} {mem:>6.1f} {mem2:>7.1f} {gat:>6.1f} {eput:>6.1f} "
              f"{eget:>6.1f} {put / mem:>7.0%} {get / mem:>7.0%} {put / eput:>7.0%} {get / eget:>7.0%} {faults:>15}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes to run")
    ap.add_argument("--engine-blocks", type=int, default=512, help="engine KV blocks (2 MiB each, all ranks)")
    ap.add_argument("--cpu-blocks", type=int, default=600, help="CPU pool blocks (2 MiB each)")
    ap.add_argument("--prompt-blocks", type=int, default=64, help="blocks per prompt")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-rounds", type=int, default=2,
                    help="unreported rounds first (2 by default: the workers first touch every pool block)")
    ap.add_argument("--verify-blocks", type=int, default=64, help="restored blocks checked per round")
    ap.add_argument("--verify-all", action="store_true", help="check every restored block")
    ap.add_argument("--metrics", action="store_true", help="run each TP size with metrics off, then on (scraped)")
    args = ap.parse_args()
    num_prompts = args.engine_blocks // args.prompt_blocks
    if num_prompts < 2 or args.engine_blocks % args.prompt_blocks or args.engine_blocks > args.cpu_blocks:
        ap.error("--engine-blocks must be a multiple (>= 2x) of --prompt-blocks and fit in --cpu-blocks")
    block_bytes = ModelConfig(32, 8, 128, "bfloat16").block_bytes(T)
    moved = num_prompts * args.prompt_blocks * block_bytes
    checked = "every restored block" if args.verify_all else f"{args.verify_blocks} random restored blocks"
    print(f"{num_prompts} prompts x {args.prompt_blocks} blocks x {block_bytes >> 20} MiB = {moved / 2**30:.2f} GiB "
          f"per phase; CPU pool {args.cpu_blocks} blocks; GB/s (1e9 B/s), ceilings measured in each round:\n"
          "memcpy = np.copyto 1 thread, memcpy2 = 2 threads, gather = np.take of 2 MiB blocks, engD2H/engH2D = "
          "copy engine in-process;\n"
          f"{checked} byte-checked per round; faults = workers' minor page faults in the phase")
    print(HEADER)
    for tp in args.tp:
        if not args.metrics:
            print_rows(tp, *run_config(tp, args)[0], moved)
            continue
        port = free_port()
        scraper = Scraper(port)
        try:
            (off, on) = run_config(tp, args, (0, port))
        finally:
            scrapes = scraper.close()
        medians = {}
        for label, (warmups, results) in (("off", off), ("on", on)):
            print(f"metrics {label}" + (f" (scraped every second, {scrapes} scrapes)" if label == "on" else ""))
            print_rows(tp, warmups, results, moved)
            medians[label] = [moved / float(np.median([getattr(r, k) for r in results])) / 1e9
                              for k in ("put_s", "get_s")]
        (off_put, off_get), (on_put, on_get) = medians["off"], medians["on"]
        print(f"tp {tp} median GB/s, metrics off -> on (rounds interleaved): put {off_put:.2f} -> {on_put:.2f} "
              f"({on_put / off_put:.1%}), get {off_get:.2f} -> {on_get:.2f} ({on_get / off_get:.1%})")

if __name__ == "__main__":
    main()
