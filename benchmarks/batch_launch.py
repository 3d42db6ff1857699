"""Batched launch (issue 17 §2): N prompts launched one by one vs as one batch, beside memcpy of their bytes.

KVManager in library mode (server + one host-device worker per TP rank as child processes), engine KV
in host shared memory (``allocate_host_kv_buffers``), Llama-3-8B shape by default (32 layers, 8 KV heads,
head 128, bf16) at 16 tokens per block = 2 MiB per block. Each round stores and restores fresh prompts
(8 x 4 blocks by default) four ways, in an order that rotates every round:

* ``async x N``: ``put_async`` / ``get_async`` once per prompt, back to back, then one ``wait`` for all;
* ``async_many``: one ``put_async_many`` / ``get_async_many`` for all prompts, then one ``wait``;
* ``launch x N``: after ``put_match`` / ``get_match`` of every prompt (not timed), one ``launch`` per prompt;
* ``launch(N)``: the same with one ``launch`` of all the task ids.

Time = from the first call to the return of the wait for all (the engine part: ``completely=False``,
which for a PUT means its D2H). ``ops`` is how many ops each device worker reported for the phase
(stats ``ops:device-*``): N one by one, 1 batched. The ceiling, measured in every round: one
``np.copyto`` of the same bytes (all prompts' blocks, all ranks) between two arrays of this process.
Every restored block is compared with the block it was stored from, so a broken path cannot look fast.

    python benchmarks/batch_launch.py                          # 8 x 4 blocks of 2 MiB, TP=1, 20 rounds
    python benchmarks/batch_launch.py --layers 2 --rounds 40   # 128 KiB blocks: the per-op cost shows
    python benchmarks/batch_launch.py --tp 2 --prompts 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import TaskStatus

T = 16
MODES = ("async x N", "async_many", "launch x N", "launch(N)")


def slots_for(block_ids: np.ndarray) -> np.ndarray:
    i = np.arange(block_ids.size * T)
    return block_ids[i // T] * T + i % T


def engine_block(bufs: HostKVBuffers, block_id: int) -> bytes:
    """Every byte of engine block ``block_id`` (one tensor per layer, [2, blocks, T, H, D])."""
    return b"".join(a[:, block_id].tobytes() for a in bufs.arrays)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = ModelConfig(args.layers, 8, 128, "bfloat16", tp_size=args.tp)
        num_blocks = args.prompts * args.blocks
        self.engine_blocks = 2 * num_blocks  # puts from the first half, gets into the second
        self.kvm = KVManager(self.model, CacheConfig(tokens_per_block=T, num_cpu_blocks=4 * num_blocks))
        self.ranks: list[HostKVBuffers] = []
        self.kvm.start()
        heads = self.model.num_kv_heads // args.tp
        layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, args.layers, self.engine_blocks, T, heads, 128, 2)
        for rank in range(args.tp):
            bufs = allocate_host_kv_buffers(layout, self.model.dtype, tag=f"batch{rank}")
            flat = np.frombuffer(bufs.segment.buffer, dtype=np.uint8, count=bufs.segment.nbytes)
            flat[:] = np.random.default_rng(rank).integers(0, 256, flat.size, dtype=np.uint8)
            self.ranks.append(bufs)
            self.kvm.register_kv_buffers(bufs, bufs.layout, tp_rank=rank)
        self.kvm.wait_ready(120)
        nbytes = num_blocks * self.model.block_bytes(T)
        self.copy_src, self.copy_dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
        self.rng = np.random.default_rng(7)

    def close(self) -> None:
        self.kvm.shutdown()
        for bufs in self.ranks:
            bufs.close()

    def memcpy_s(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.copy_dst, self.copy_src)
        return time.perf_counter() - t0

    def device_ops(self) -> int:
        """Ops the first rank's worker reported so far."""
        return int(self.kvm.stats().get("ops:device-0-0", 0))

    def phase(self, mode: str, is_put: bool, prompts: list[np.ndarray], blocks: list[np.ndarray]) -> tuple[float, int]:
        """Store (or restore) every prompt ``mode``'s way; (seconds to all done, ops of one worker)."""
        kvm, slots = self.kvm, [slots_for(b) for b in blocks]
        ops_before = self.device_ops()
        ids: list[int] = []
        if mode.startswith("launch"):
            match = kvm.put_match if is_put else kvm.get_match
            ids = [match(p)[0] for p in prompts]  # not timed
        t0 = time.perf_counter()
        res = kvm.wait(self.start(mode, is_put, prompts, slots, ids), timeout=120)
        dt = time.perf_counter() - t0
        for p, r in zip(prompts, res.values(), strict=True):
            moved = int(r.return_mask.sum()) if r.return_mask is not None else 0
            if r.status is not TaskStatus.SUCCESS or moved != p.size:
                raise RuntimeError(f"{mode} {'put' if is_put else 'get'}: {r.status.name}, {moved}/{p.size} "
                                   f"({r.error})")
        return dt, self.device_ops() - ops_before

    def start(self, mode: str, is_put: bool, prompts: list[np.ndarray], slots: list[np.ndarray],
              matched: list[int]) -> list[int]:
        """Start the phase's tasks ``mode``'s way (``matched``: the launch modes' task ids); their ids."""
        kvm = self.kvm
        if mode == "async x N":
            call = kvm.put_async if is_put else kvm.get_async
            return [call(p, s) for p, s in zip(prompts, slots, strict=True)]
        if mode == "async_many":
            return (kvm.put_async_many if is_put else kvm.get_async_many)(prompts, slots)
        if mode == "launch x N":
            for tid, s in zip(matched, slots, strict=True):
                kvm.launch(tid, s)
        else:
            kvm.launch(matched, slots)
        return matched

    def round(self, order: list[str]) -> dict[tuple[str, str], tuple[float, int]]:
        a = self.args
        num = a.prompts * a.blocks
        out = {}
        for mode in order:
            prompts = [self.rng.integers(0, 1 << 40, a.blocks * T, dtype=np.int64) for _ in range(a.prompts)]
            src = self.rng.permutation(num).astype(np.int64).reshape(a.prompts, a.blocks)
            dst = (num + self.rng.permutation(num)).astype(np.int64).reshape(a.prompts, a.blocks)
            out[mode, "put"] = self.phase(mode, True, prompts, list(src))
            out[mode, "get"] = self.phase(mode, False, prompts, list(dst))
            for bufs in self.ranks:
                for s, d in zip(src.ravel().tolist(), dst.ravel().tolist(), strict=True):
                    if engine_block(bufs, d) != engine_block(bufs, s):
                        raise RuntimeError(f"{mode}: engine block {d} differs from block {s} it was restored from")
        out["memcpy", "-"] = (self.memcpy_s(), 0)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4, help="blocks per prompt")
    ap.add_argument("--layers", type=int, default=32, help="model layers (block = layers x 64 KiB)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup-rounds", type=int, default=2)
    args = ap.parse_args()
    bench = Bench(args)
    try:
        rows: dict[tuple[str, str], list[tuple[float, int]]] = {}
        for i in range(args.warmup_rounds + args.rounds):
            order = list(MODES[i % len(MODES):] + MODES[:i % len(MODES)])  # nobody always goes first
            res = bench.round(order)
            if i >= args.warmup_rounds:
                for key, value in res.items():
                    rows.setdefault(key, []).append(value)
        bench.kvm.check_invariants()
    finally:
        bench.close()
    block_mib = bench.model.block_bytes(T) / 2**20
    nbytes = args.prompts * args.blocks * bench.model.block_bytes(T)
    print(f"{args.prompts} prompts x {args.blocks} blocks of {block_mib:g} MiB, TP={args.tp}: "
          f"{nbytes / 2**20:g} MiB per phase; median of {args.rounds} rounds")
    memcpy = float(np.median([s for s, _ in rows["memcpy", "-"]]))
    print(f"{'op':>4} {'mode':>11} {'p50 ms':>8} {'p90 ms':>8} {'ops/worker':>10} {'GB/s':>6} {'vs memcpy':>9}")
    for op in ("put", "get"):
        for mode in MODES:
            secs = [s for s, _ in rows[mode, op]]
            p50, p90 = float(np.median(secs)), float(np.percentile(secs, 90))
            ops = int(np.median([n for _, n in rows[mode, op]]))
            print(f"{op:>4} {mode:>11} {1e3 * p50:8.2f} {1e3 * p90:8.2f} {ops:10d} {nbytes / p50 / 1e9:6.2f} "
                  f"{memcpy / p50:9.1%}")
    print(f"{'':>4} {'memcpy':>11} {1e3 * memcpy:8.2f} {'':>8} {'':>10} {nbytes / memcpy / 1e9:6.2f}")
    for op in ("put", "get"):
        one = float(np.median([s for s, _ in rows["async x N", op]]))
        many = float(np.median([s for s, _ in rows["async_many", op]]))
        single = float(np.median([s for s, _ in rows["launch x N", op]]))
        batched = float(np.median([s for s, _ in rows["launch(N)", op]]))
        print(f"{op}: async_many / async x N = {many / one:.2f}, launch(N) / launch x N = {batched / single:.2f}")


if __name__ == "__main__":
    main()
