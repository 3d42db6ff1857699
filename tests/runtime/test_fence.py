"""The KV fence: once the engine sealed a rank, no flexkv copy touches its memory, whatever the server
does later. Real server and device-worker processes, host KV buffers in shared memory, real signals.

The hazard it closes: an engine whose server stopped answering hands its blocks back to its own
allocator; a server that was stalled (not dead) resumes and runs the launches queued in its socket,
and its worker writes cached KV into blocks that now hold another request's KV (or stores theirs under
this prompt's hashes)."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexkv.client import HostKVBuffers, KVTPClient, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.shm import SHM_DIR, process_exited
from flexkv.types import TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    host_buffers,
    poison,
    rank_layout,
    slots_for,
    small_cache,
    small_model,
    tokens,
)
from tests.runtime.test_layerwise import NO_CUDA_WHY

pytestmark = pytest.mark.timeout(120)


class Rank:
    """A library-mode server and one rank registered through its own KVTPClient (as vLLM's workers do)."""

    def __init__(self, model: ModelConfig, cache: CacheConfig, bufs: HostKVBuffers, layerwise: bool = False) -> None:
        self.bufs = bufs
        self.kvm = KVManager(model, cache, request_timeout_s=5.0)
        self.kvm.start()
        self.client = KVTPClient(self.kvm.server_address)
        self.client.register(self.bufs, self.bufs.layout, layerwise=layerwise)
        self.kvm.wait_ready(30)

    @property
    def server_pid(self) -> int:
        assert self.kvm._proc is not None
        return self.kvm._proc.pid

    @property
    def fence_path(self) -> str:
        assert self.client._fence is not None
        return os.path.join(SHM_DIR, self.client._fence.name.lstrip("/"))

    def worker_pid(self) -> int:
        assert self.client._fence is not None
        return int(self.client._fence._words[1])

    def store(self, toks: np.ndarray, blocks: list[int]) -> None:
        tid = self.kvm.put_async(toks, slots_for(blocks, len(toks)))
        assert self.kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS

    def close(self) -> None:
        self.client.close()
        self.kvm.shutdown()
        self.bufs.close()


@pytest.fixture
def ranks() -> Iterator[list[Rank]]:
    made: list[Rank] = []
    yield made
    for r in made:
        r.close()


def _bufs(num_blocks: int) -> HostKVBuffers:
    return host_buffers(small_model(), LayoutKind.VLLM_KV_FIRST, num_blocks, seed=5)


def _resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def test_a_launch_the_stalled_server_runs_after_the_seal_writes_nothing(ranks: list[Rank]) -> None:
    r = Rank(small_model(), small_cache(), _bufs(32))
    ranks.append(r)
    toks = tokens(6 * T, seed=1)
    r.store(toks, list(range(6)))
    tid, mask = r.kvm.get_match(toks)
    assert int(mask.sum()) == 6 * T
    dst = list(range(10, 16))
    poison(r.bufs, dst)
    os.kill(r.server_pid, signal.SIGSTOP)
    try:
        r.kvm.launch(tid, slots_for(dst, len(toks)))  # sits in the stopped server's socket
        t0 = time.monotonic()
        r.client.seal(timeout_s=5.0)  # no copy runs now: at once
        assert time.monotonic() - t0 < 2.0
    finally:
        _resume(r.server_pid)
    res = r.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.FAILED and "sealed" in res.error, res
    for d in dst:
        assert set(block_bytes(r.bufs, d)) == {0xAB}, f"block {d} was written after the seal"
    r.kvm.check_invariants()


def test_a_put_after_the_seal_stores_nothing_from_the_sealed_memory(ranks: list[Rank]) -> None:
    r = Rank(small_model(), small_cache(), _bufs(32))
    ranks.append(r)
    toks = tokens(5 * T, seed=2)
    tid, mask = r.kvm.put_match(toks)
    assert int(mask.sum()) == 5 * T
    os.kill(r.server_pid, signal.SIGSTOP)
    try:
        r.kvm.launch(tid, slots_for(list(range(5)), len(toks)))
        r.client.seal(timeout_s=5.0)
    finally:
        _resume(r.server_pid)
    res = r.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.FAILED and "sealed" in res.error, res
    again, mask2 = r.kvm.get_match(toks)
    r.kvm.cancel(again)
    assert int(mask2.sum()) == 0, "blocks read after the seal were indexed"
    r.kvm.check_invariants()


def test_a_layerwise_get_refused_by_the_seal_wakes_its_layer_waiters_at_once(ranks: list[Rank]) -> None:
    r = Rank(small_model(), small_cache(), _bufs(32), layerwise=True)
    ranks.append(r)
    toks = tokens(8 * T, seed=3)
    r.store(toks, list(range(8)))
    tid, _ = r.kvm.get_match(toks)
    r.client.seal(timeout_s=5.0)
    poison(r.bufs, list(range(16, 24)))
    r.kvm.launch(tid, slots_for(list(range(16, 24)), len(toks)), layerwise=True)
    t0 = time.monotonic()
    assert r.client.wait_layer(tid, 0, timeout=20).status is TaskStatus.FAILED
    assert time.monotonic() - t0 < 10
    assert r.kvm.wait(tid, timeout=30)[tid].status is TaskStatus.FAILED
    for d in range(16, 24):
        assert set(block_bytes(r.bufs, d)) == {0xAB}


def test_a_manager_seals_the_ranks_it_registered() -> None:
    bufs = _bufs(32)
    kvm = KVManager(small_model(), small_cache())
    try:
        kvm.start()
        kvm.register_kv_buffers(bufs, bufs.layout)
        kvm.wait_ready(30)
        toks = tokens(4 * T, seed=11)
        put = kvm.put_async(toks, slots_for(list(range(4)), len(toks)))
        assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
        kvm.seal_kv_buffers()
        poison(bufs, list(range(8, 12)))
        tid = kvm.get_async(toks, slots_for(list(range(8, 12)), len(toks)))
        res = kvm.wait(tid, timeout=30)[tid]
        assert res.status is TaskStatus.FAILED and "sealed" in res.error, res
        assert all(set(block_bytes(bufs, d)) == {0xAB} for d in range(8, 12))
    finally:
        kvm.shutdown()
        bufs.close()


# Big enough that one get's host copy takes tens of milliseconds, so the seal meets it running.
BIG = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="float16")
BIG_T = 16
BIG_BLOCKS = 96  # x 2 MiB


def _big_rank() -> tuple[Rank, np.ndarray]:
    layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, BIG.num_layers, 2 * BIG_BLOCKS, BIG_T, BIG.num_kv_heads,
                           BIG.head_size, BIG.itemsize)
    bufs = allocate_host_kv_buffers(layout, BIG.dtype, tag="test")
    for a in bufs.arrays:
        a.view(np.uint16)[...] = np.random.default_rng(6).integers(0, 1 << 16, a.shape, dtype=np.uint16)
    r = Rank(BIG, CacheConfig(tokens_per_block=BIG_T, num_cpu_blocks=BIG_BLOCKS + 8), bufs)
    toks = np.random.default_rng(4).integers(0, 50_000, BIG_BLOCKS * BIG_T, dtype=np.int64)
    k = np.arange(toks.size)
    tid = r.kvm.put_async(toks, (k // BIG_T) * BIG_T + k % BIG_T)
    assert r.kvm.wait(tid, timeout=60)[tid].status is TaskStatus.SUCCESS
    return r, toks


def _launch_big_get(r: Rank, toks: np.ndarray) -> int:
    """Launch a get of every block into blocks BIG_BLOCKS.. and return once its worker holds the fence."""
    dst = np.arange(BIG_BLOCKS, 2 * BIG_BLOCKS)
    for a in r.bufs.arrays:
        a.reshape(a.shape[0], 2 * BIG_BLOCKS, -1)[:, BIG_BLOCKS:].view(np.uint8)[...] = 0xAB
    k = np.arange(toks.size)
    tid = r.kvm.get_async(toks, dst[k // BIG_T] * BIG_T + k % BIG_T)
    fd = os.open(r.fence_path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return tid  # the copy holds it
    finally:
        os.close(fd)
    raise AssertionError("the get's copy never held the fence")


def _dst_snapshot(r: Rank) -> list[np.ndarray]:
    return [a.view(np.uint16).reshape(a.shape[0], 2 * BIG_BLOCKS, -1)[:, BIG_BLOCKS:].copy() for a in r.bufs.arrays]


def test_the_seal_waits_for_the_copy_running_now_and_nothing_moves_after_it(ranks: list[Rank]) -> None:
    r, toks = _big_rank()
    ranks.append(r)
    tid = _launch_big_get(r, toks)
    r.client.seal(timeout_s=30.0)
    landed = _dst_snapshot(r)
    res = r.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS, res  # a running task ends on its own
    for a, got in zip(r.bufs.arrays, landed, strict=True):  # whole when the seal returned
        src = a.view(np.uint16).reshape(a.shape[0], 2 * BIG_BLOCKS, -1)[:, :BIG_BLOCKS]  # (bits: NaNs among them)
        assert np.array_equal(src, got), "the seal returned before the running copy had finished"
    time.sleep(0.2)
    assert all(np.array_equal(x, y) for x, y in zip(landed, _dst_snapshot(r), strict=True))


def test_a_worker_stopped_mid_copy_is_killed_by_the_seal_so_nothing_follows(ranks: list[Rank]) -> None:
    r, toks = _big_rank()
    ranks.append(r)
    worker = r.worker_pid()
    assert worker and worker != os.getpid()
    tid = _launch_big_get(r, toks)
    os.kill(worker, signal.SIGSTOP)  # holding the fence, mid-copy
    t0 = time.monotonic()
    r.client.seal(timeout_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 15
    assert process_exited(worker), "the stopped worker is still alive"
    after = _dst_snapshot(r)
    res = r.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.FAILED, res  # its worker died under it
    time.sleep(0.2)
    assert all(np.array_equal(x, y) for x, y in zip(after, _dst_snapshot(r), strict=True))
    # the server restarts the rank's worker; every copy it is sent fails on the seal
    tid2 = r.kvm.get_async(toks[: 4 * BIG_T], np.arange(4 * BIG_T) + BIG_BLOCKS * BIG_T)
    assert r.kvm.wait(tid2, timeout=60)[tid2].status is TaskStatus.FAILED
    r.kvm.check_invariants()


@pytest.mark.skipif(bool(NO_CUDA_WHY), reason=NO_CUDA_WHY or "-")
def test_a_cuda_worker_runs_no_copy_into_a_sealed_rank() -> None:
    """The same stalled-server launch, with the engine's KV in CUDA memory (opened by the worker process
    through CUDA IPC): the copy is refused; the GPU blocks keep their poison."""
    import torch

    model, cache = small_model(), small_cache()
    layout = rank_layout(model, LayoutKind.VLLM_KV_FIRST, 32)
    kv = [torch.randn(layout.tensor_shape(i), device="cuda").to(torch.float16) for i in range(layout.num_tensors)]
    torch.cuda.synchronize()
    kvm = KVManager(model, cache, request_timeout_s=5.0)
    kvm.start()
    client = KVTPClient(kvm.server_address)
    try:
        client.register(kv, layout)
        kvm.wait_ready(60)
        toks = tokens(6 * T, seed=9)
        put = kvm.put_async(toks, slots_for(list(range(6)), len(toks)))
        assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
        tid, mask = kvm.get_match(toks)
        assert int(mask.sum()) == 6 * T
        for t in kv:
            t[:, 10:16] = 7.0
        torch.cuda.synchronize()
        assert kvm._proc is not None
        os.kill(kvm._proc.pid, signal.SIGSTOP)
        try:
            kvm.launch(tid, slots_for(list(range(10, 16)), len(toks)))
            client.seal(timeout_s=5.0)
        finally:
            _resume(kvm._proc.pid)
        res = kvm.wait(tid, timeout=30)[tid]
        assert res.status is TaskStatus.FAILED and "sealed" in res.error, res
        torch.cuda.synchronize()
        assert all(bool((t[:, 10:16] == 7.0).all()) for t in kv), "GPU blocks were written after the seal"
    finally:
        client.close()
        kvm.shutdown()
