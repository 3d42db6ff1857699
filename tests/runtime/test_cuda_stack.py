"""The GPU path through the whole stack: a server, its device workers, and engine processes holding
CUDA tensors shared by CUDA IPC. Skipped with the reason where there is no CUDA device (the TP=2
test also needs two GPUs). Run on the GPU machine by ``benchmarks/gpu_e2e_check.sh``.

* TP=2 with one engine process per GPU: each rank's head shard lands at its own place in the pool's
  block-first blocks, and a get restores both ranks byte for byte.
* The ordering contract across processes: the engine enqueues a slow KV write, records its "KV
  written" event and returns at once; the put launched right after copies the new bytes, not the old.
* A put and a get at once on one GPU (the worker's two lanes) both complete byte-exact.
* Tasks launched together are one op per direction for the GPU worker, byte-exact.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
import pytest

from flexkv.common.config import ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind
from flexkv.native import cudacopy
from flexkv.shm import SharedPool, list_flexkv_segments
from flexkv.types import TaskStatus
from tests.runtime.kvtest import T, rank_layout, slots_for, small_cache, small_model, tokens


def _gpus() -> tuple[int, str]:
    ok, why = cudacopy.cuda_available()
    if not ok:
        return 0, f"no CUDA here: {why}"
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    return (torch.cuda.device_count(), "") if torch.cuda.is_available() else (0, "torch has no CUDA")


NUM_GPUS, NO_GPU_WHY = _gpus()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(NUM_GPUS == 0, reason=NO_GPU_WHY)]
CTX = mp.get_context("spawn")
LATE_WRITE = 0x5A


def _chunks(tensors: list[Any], layout: KVCacheLayout, block_id: int) -> list[Any]:
    """The uint8 views of block ``block_id``'s chunks, in (layer, kv) order = the shard's pool order."""
    import torch

    out = []
    for layer in range(layout.num_layers):
        for kv in range(layout.kv_dim):
            t, off = layout.chunk_offset(layer, kv, block_id)
            out.append(tensors[t].view(torch.uint8).reshape(-1)[off: off + layout.chunk_bytes])
    return out


def cuda_rank_process(address: str, model: ModelConfig, kind: str, num_blocks: int, rank: int, device: int,
                      use_event: bool, conn: Any) -> None:
    """One TP rank holding random KV in CUDA tensors on ``device``. Requests: ("block", id) -> bytes,
    ("poison", ids), ("late_write", ids): a slow write of LATE_WRITE marked by the "KV written" event
    (no synchronize), "stop"."""
    import torch

    from flexkv.client import KVTPClient

    torch.cuda.set_device(device)
    layout = rank_layout(model, LayoutKind(kind), num_blocks)
    gen = torch.Generator(device=f"cuda:{device}").manual_seed(100 if model.use_mla else 100 + rank)
    tensors = [torch.randint(0, 256, (layout.tensor_bytes(i),), dtype=torch.uint8, device=f"cuda:{device}",
                             generator=gen).view(torch.float16).view(layout.tensor_shape(i))
               for i in range(layout.num_tensors)]
    torch.cuda.synchronize()
    client = KVTPClient(address, tp_rank=rank, device_id=device)
    client.register(tensors, layout, use_event=use_event)
    conn.send("registered")
    while (req := conn.recv()) != "stop":
        if req[0] == "block":
            torch.cuda.synchronize()
            conn.send(b"".join(bytes(c.cpu().numpy()) for c in _chunks(tensors, layout, req[1])))
        elif req[0] == "poison":
            for b in req[1]:
                for c in _chunks(tensors, layout, b):
                    c.fill_(0xAB)
            torch.cuda.synchronize()
            conn.send("ok")
        elif req[0] == "late_write":
            torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time before the new KV lands
            for b in req[1]:
                for c in _chunks(tensors, layout, b):
                    c.fill_(LATE_WRITE)
            client.mark_kv_written()
            conn.send("ok")  # at once: the GPU is still sleeping
    client.close()


class Ranks:
    """Engine processes, one per TP rank, rank r on GPU r % NUM_GPUS."""

    def __init__(self, kvm: KVManager, model: ModelConfig, kind: LayoutKind, num_blocks: int,
                 use_event: bool = False) -> None:
        self.procs: list[tuple[Any, Any]] = []
        for rank in range(model.tp_size):
            parent, child = CTX.Pipe()
            p = CTX.Process(target=cuda_rank_process, args=(kvm.server_address, model, kind.value, num_blocks, rank,
                                                            rank % NUM_GPUS, use_event, child))
            p.start()
            self.procs.append((p, parent))
        for _, conn in self.procs:
            assert conn.poll(120), "a TP rank did not register in time"
            assert conn.recv() == "registered"
        kvm.wait_ready(60)

    def ask(self, rank: int, req: Any) -> Any:
        conn = self.procs[rank][1]
        conn.send(req)
        assert conn.poll(60), f"rank {rank} did not answer {req[0]!r}"
        return conn.recv()

    def stop(self) -> None:
        for p, conn in self.procs:
            conn.send("stop")
            p.join(60)
            assert p.exitcode == 0


def _pool_blocks(name: str, block_bytes: int, num_blocks: int) -> list[bytes]:
    pool = SharedPool.attach(name)
    try:
        return [pool.buffer[b * block_bytes: (b + 1) * block_bytes].tobytes() for b in range(num_blocks)]
    finally:
        pool.close()


@pytest.mark.skipif(NUM_GPUS < 2, reason="needs two GPUs (one engine process per GPU)")
@pytest.mark.parametrize("kind", [LayoutKind.VLLM_KV_FIRST, LayoutKind.MLA])
def test_tp2_on_two_gpus_shards_land_in_place_and_a_get_restores_both_ranks(kind: LayoutKind) -> None:
    model = small_model(tp_size=2, use_mla=kind is LayoutKind.MLA)
    cache = small_cache(num_cpu_blocks=16)
    put_blocks, get_blocks = [3, 7, 1, 12, 5], [20, 21, 22, 23, 24]
    before = set(list_flexkv_segments())
    with KVManager(model, cache) as kvm:
        (pool_name,) = set(list_flexkv_segments()) - before
        ranks = Ranks(kvm, model, kind, num_blocks=32)
        try:
            toks = tokens(len(put_blocks) * T, seed=5)
            put = kvm.put_async(toks, slots_for(put_blocks, len(toks)))
            assert kvm.wait(put, timeout=60)[put].status is TaskStatus.SUCCESS
            # Placement: block b's shard s (rank s's heads; MLA: rank 0's latent) sits at the shard's
            # offset of one pool block, the same pool block for every shard.
            pool_layout = BlockFirstLayout(model, T)
            blocks = _pool_blocks(pool_name, pool_layout.block_bytes, cache.num_cpu_blocks)
            for b in put_blocks:
                holders = set()
                for shard in range(pool_layout.num_shards):
                    want = ranks.ask(shard, ("block", b))
                    start = int(pool_layout.shard_chunk_offsets(shard)[0])
                    found = {i for i, blk in enumerate(blocks) if blk[start: start + len(want)] == want}
                    assert len(found) == 1, f"engine block {b}, shard {shard}: found in pool blocks {found}"
                    holders |= found
                assert len(holders) == 1, f"engine block {b}: shards in different pool blocks {holders}"
            for rank in range(model.tp_size):
                ranks.ask(rank, ("poison", get_blocks))
            get = kvm.get_async(toks, slots_for(get_blocks, len(toks)))
            res = kvm.wait(get, timeout=60)[get]
            assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
            for rank in range(model.tp_size):
                for s, d in zip(put_blocks, get_blocks, strict=True):
                    assert ranks.ask(rank, ("block", d)) == ranks.ask(rank, ("block", s)), f"rank {rank} block {d}"
            kvm.check_invariants()
        finally:
            ranks.stop()


def test_a_put_launched_right_after_mark_kv_written_copies_the_new_kv() -> None:
    model = small_model()
    with KVManager(model, small_cache()) as kvm:
        ranks = Ranks(kvm, model, LayoutKind.VLLM_KV_FIRST, num_blocks=32, use_event=True)
        try:
            src, dst = [0, 1, 2, 3], [10, 11, 12, 13]
            old = ranks.ask(0, ("block", 0))
            assert ranks.ask(0, ("late_write", src)) == "ok"  # the GPU is still sleeping
            toks = tokens(len(src) * T, seed=6)
            put = kvm.put_async(toks, slots_for(src, len(toks)))
            assert kvm.wait(put, timeout=60)[put].status is TaskStatus.SUCCESS
            ranks.ask(0, ("poison", dst))
            get = kvm.get_async(toks, slots_for(dst, len(toks)))
            assert kvm.wait(get, timeout=60)[get].status is TaskStatus.SUCCESS
            for d in dst:
                got = ranks.ask(0, ("block", d))
                assert got == bytes([LATE_WRITE]) * len(got), "the put copied KV written before the event"
            assert old != bytes([LATE_WRITE]) * len(old)
        finally:
            ranks.stop()


def test_a_put_and_a_get_at_once_on_one_gpu_are_both_byte_exact() -> None:
    model = small_model()
    n = 24  # blocks per prompt
    with KVManager(model, small_cache(num_cpu_blocks=64)) as kvm:
        ranks = Ranks(kvm, model, LayoutKind.VLLM_KV_FIRST, num_blocks=4 * n)
        try:
            a, b = tokens(n * T, seed=7), tokens(n * T, seed=8)
            put_a = kvm.put_async(a, slots_for(list(range(n)), len(a)))
            assert kvm.wait(put_a, timeout=60)[put_a].status is TaskStatus.SUCCESS
            ranks.ask(0, ("poison", list(range(2 * n, 3 * n))))
            rng = np.random.default_rng(0)
            b_blocks = [int(x) for x in rng.permutation(np.arange(n, 2 * n))]
            get_a = kvm.get_async(a, slots_for(list(range(2 * n, 3 * n)), len(a)))
            put_b = kvm.put_async(b, slots_for(b_blocks, len(b)))
            res = kvm.wait([get_a, put_b], timeout=60)
            assert res[get_a].status is TaskStatus.SUCCESS and res[put_b].status is TaskStatus.SUCCESS
            for i in range(n):
                assert ranks.ask(0, ("block", 2 * n + i)) == ranks.ask(0, ("block", i))
            ranks.ask(0, ("poison", list(range(3 * n, 4 * n))))
            get_b = kvm.get_async(b, slots_for(list(range(3 * n, 4 * n)), len(b)))
            assert kvm.wait(get_b, timeout=60)[get_b].status is TaskStatus.SUCCESS
            for i, src in enumerate(b_blocks):
                assert ranks.ask(0, ("block", 3 * n + i)) == ranks.ask(0, ("block", src))
            kvm.check_invariants()
        finally:
            ranks.stop()


def test_puts_and_gets_launched_together_are_one_op_on_the_gpu_and_byte_exact() -> None:
    """Batched launch (docs/ARCHITECTURE.md): 8 puts in one put_async_many and 8 gets in one launch are
    one D2H and one H2D for the GPU worker, and the gets restore every block byte for byte."""
    model = small_model()
    num, n = 8, 4  # prompts, blocks per prompt
    with KVManager(model, small_cache(num_cpu_blocks=128)) as kvm:
        ranks = Ranks(kvm, model, LayoutKind.VLLM_KV_FIRST, num_blocks=2 * num * n)
        try:
            prompts = [tokens(n * T, seed=60 + i) for i in range(num)]
            src = [list(range(n * i, n * i + n)) for i in range(num)]
            dst = [list(range(num * n + n * i, num * n + n * i + n)) for i in range(num)]
            ops = int(kvm.stats().get("ops:device-0-0", 0))
            puts = kvm.put_async_many(prompts, [slots_for(s, n * T) for s in src])
            assert all(r.status is TaskStatus.SUCCESS for r in kvm.wait(puts, timeout=60).values())
            assert int(kvm.stats()["ops:device-0-0"]) - ops == 1, "one D2H for the 8 puts"
            ranks.ask(0, ("poison", [d for blocks in dst for d in blocks]))
            ids = [kvm.get_match(p)[0] for p in prompts]
            kvm.launch(ids, [slots_for(d, n * T) for d in dst])
            res = kvm.wait(ids, timeout=60)
            assert all(r.status is TaskStatus.SUCCESS and r.return_mask is not None and r.return_mask.all()
                       for r in res.values()), res
            assert int(kvm.stats()["ops:device-0-0"]) - ops == 2, "one H2D for the 8 gets"
            for s_blocks, d_blocks in zip(src, dst, strict=True):
                for s, d in zip(s_blocks, d_blocks, strict=True):
                    assert ranks.ask(0, ("block", d)) == ranks.ask(0, ("block", s))
            kvm.check_invariants()
        finally:
            ranks.stop()
