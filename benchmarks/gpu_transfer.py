"""GPU <-> CPU-pool block transfer: every CudaCopyEngine path against the contiguous pinned ceiling.

Llama-3-8B KV shape (32 layers, 8 KV heads, head 128, bf16) in vLLM per-layer tensors
``[2, num_blocks, T, H, D]``; the pool is a /dev/shm file (POSIX shared memory) registered with
cudaHostRegister. For each tokens-per-block value, ``--num-blocks`` random engine blocks go to random
pool blocks (D2H), come back (H2D), and both at once on two engines/streams (put + get). The ceiling
is one large copy of the same bytes between device memory and the same registered pool, measured in
this run. SM use = sum over kernel launches of CTAs x kernel time (profile mode).

``--stack`` measures the same transfers through the whole stack instead: a flexkv server (library
mode) and its GPU worker process, this process registering the per-layer tensors through CUDA IPC
(``KVTPClient``); ``--prompts`` prompts of ``num_blocks / prompts`` random engine blocks each are put,
got back into other random blocks, and put + got at once (new prompts put while the first ones are
got). "1 burst" rows time one such burst from the first ``put_async``/``get_async`` to ``wait``
returning, so they include hashing, planning, ZeroMQ, the worker and the reply; "N in flight" rows
launch ``--in-flight`` bursts before waiting, as a loaded engine does, so those latencies overlap
with the copies. A last line gives the round-trip latency of a small op (one prompt of 4 blocks).
The restored blocks are compared on the GPU at the end.
``--stack --cpu`` runs the same on host buffers (no CUDA; no ceiling) to try the script anywhere.

    python benchmarks/gpu_transfer.py            # T=16 and 64, 1024 blocks (~1 min)
    python benchmarks/gpu_transfer.py --quick    # T=16, 256 blocks (device check)
    python benchmarks/gpu_transfer.py --stack    # through the server and the worker process
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.layout import BlockFirstLayout, ChunkTable, KVCacheLayout, LayoutKind
from flexkv.native import cudacopy
from flexkv.native.cudacopy import CopyPath, CudaCopyEngine
from flexkv.types import OpType

MODEL = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
PATHS = (CopyPath.BATCH, CopyPath.STAGED, CopyPath.KERNEL)


class ShmPool:
    """A /dev/shm file mapped shared, like the CPU tier's POSIX shared-memory segment."""

    def __init__(self, nbytes: int) -> None:
        self.path = f"/dev/shm/flexkv_bench_{os.getpid()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.arr = np.frombuffer(self.mm, dtype=np.uint8)
        self.addr = int(self.arr.ctypes.data)
        self.nbytes = nbytes

    def close(self) -> None:
        del self.arr
        self.mm.close()
        os.unlink(self.path)


def best_of(repeats: int, fn: Callable[[], None]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def contiguous_table(dev_ptr: int, nbytes: int, piece: int) -> tuple[ChunkTable, np.ndarray, np.ndarray]:
    """A table whose consecutive blocks coalesce into ONE copy of nbytes (the ceiling)."""
    n = nbytes // piece
    table = ChunkTable(np.array([dev_ptr], dtype=np.uint64), piece, piece, n)
    return table, np.zeros(1, dtype=np.uint64), np.arange(n, dtype=np.int64)


class Case:
    """One tokens-per-block setting: engine tensors, pool, ids and two engines."""

    def __init__(self, args: argparse.Namespace, t: int) -> None:
        import torch
        self.t, self.n = t, args.num_blocks
        engine_blocks = 2 * self.n
        shape = (2, engine_blocks, t, MODEL.num_kv_heads, MODEL.head_size)
        self.tensors = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(MODEL.num_layers)]
        self.layout = KVCacheLayout.from_tensors(LayoutKind.VLLM_KV_FIRST, self.tensors, t)
        self.table = self.layout.chunk_table([x.data_ptr() for x in self.tensors])
        self.pool_layout = BlockFirstLayout(MODEL, t)
        self.block_bytes = self.pool_layout.block_bytes
        self.offs = self.pool_layout.shard_chunk_offsets(0)
        self.pool = ShmPool(2 * self.n * self.block_bytes)  # first half: puts, second half: gets
        rng = np.random.default_rng(0)
        perm = rng.permutation(engine_blocks).astype(np.int64)
        self.put_eng, self.get_eng = perm[: self.n], perm[self.n:]
        self.put_pool = rng.permutation(self.n).astype(np.int64)
        self.get_pool = self.put_pool + self.n
        self.nbytes = self.n * self.block_bytes
        self.dev = torch.empty(self.nbytes, dtype=torch.uint8, device="cuda")
        self.engines = [CudaCopyEngine(0, staging_bytes=args.staging_mib << 20, kernel_ctas=args.kernel_ctas)
                        for _ in range(2)]
        t0 = time.perf_counter()
        self.engines[0].register_host(self.pool.addr, self.pool.nbytes, block_bytes=self.block_bytes)
        self.register_s = time.perf_counter() - t0

    def copy(self, eng: CudaCopyEngine, op: OpType, path: CopyPath, put: bool) -> None:
        eng_ids, pool_ids = (self.put_eng, self.put_pool) if put else (self.get_eng, self.get_pool)
        eng.copy_blocks(op, self.table, self.pool.addr, self.block_bytes, self.offs, 2 * self.n, eng_ids, pool_ids,
                        path=path)

    def ceiling(self, eng: CudaCopyEngine, op: OpType, put: bool) -> None:
        table, offs, ids = contiguous_table(int(self.dev.data_ptr()), self.nbytes, self.block_bytes)
        pool_ids = ids if put else ids + self.n
        eng.copy_blocks(op, table, self.pool.addr, self.block_bytes, offs, 2 * self.n, ids, pool_ids,
                        path=CopyPath.BATCH)

    def block_dma(self, eng: CudaCopyEngine, op: OpType, put: bool) -> None:
        """Whole shard blocks between device memory and random pool blocks: one DMA per block (STAGED's floor)."""
        table, offs, ids = contiguous_table(int(self.dev.data_ptr()), self.nbytes, self.block_bytes)
        pool_ids = self.put_pool if put else self.get_pool
        eng.copy_blocks(op, table, self.pool.addr, self.block_bytes, offs, 2 * self.n, ids, pool_ids,
                        path=CopyPath.BATCH)

    def close(self) -> None:
        self.engines[0].unregister_host()
        for e in self.engines:
            e.close()
        self.pool.close()


def one_way(case: Case, run: Callable[[CudaCopyEngine], None], repeats: int) -> float:
    eng = case.engines[0]

    def go() -> None:
        run(eng)
        eng.synchronize()
    return case.nbytes / best_of(repeats, go) / 1e9


def two_way(case: Case, put: Callable[[CudaCopyEngine], None], get: Callable[[CudaCopyEngine], None],
            repeats: int) -> float:
    def go() -> None:
        errors: list[BaseException] = []

        def worker(eng: CudaCopyEngine, fn: Callable[[CudaCopyEngine], None]) -> None:
            try:
                fn(eng)
                eng.synchronize()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(case.engines[0], put)),
                   threading.Thread(target=worker, args=(case.engines[1], get))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    return 2 * case.nbytes / best_of(repeats, go) / 1e9


def sm_use(case: Case, op: OpType, path: CopyPath) -> str:
    if path is CopyPath.BATCH:
        return "0 (copy engines)"
    eng = case.engines[0]
    eng.stats()
    eng.set_profile(True)
    t0 = time.perf_counter()
    case.copy(eng, op=op, path=path, put=op is OpType.D2H)
    eng.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    s = eng.stats()
    eng.set_profile(False)
    share = s.cta_ms / (eng.info.num_sms * wall_ms) if wall_ms else 0.0
    return f"{s.num_ctas} CTAs, {s.kernel_ms:.2f} ms, {s.cta_ms:.0f} CTA-ms ({share:.0%} of all SMs)"


def run_case(args: argparse.Namespace, t: int) -> list[tuple[str, ...]]:
    case = Case(args, t)
    rows: list[tuple[str, ...]] = []
    try:
        eng = case.engines[0]
        print(f"T={t}: {case.n} blocks x {case.block_bytes >> 10} KiB = {case.nbytes / 2**30:.2f} GiB each way; "
              f"chunk {case.layout.chunk_bytes >> 10} KiB; pool registered in {case.register_s:.2f} s", flush=True)
        d2h, h2d = OpType.D2H, OpType.H2D
        ceil = {op: one_way(case, partial(case.ceiling, op=op, put=op is d2h), args.repeats) for op in (d2h, h2d)}
        ceil_both = two_way(case, partial(case.ceiling, op=d2h, put=True), partial(case.ceiling, op=h2d, put=False),
                            args.repeats)

        def row(path: str, op: str, gbs: float, ceiling: float, note: str) -> None:
            rows.append((str(t), path, op, f"{gbs:.1f}", f"{ceiling:.1f}", f"{gbs / ceiling:.1%}", note))

        for op in (d2h, h2d):
            row("block-DMA", op.name, one_way(case, partial(case.block_dma, op=op, put=op is d2h), args.repeats),
                ceil[op], "reference: device buffer <-> random pool blocks")
        row("block-DMA", "both", two_way(case, partial(case.block_dma, op=d2h, put=True),
                                         partial(case.block_dma, op=h2d, put=False), args.repeats), ceil_both, "")
        for path in args.paths:
            why = eng.unavailable(path, cudacopy.prepare_copy(
                d2h, case.table, case.pool.addr, case.block_bytes, case.offs, 2 * case.n, case.put_eng, case.put_pool))
            if why:
                rows.append((str(t), path.name, "-", "unavailable", "", "", why))
                continue
            for op in (d2h, h2d):
                gbs = one_way(case, partial(case.copy, op=op, path=path, put=op is d2h), args.repeats)
                row(path.name, op.name, gbs, ceil[op], sm_use(case, op, path))
            gbs = two_way(case, partial(case.copy, op=d2h, path=path, put=True),
                          partial(case.copy, op=h2d, path=path, put=False), args.repeats)
            row(path.name, "both", gbs, ceil_both, "")
            print(f"  {path.name} done", flush=True)
    finally:
        case.close()
    return rows


class Stack:
    """A library-mode server with this process's per-layer KV tensors registered as TP rank 0.

    Engine blocks: ``src`` (the prompts that gets restore), ``other`` (read by puts of new prompts) and
    one ``dst`` range per get in flight. Token ids and slot mappings are made before the clock starts:
    an engine has its slot mapping already, and synthesizing tokens is not flexkv's work.
    """

    def __init__(self, args: argparse.Namespace, t: int) -> None:
        from flexkv.client import KVTPClient, allocate_host_kv_buffers
        from flexkv.kvmanager import KVManager

        self.t, self.n, self.k = t, args.num_blocks, args.in_flight
        self.per_prompt = self.n // args.prompts
        self.block_bytes = BlockFirstLayout(MODEL, t).block_bytes
        self.nbytes = args.prompts * self.per_prompt * self.block_bytes
        engine_blocks = (2 + self.k) * self.n
        self.layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, MODEL.num_layers, engine_blocks, t,
                                    MODEL.num_kv_heads, MODEL.head_size, MODEL.itemsize)
        self.host = None
        if args.cpu:
            self.host = allocate_host_kv_buffers(self.layout, MODEL.dtype, tag="bench")
            self.tensors = self.host.torch_tensors()
        else:
            import torch
            self.tensors = [torch.randn(self.layout.tensor_shape(i), dtype=torch.bfloat16, device="cuda")
                            for i in range(self.layout.num_tensors)]
            torch.cuda.synchronize()
        # The pool holds the prompts being got plus the puts in flight; older puts are evicted (LRU).
        self.kvm = KVManager(MODEL, CacheConfig(tokens_per_block=t, num_cpu_blocks=(self.k + 1) * self.n + 64,
                                                busy_poll_us=args.busy_poll_us))
        self.kvm.start()
        self.client: KVTPClient | None = None
        kv = self.host if self.host is not None else self.tensors
        if args.landing:  # the manager reads the rank's progress table: GET waits end from shared memory
            self.kvm.register_kv_buffers(kv, self.layout, layerwise=True)
        else:
            self.client = KVTPClient(self.kvm.server_address, device_id=0)
            self.client.register(kv, self.layout)
        self.kvm.wait_ready(120)
        self._rng = np.random.default_rng(1)
        perm = self._rng.permutation(engine_blocks).astype(np.int64)
        self.src, self.other = perm[: self.n], perm[self.n: 2 * self.n]
        self.dsts = [perm[(2 + j) * self.n: (3 + j) * self.n] for j in range(self.k)]
        self.src_slots, self.other_slots = self._slots(self.src), self._slots(self.other)
        self.dst_slots = [self._slots(d) for d in self.dsts]
        self.prompts = self.new_prompts()

    def new_prompts(self) -> list[np.ndarray]:
        n = self.per_prompt * self.t
        return [self._rng.integers(0, 1 << 30, n, dtype=np.int64) for _ in range(self.n // self.per_prompt)]

    def _slots(self, blocks: np.ndarray) -> list[np.ndarray]:
        k = np.arange(self.per_prompt * self.t)
        return [blocks[i * self.per_prompt: (i + 1) * self.per_prompt][k // self.t] * self.t + k % self.t
                for i in range(self.n // self.per_prompt)]

    def launch(self, put: bool, prompts: list[np.ndarray], slots: list[np.ndarray]) -> list[int]:
        fn = self.kvm.put_async if put else self.kvm.get_async
        return [fn(p, s) for p, s in zip(prompts, slots, strict=True)]

    def finish(self, ids: list[int], gets: frozenset[int] = frozenset()) -> None:
        """Wait for ``ids``; every task must succeed and every get in ``gets`` load all its tokens (a
        put's mask leaves out what was cached already)."""
        for tid, r in self.kvm.wait(ids, timeout=120).items():
            partial = tid in gets and (r.return_mask is None or not r.return_mask.all())
            if r.status.name != "SUCCESS" or partial:
                raise RuntimeError(f"task {tid}: {r.status.name}{' with a partial mask' if partial else ''} {r.error}")

    def store_prompts(self) -> None:
        """Put the prompts the gets restore (untimed; puts measured before may have evicted them)."""
        self.finish(self.launch(True, self.prompts, self.src_slots))

    def timed(self, repeats: int, puts: int, gets: int) -> float:
        """Best seconds of ``repeats`` runs (after a warm-up) of ``gets`` gets of the prompts (into
        separate blocks) and ``puts`` puts of new prompts, all launched before waiting for any."""
        best = float("inf")
        for _ in range(repeats + 1):
            fresh = [self.new_prompts() for _ in range(puts)]
            t0 = time.perf_counter()
            ids, got = [], []
            for j in range(max(puts, gets)):
                if j < gets:
                    got += self.launch(False, self.prompts, self.dst_slots[j])
                if j < puts:
                    ids += self.launch(True, fresh[j], self.other_slots)
            self.finish(ids + got, frozenset(got))
            best = min(best, time.perf_counter() - t0)
        return best

    def small_op_ms(self, blocks: int, repeats: int) -> dict[str, tuple[float, float]]:
        """p50 and p99 milliseconds from ``put_async``/``get_async`` to ``wait`` returning for one
        prompt of ``blocks`` blocks: a new prompt per put, the same stored prompt per get."""
        n = blocks * self.t
        stored = self._rng.integers(0, 1 << 30, n, dtype=np.int64)
        src, dst = self.src_slots[0][:n], self.dst_slots[0][0][:n]
        out = {}
        for name in ("put", "get"):
            if name == "get":  # stored after the puts, which may evict older blocks from a small pool
                self.finish(self.launch(True, [stored], [src]))
            times = []
            for _ in range(repeats + 5):  # the first 5 warm up
                tokens = self._rng.integers(0, 1 << 30, n, dtype=np.int64) if name == "put" else stored
                t0 = time.perf_counter()
                ids = self.launch(name == "put", [tokens], [src if name == "put" else dst])
                self.finish(ids, frozenset(ids) if name == "get" else frozenset())
                times.append(time.perf_counter() - t0)
            ms = np.array(times[5:]) * 1e3
            out[name] = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
        return out

    def check(self) -> int:
        """Restored blocks (every get destination) that differ from their source blocks."""
        bad = 0
        for x in self.tensors:
            for dst in self.dsts:
                bad += int((x[:, self.src] != x[:, dst]).reshape(2, self.n, -1).any(dim=2).any(dim=0).sum())
        return bad

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.kvm.shutdown()
        if self.host is not None:
            self.tensors = []
            self.host.close()


def run_stack(args: argparse.Namespace, t: int) -> list[tuple[str, ...]]:
    d2h, h2d = OpType.D2H, OpType.H2D
    ceil: dict[OpType | None, float] = {d2h: 0.0, h2d: 0.0, None: 0.0}
    note: dict[OpType | None, str] = {d2h: "host buffers", h2d: "host buffers", None: "host buffers"}
    if not args.cpu:
        case = Case(args, t)  # the contiguous pinned ceiling, exactly as in the engine-level table
        try:
            for op in (d2h, h2d):
                ceil[op] = one_way(case, partial(case.ceiling, op=op, put=op is d2h), args.repeats)
            ceil[None] = two_way(case, partial(case.ceiling, op=d2h, put=True),
                                 partial(case.ceiling, op=h2d, put=False), args.repeats)
            # The path the worker's AUTO takes for these tensors, and what it costs in SMs.
            path = case.engines[0].choose_path(cudacopy.prepare_copy(
                d2h, case.table, case.pool.addr, case.block_bytes, case.offs, 2 * case.n, case.put_eng, case.put_pool))
            for op in (d2h, h2d):
                note[op] = f"worker: {path.name}, {sm_use(case, op, path)}"
            note[None] = f"worker: {path.name}"
        finally:
            case.close()
    stack = Stack(args, t)
    rows: list[tuple[str, ...]] = []
    try:
        print(f"T={t}: {len(stack.prompts)} prompts x {stack.per_prompt} random blocks x "
              f"{stack.block_bytes >> 10} KiB = {stack.nbytes / 2**30:.2f} GiB each way per burst, through the "
              f"server; bursts in flight for the sustained rows: {stack.k}", flush=True)
        for k in (1, stack.k):
            label = "stack, 1 burst" if k == 1 else f"stack, {k} in flight"
            for name, puts, gets, direction in (("D2H (put)", k, 0, d2h), ("H2D (get)", 0, k, h2d),
                                                ("both", k, k, None)):
                if gets:  # the puts measured before evicted older blocks
                    stack.store_prompts()
                gbs = (puts + gets) * stack.nbytes / stack.timed(args.repeats, puts, gets) / 1e9
                top = ceil[direction]
                rows.append((str(t), label, name, f"{gbs:.1f}", f"{top:.1f}" if top else "-",
                             f"{gbs / top:.1%}" if top else "-", note[direction]))
        lat = stack.small_op_ms(4, 200)
        print(f"  one prompt of 4 blocks ({4 * t} tokens), launch to wait, p50/p99 ms: " +
              ", ".join(f"{k} {p50:.2f}/{p99:.2f}" for k, (p50, p99) in lat.items()), flush=True)
        bad = stack.check()
        print(f"  restored blocks that differ from their source: {bad} of {stack.n * stack.k}", flush=True)
        if bad:
            raise SystemExit(f"FAIL: {bad} blocks differ")
    finally:
        stack.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-block", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--staging-mib", type=int, default=128)
    ap.add_argument("--kernel-ctas", type=int, default=64)
    ap.add_argument("--paths", type=lambda n: CopyPath[n.upper()], nargs="+", default=list(PATHS))
    ap.add_argument("--quick", action="store_true", help="T=16, 256 blocks, 3 repeats")
    ap.add_argument("--stack", action="store_true", help="through the server and its GPU worker process")
    ap.add_argument("--prompts", type=int, default=8, help="--stack: prompts the blocks are split into")
    ap.add_argument("--in-flight", type=int, default=4, help="--stack: bursts launched before waiting (sustained rows)")
    ap.add_argument("--busy-poll-us", type=int, default=0,
                    help="--stack: the server's and client's busy_poll_us (docs/config.md)")
    ap.add_argument("--cpu", action="store_true", help="--stack on host buffers (no CUDA, no ceiling)")
    ap.add_argument("--landing", action="store_true",
                    help="--stack: register with layerwise=True through the manager, so GET waits end from the "
                         "rank's progress table (docs/layerwise.md); H2D ops of 16+ blocks copy layer-major")
    args = ap.parse_args()
    if args.quick:
        args.tokens_per_block, args.num_blocks, args.repeats = [16], 256, 3
    ok, why = cudacopy.cuda_available()
    if args.cpu and args.stack:
        print(f"host buffers (--cpu); {why}")
    elif not ok:
        print(f"SKIP: {why}")
        return
    else:
        import torch
        if args.stack:  # the worker's engines, not --staging-mib
            from flexkv.workers.gpu_backend import STAGING_BYTES

            args.staging_mib = STAGING_BYTES >> 20
        print(f"device: {torch.cuda.get_device_name(0)}; {why}; torch {torch.__version__}; "
              f"staging {args.staging_mib} MiB{' (the worker: FLEXKV_STAGING_MIB)' if args.stack else ''}, "
              f"kernel CTAs {args.kernel_ctas}")
    rows: list[tuple[str, ...]] = []
    for t in args.tokens_per_block:
        rows += run_stack(args, t) if args.stack else run_case(args, t)
    head = ("T", "path", "dir", "GB/s", "ceiling", "ratio", "SM use")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
