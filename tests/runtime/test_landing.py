"""GET waits that complete from the ranks' progress tables (issue 17 §3: a completion that reaches the
waiting client without the worker -> server -> client round).

A rank registered with ``layerwise=True`` publishes in shared memory when each H2D op of a task has
landed in the engine's buffers. ``KVManager.wait`` on GETs then asks the server to answer as soon as the
task's H2D is on its way (``WaitMsg.landing``), with the task's final mask, and returns SUCCESS once every
rank's table says every layer landed: the worker's report to the server and the server's reply to the
client are off the critical path. Everything else (a failed copy, a dead or stopped worker, a timeout,
``completely=True``, PUTs) ends as it did before. Every GET below lands in poisoned blocks and its bytes
are compared with the source: a wait may never say SUCCESS before the bytes are in place.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import KVResponse, TaskStatus
from flexkv.workers.layerwise_copy import LAYER_MAJOR_MIN_BLOCKS
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, tokens
from tests.runtime.test_layerwise import DEVICES, _Engine, _put, host_layout
from tests.runtime.test_layerwise import MODEL as LW_MODEL

pytestmark = pytest.mark.timeout(120)

MODEL = ModelConfig(num_layers=4, num_kv_heads=2, head_size=16, dtype="float16")
# Whether a wait ends from the tables is a race (the client's WaitMsg against the worker's report):
# tests that need some to have landed repeat their round, bytes checked every time, up to this many.
MAX_ROUNDS = 200


class _Stack:
    def __init__(self, layerwise: bool = True, num_blocks: int = 64, first_task_id: int = 1) -> None:
        self.kvm = KVManager(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=128), first_task_id=first_task_id)
        self.kvm.start()
        self.bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks, seed=21)
        self.kvm.register_kv_buffers(self.bufs, self.bufs.layout, layerwise=layerwise)
        self.kvm.wait_ready(60)

    def put(self, toks: np.ndarray, blocks: list[int]) -> None:
        _put(self.kvm, toks, blocks)

    def get(self, toks: np.ndarray, dst: list[int], completely: bool = False) -> KVResponse:
        """get_async of ``toks`` into ``dst``, poisoned first, and its wait."""
        poison(self.bufs, dst)
        tid = self.kvm.get_async(toks, slots_for(dst, len(toks)))
        return self.kvm.wait(tid, timeout=30, completely=completely)[tid]

    def worker_pid(self) -> int:
        stats = self.kvm._query("stats")
        [pid] = [int(v) for k, v in stats.items() if k.startswith("pid:device")]
        return pid

    def exact(self, src: list[int], dst: list[int]) -> bool:
        return all(block_bytes(self.bufs, s) == block_bytes(self.bufs, d) for s, d in zip(src, dst, strict=True))

    def close(self) -> None:
        self.kvm.shutdown()
        self.bufs.close()


@pytest.fixture
def stack():  # type: ignore[no-untyped-def]
    s = _Stack()
    yield s
    s.close()


def test_get_waits_complete_from_the_tables_with_exact_bytes(stack: _Stack) -> None:
    toks = tokens(4 * T, seed=1)
    src = [0, 1, 2, 3]
    stack.put(toks, src)
    before = stack.kvm.num_waits_landed
    # A wait that reaches the server after the worker's report is answered final, as before: rare on an
    # idle machine, 55% of rounds with a busy loop beside the suite. Go on until 15 waits have landed.
    for round_ in range(MAX_ROUNDS):
        dst = [10 + 4 * (round_ % 5) + i for i in range(4)]
        res = stack.get(toks, dst)
        assert res.status is TaskStatus.SUCCESS, res
        assert res.return_mask is not None and res.return_mask.all()
        assert stack.exact(src, dst), f"round {round_}: SUCCESS before the bytes were in place"
        if round_ >= 19 and stack.kvm.num_waits_landed - before >= 15:
            break
    assert stack.kvm.num_waits_landed - before >= 15, "the waits completed from the tables"
    # A partly cached prompt: the mask the landing reply carries is the task's own.
    longer = np.concatenate([toks, tokens(2 * T, seed=9)])
    res = stack.get(longer, [40, 41, 42, 43, 44, 45])
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None
    assert res.return_mask[:4 * T].all() and not res.return_mask[4 * T:].any()
    assert stack.exact(src, [40, 41, 42, 43])
    stack.kvm.check_invariants()


def test_match_then_launch_and_batches_land_too(stack: _Stack) -> None:
    prompts = [tokens(3 * T, seed=10 + i) for i in range(3)]
    srcs = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]
    for p, s in zip(prompts, srcs, strict=True):
        stack.put(p, s)
    dsts = [[20 + 3 * i, 21 + 3 * i, 22 + 3 * i] for i in range(3)]
    poison(stack.bufs, [d for ds in dsts for d in ds])
    ids = [stack.kvm.get_match(p)[0] for p in prompts]
    stack.kvm.launch(ids, [slots_for(d, 3 * T) for d in dsts])
    put_id = stack.kvm.put_async(tokens(2 * T, seed=99), slots_for([50, 51], 2 * T))  # a PUT in the same wait
    res = stack.kvm.wait([*ids, put_id], timeout=30)
    assert all(r.status is TaskStatus.SUCCESS for r in res.values()), res
    assert all(stack.exact(s, d) for s, d in zip(srcs, dsts, strict=True))
    stack.kvm.check_invariants()


def test_a_failed_copy_is_failed_not_landed(stack: _Stack) -> None:
    toks = tokens(4 * T, seed=2)
    stack.put(toks, [0, 1, 2, 3])
    tid, _ = stack.kvm.get_match(toks)
    stack.kvm.launch(tid, slots_for([4, 5, 6, 400], len(toks)))  # block 400 is past the buffers
    res = stack.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.FAILED and "out of range" in res.error, res
    stack.kvm.check_invariants()


def test_a_stopped_worker_times_out_then_lands_and_a_killed_one_fails(stack: _Stack) -> None:
    toks = tokens(4 * T, seed=3)
    src = [0, 1, 2, 3]
    stack.put(toks, src)
    pid = stack.worker_pid()
    dst = [30, 31, 32, 33]
    poison(stack.bufs, dst)
    os.kill(pid, signal.SIGSTOP)
    try:
        tid = stack.kvm.get_async(toks, slots_for(dst, len(toks)))
        assert stack.kvm.wait(tid, timeout=0.5)[tid].status is TaskStatus.TIMEOUT
        assert not stack.exact(src, dst)
    finally:
        os.kill(pid, signal.SIGCONT)
    res = stack.kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS and stack.exact(src, dst)

    dst = [34, 35, 36, 37]
    poison(stack.bufs, dst)
    os.kill(pid, signal.SIGSTOP)  # the op reaches the worker's socket but is never copied
    tid = stack.kvm.get_async(toks, slots_for(dst, len(toks)))
    out: dict[str, KVResponse] = {}
    waiter = threading.Thread(target=lambda: out.update(res=stack.kvm.wait(tid, timeout=60)[tid]))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "a wait returned while the worker was stopped"
    os.kill(pid, signal.SIGKILL)
    waiter.join(timeout=60)
    res = out["res"]
    assert res.status is TaskStatus.FAILED, res
    assert not stack.exact(src, dst)


def test_without_tables_and_with_completely_the_server_answers() -> None:
    s = _Stack(layerwise=False)
    try:
        toks = tokens(4 * T, seed=4)
        s.put(toks, [0, 1, 2, 3])
        assert s.get(toks, [8, 9, 10, 11]).status is TaskStatus.SUCCESS
        assert s.exact([0, 1, 2, 3], [8, 9, 10, 11])
        assert s.kvm.num_waits_landed == 0
    finally:
        s.close()
    s = _Stack()
    try:
        toks = tokens(4 * T, seed=5)
        s.put(toks, [0, 1, 2, 3])
        assert s.get(toks, [8, 9, 10, 11], completely=True).status is TaskStatus.SUCCESS
        assert s.exact([0, 1, 2, 3], [8, 9, 10, 11])
        assert s.kvm.num_waits_landed == 0, "completely=True waits for every op: the server answers"
    finally:
        s.close()


@pytest.mark.parametrize("device", DEVICES)
def test_landing_gets_on_every_kind_of_rank_restore_exact_bytes(device: str) -> None:
    """Host buffers (host copy), CUDA tensors (the GPU worker's event, then the word) and CUDA tensors of
    an engine-side lane; small ops (whole copies) and one of LAYER_MAJOR_MIN_BLOCKS (layer-major)."""
    kvm = KVManager(LW_MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=128))
    kvm.start()
    eng = _Engine(device, 64)
    try:
        eng.register(kvm, layerwise=True)
        for n in (2, LAYER_MAJOR_MIN_BLOCKS):
            toks = tokens(n * T, seed=60 + n)
            src, dst = list(range(n)), list(range(32, 32 + n))
            _put(kvm, toks, src)
            want = [eng.layer_bytes(s, layer) for s in src for layer in range(LW_MODEL.num_layers)]
            landed_here = kvm.num_waits_landed
            for round_ in range(MAX_ROUNDS):
                eng.poison(dst)
                before = kvm.num_waits_landed
                tid = kvm.get_async(toks, slots_for(dst, len(toks)))
                res = kvm.wait(tid, timeout=30)[tid]
                assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
                assert [eng.layer_bytes(d, layer) for d in dst for layer in range(LW_MODEL.num_layers)] == want
                landed = kvm.num_waits_landed - before
                assert landed in (0, 1)
                if round_ >= 2 and kvm.num_waits_landed > landed_here:
                    break
            assert kvm.num_waits_landed > landed_here, f"no wait of a {n}-block get ended from the tables"
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        eng.close()


def test_only_a_layer_wise_launch_copies_layer_major(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag travels launch -> server -> worker: an engine-side lane (the device worker in this process)
    copies a layer-wise GET of LAYER_MAJOR_MIN_BLOCKS layer by layer, the same GET launched plainly whole."""
    import torch

    from flexkv.client import KVTPClient
    from flexkv.workers import device_worker

    calls: list[int] = []
    real = device_worker.start_layer_major

    def counting(worker, ops, progress):  # type: ignore[no-untyped-def]
        calls.append(len(ops))
        return real(worker, ops, progress)
    monkeypatch.setattr(device_worker, "start_layer_major", counting)
    kvm = KVManager(LW_MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=128))
    kvm.start()
    n = LAYER_MAJOR_MIN_BLOCKS
    lay = host_layout(2 * n + 4)
    tensors = [torch.zeros(lay.tensor_shape(i), dtype=torch.float16) for i in range(lay.num_tensors)]
    tp = KVTPClient(kvm.server_address)
    try:
        tp.register(tensors, lay, engine_side=True, layerwise=True)
        toks = tokens(n * T, seed=70)
        for t in tensors:
            t[: n * T].view(torch.int16).copy_(torch.arange(n * T * t[0].numel(), dtype=torch.int32)
                                              .view(t[: n * T].shape).to(torch.int16))
        _put(kvm, toks, list(range(n)))
        for layerwise in (False, True):
            for t in tensors:
                t[n * T: 2 * n * T].view(torch.uint8).fill_(0xAB)
            tid, _ = kvm.get_match(toks)
            kvm.launch(tid, slots_for(list(range(n, 2 * n)), len(toks)), layerwise=layerwise)
            assert tp.wait_layer(tid, LW_MODEL.num_layers - 1, timeout=30).status is TaskStatus.SUCCESS
            assert kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS
            assert all(torch.equal(t[: n * T], t[n * T: 2 * n * T]) for t in tensors)
            assert len(calls) == int(layerwise), (layerwise, calls)
    finally:
        tp.close()
        kvm.shutdown()


@pytest.mark.parametrize("both_ranks", [True, False])
def test_two_ranks_land_only_when_both_landed(both_ranks: bool) -> None:
    """TP=2: a GET's wait ends from the tables only when every rank has one (and then only once both ranks'
    words say landed); with one rank registered plainly the server answers when final, as before."""
    from tests.runtime.kvtest import small_cache, small_model

    model = small_model(tp_size=2)
    kvm = KVManager(model, small_cache(num_cpu_blocks=64))
    kvm.start()
    ranks = [host_buffers(model, LayoutKind.VLLM_KV_FIRST, 32, seed=80 + r) for r in range(2)]
    try:
        for r, bufs in enumerate(ranks):
            kvm.register_kv_buffers(bufs, bufs.layout, tp_rank=r, layerwise=both_ranks or r == 0)
        kvm.wait_ready(60)
        toks = tokens(6 * T, seed=81)
        src, dst = list(range(6)), list(range(10, 16))
        _put(kvm, toks, src)
        for round_ in range(MAX_ROUNDS):
            for bufs in ranks:
                poison(bufs, dst)
            tid = kvm.get_async(toks, slots_for(dst, len(toks)))
            assert kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS
            for bufs in ranks:  # each rank's shard of every block, on both ranks
                assert all(block_bytes(bufs, s) == block_bytes(bufs, d) for s, d in zip(src, dst, strict=True))
            if round_ >= 4 and (not both_ranks or kvm.num_waits_landed >= 3):
                break
        if both_ranks:
            assert kvm.num_waits_landed >= 3
        else:
            assert kvm.num_waits_landed == 0, "a rank without a table: the server answers"
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        for bufs in ranks:
            bufs.close()


def test_task_ids_beyond_the_word_wait_through_the_server() -> None:
    """A manager whose ids do not fit a progress word (``first_task_id`` near the microsecond clock, as the
    SGLang link picks) still restores: the worker stores no word for such a task, its waits ask the server."""
    s = _Stack(first_task_id=1 << 50)
    try:
        toks = tokens(4 * T, seed=91)
        s.put(toks, [0, 1, 2, 3])
        assert s.get(toks, [8, 9, 10, 11]).status is TaskStatus.SUCCESS
        assert s.exact([0, 1, 2, 3], [8, 9, 10, 11])
        assert s.kvm.num_waits_landed == 0
        s.kvm.check_invariants()
    finally:
        s.close()
