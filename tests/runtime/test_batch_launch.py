"""Batched launch through the whole stack (issue 17 §2): tasks launched together reach each device
worker as one op (one message, one copy call, one completion), each task keeps its own status and
mask, and every failure (a bad block, a worker SIGKILLed mid-batch, reset, cancel) ends every task of
the batch with the right status and leaks nothing. Real processes, signals, host buffers, bytes compared
against poisoned destinations."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexkv.client import HostKVBuffers
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import InvalidRequest, TaskStatus
from tests.runtime import test_ssd_tier
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(120)

ssd_kvm = test_ssd_tier.ssd_kvm  # the fixture: library mode, CPU (16 blocks) + SSD, host buffers registered
NUM_PROMPTS, BLOCKS = 8, 4  # 8 prompts x 4 blocks


@pytest.fixture(params=[1, 2], ids=["tp1", "tp2"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[KVManager, list[HostKVBuffers]]]:
    """Library mode, 128 CPU blocks, every TP rank's host buffers (64 blocks each) registered."""
    model = small_model(tp_size=request.param)
    kvm = KVManager(model, small_cache(num_cpu_blocks=128))
    bufs = []
    try:
        kvm.start()
        for rank in range(model.tp_size):
            bufs.append(host_buffers(model, LayoutKind.VLLM_KV_FIRST, 64, seed=40 + rank))
            kvm.register_kv_buffers(bufs[-1], bufs[-1].layout, tp_rank=rank)
        kvm.wait_ready(30)
        yield kvm, bufs
    finally:
        kvm.shutdown()
        for b in bufs:
            b.close()


def _prompts(seed: int, num: int = NUM_PROMPTS) -> list[np.ndarray]:
    return [tokens(BLOCKS * T, seed=seed + i) for i in range(num)]


def _blocks(first: int, num: int = NUM_PROMPTS) -> list[list[int]]:
    return [list(range(first + BLOCKS * i, first + BLOCKS * (i + 1))) for i in range(num)]


def _device_ops(kvm: KVManager) -> dict[str, int]:
    stats = kvm.stats()
    return {k.removeprefix("ops:"): int(v) for k, v in stats.items() if k.startswith("ops:device-")}


def _device_pids(kvm: KVManager) -> list[int]:
    return [int(v) for k, v in kvm.stats().items() if k.startswith("pid:device-")]


def _ops_since(kvm: KVManager, before: dict[str, int], workers: int) -> list[int]:
    after = _device_ops(kvm)
    assert len(after) == workers, f"expected {workers} device workers, stats name {sorted(after)}"
    return [after[w] - before.get(w, 0) for w in sorted(after)]


def _cached(kvm: KVManager, prompt: np.ndarray) -> bool:
    """Whether any block of ``prompt`` is matched (the match is cancelled at once)."""
    tid, mask = kvm.get_match(prompt)
    kvm.cancel(tid)
    return bool(mask.any())


def _put_all(kvm: KVManager, prompts: list[np.ndarray], blocks: list[list[int]]) -> None:
    ids = kvm.put_async_many(prompts, [slots_for(b, len(p)) for p, b in zip(prompts, blocks, strict=True)])
    res = kvm.wait(ids, timeout=30, completely=True)
    assert all(r.status is TaskStatus.SUCCESS for r in res.values()), res


def _same(bufs: list[HostKVBuffers], src: list[int], dst: list[int]) -> bool:
    return all(block_bytes(b, d) == block_bytes(b, s) for b in bufs for s, d in zip(src, dst, strict=True))


def _poisoned(bufs: list[HostKVBuffers], blocks: list[int]) -> bool:
    return all(set(block_bytes(b, d)) == {0xAB} for b in bufs for d in blocks)


def _idle(kvm: KVManager) -> None:
    """Nothing in flight, nothing reserved, invariants hold."""
    deadline = time.monotonic() + 10
    while (kvm.stats()["num_tasks"] or kvm.stats()["num_ops_in_flight"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = kvm.stats()
    assert stats["num_tasks"] == 0 and stats["num_ops_in_flight"] == 0 and stats["num_batched_ops_in_flight"] == 0
    kvm.check_invariants()


def test_gets_launched_together_are_one_op_per_worker_and_byte_exact(
        served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    workers = len(bufs)
    prompts, src = _prompts(seed=1), _blocks(0)
    before = _device_ops(kvm)
    _put_all(kvm, prompts, src)
    assert _ops_since(kvm, before, workers) == [1] * workers, "8 puts in one call: one D2H per rank worker"
    dst = _blocks(32)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    matched = [kvm.get_match(p) for p in prompts]
    assert all(mask.all() for _, mask in matched)
    before = _device_ops(kvm)
    ids = [tid for tid, _ in matched]
    kvm.launch(ids, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)])
    res = kvm.wait(ids, timeout=30)
    assert all(r.status is TaskStatus.SUCCESS and r.return_mask is not None and r.return_mask.all()
               for r in res.values()), res
    assert _ops_since(kvm, before, workers) == [1] * workers, "8 gets in one launch: one H2D per rank worker"
    for s, d in zip(src, dst, strict=True):
        assert _same(bufs, s, d)
    _idle(kvm)
    assert kvm.stats()["num_batched_member_ops"] == 2 * NUM_PROMPTS


def test_get_async_many_loads_each_prompt_with_its_own_mask(served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=20, num=3), _blocks(0, num=3)
    _put_all(kvm, prompts[:2], src[:2])  # the third prompt is not cached
    dst = _blocks(32, num=3)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    half = np.zeros(BLOCKS * T, dtype=np.bool_)
    half[2 * T:] = True  # the second get loads only its last two blocks
    before = _device_ops(kvm)
    ids = kvm.get_async_many(prompts, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)],
                             token_masks=[None, half, None])
    res = kvm.wait(ids, timeout=30)
    masks = [res[tid].return_mask for tid in ids]
    assert all(res[tid].status is TaskStatus.SUCCESS for tid in ids), res
    assert masks[0] is not None and masks[0].all()
    assert masks[1] is not None and masks[1].tolist() == half.tolist()
    assert masks[2] is not None and not masks[2].any()
    assert _ops_since(kvm, before, len(bufs)) == [1] * len(bufs)
    assert _same(bufs, src[0], dst[0]) and _same(bufs, src[1][2:], dst[1][2:])
    assert _poisoned(bufs, dst[1][:2] + dst[2]), "blocks outside a task's mask are not written"
    _idle(kvm)


def test_a_failed_batch_fails_every_task_in_it_and_leaks_nothing(
        served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=30, num=4), _blocks(0, num=4)
    _put_all(kvm, prompts, src)
    used = kvm.stats()["cpu_used_blocks"]
    dst = _blocks(32, num=4)
    dst[2][3] = 400  # past the engine's 64 blocks: the worker refuses the whole copy before it starts
    good = [d for i, blocks in enumerate(dst) if i != 2 for d in blocks]
    for b in bufs:
        poison(b, good)
    matched = [kvm.get_match(p)[0] for p in prompts]
    kvm.launch(matched, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)])
    res = kvm.wait(matched, timeout=30)
    assert all(r.status is TaskStatus.FAILED and "out of range" in r.error for r in res.values()), res
    assert _poisoned(bufs, good), "a failed batch writes nothing"
    _idle(kvm)
    assert kvm.stats()["cpu_used_blocks"] == used, "the cached blocks stay, nothing else"
    again = kvm.get_async_many(prompts[:2], [slots_for(d, len(p)) for d, p in zip(dst[:2], prompts[:2],
                                                                                   strict=True)])
    assert all(r.status is TaskStatus.SUCCESS for r in kvm.wait(again, timeout=30).values())
    assert _same(bufs, src[0], dst[0]) and _same(bufs, src[1], dst[1])
    _idle(kvm)


def test_a_task_that_cannot_launch_fails_alone_and_the_rest_run_as_one_batch(
        served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=40, num=3), _blocks(0, num=3)
    _put_all(kvm, prompts, src)
    dst = _blocks(32, num=3)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    before = _device_ops(kvm)
    slot_maps = [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)]
    slot_maps[1] = slot_maps[1] + 1  # not aligned to blocks: refused at launch, before any op exists
    ids = kvm.get_async_many(prompts, slot_maps)
    res = kvm.wait(ids, timeout=30)
    assert res[ids[1]].status is TaskStatus.FAILED and "slot_mapping" in res[ids[1]].error
    assert res[ids[0]].status is TaskStatus.SUCCESS and res[ids[2]].status is TaskStatus.SUCCESS
    assert _ops_since(kvm, before, len(bufs)) == [1] * len(bufs)
    assert _same(bufs, src[0], dst[0]) and _same(bufs, src[2], dst[2]) and _poisoned(bufs, dst[1])
    _idle(kvm)
    with pytest.raises(InvalidRequest, match="as many slot_mappings"):
        kvm.get_async_many(prompts, slot_maps[:2])


def test_cancelling_one_task_of_a_batch_before_launch_leaves_the_others_to_run(
        served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=50, num=4), _blocks(0, num=4)
    _put_all(kvm, prompts, src)
    dst = _blocks(32, num=4)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    ids = [kvm.get_match(p)[0] for p in prompts]
    kvm.cancel(ids[1])
    before = _device_ops(kvm)
    kvm.launch(ids, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)])
    res = kvm.wait(ids, timeout=30)
    assert res[ids[1]].status is TaskStatus.CANCELLED
    assert all(res[i].status is TaskStatus.SUCCESS for i in ids if i != ids[1]), res
    assert _ops_since(kvm, before, len(bufs)) == [1] * len(bufs)
    assert all(_same(bufs, src[i], dst[i]) for i in (0, 2, 3)) and _poisoned(bufs, dst[1])
    _idle(kvm)


def test_reset_during_a_batch_lets_it_finish_byte_exact_and_cancels_what_was_not_launched(
        served: tuple[KVManager, list[HostKVBuffers]]) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=60, num=4), _blocks(0, num=4)
    _put_all(kvm, prompts, src)
    dst = _blocks(32, num=4)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    pending = kvm.get_match(prompts[3])[0]  # matched, never launched
    pids = _device_pids(kvm)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        ids = kvm.get_async_many(prompts[:3], [slots_for(d, len(p)) for d, p in zip(dst[:3], prompts[:3],
                                                                                      strict=True)])
        assert all(r.status is TaskStatus.TIMEOUT for r in kvm.wait(ids, timeout=0.3).values()), "held up"
        assert kvm.reset() == 1, "only the unlaunched match is cancelled"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    res = kvm.wait([*ids, pending], timeout=30)
    assert res[pending].status is TaskStatus.CANCELLED
    assert all(res[i].status is TaskStatus.SUCCESS for i in ids), res
    assert all(_same(bufs, s, d) for s, d in zip(src[:3], dst[:3], strict=True))
    assert not any(_cached(kvm, p) for p in prompts), "nothing from before the reset is matched"
    _idle(kvm)


@pytest.mark.parametrize("direction", ["get", "put"])
def test_a_worker_sigkilled_mid_batch_fails_every_task_and_the_next_batch_runs(
        served: tuple[KVManager, list[HostKVBuffers]], direction: str) -> None:
    kvm, bufs = served
    prompts, src = _prompts(seed=70, num=4), _blocks(0, num=4)
    dst = _blocks(32, num=4)
    if direction == "get":
        _put_all(kvm, prompts, src)
        for b in bufs:
            poison(b, [d for blocks in dst for d in blocks])
    pid = _device_pids(kvm)[-1]  # the last rank's worker: at TP=2 the other rank's copy completes
    os.kill(pid, signal.SIGSTOP)
    many = kvm.get_async_many if direction == "get" else kvm.put_async_many
    ids = many(prompts, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)])
    assert all(r.status is TaskStatus.TIMEOUT for r in kvm.wait(ids, timeout=0.3).values())
    os.kill(pid, signal.SIGKILL)
    res = kvm.wait(ids, timeout=30)
    assert all(r.status is TaskStatus.FAILED and "died" in r.error for r in res.values()), res
    _idle(kvm)
    if direction == "put":
        assert not any(_cached(kvm, p) for p in prompts), "nothing of the failed puts is indexed"
        _idle(kvm)
    deadline = time.monotonic() + 30
    while pid in _device_pids(kvm) and time.monotonic() < deadline:
        time.sleep(0.1)
    kvm.wait_ready(30)
    if direction == "put":
        _put_all(kvm, prompts, src)
    for b in bufs:
        poison(b, [d for blocks in dst for d in blocks])
    ids = kvm.get_async_many(prompts, [slots_for(d, len(p)) for d, p in zip(dst, prompts, strict=True)])
    assert all(r.status is TaskStatus.SUCCESS for r in kvm.wait(ids, timeout=30).values())
    assert all(_same(bufs, s, d) for s, d in zip(src, dst, strict=True))
    _idle(kvm)


def test_mixed_cpu_and_ssd_hits_in_one_batch_and_a_stalled_ssd_holds_up_only_its_task(
        ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    on_ssd, in_cpu = tokens(4 * T, seed=80), tokens(4 * T, seed=81)
    _put_all(kvm, [on_ssd], [list(range(4))])
    _put_all(kvm, [tokens(8 * T, seed=82), tokens(4 * T, seed=83)], [list(range(4, 12)), list(range(12, 16))])
    _put_all(kvm, [in_cpu], [list(range(16, 20))])  # the 16-block CPU pool no longer holds on_ssd
    assert kvm.stats()["cpu_evicted_blocks"] >= 4
    dst = [list(range(40, 44)), list(range(44, 48))]
    poison(bufs, dst[0] + dst[1])
    ssd_pid = int(kvm.stats()["pid:ssd-0"])
    before = _device_ops(kvm)
    os.kill(ssd_pid, signal.SIGSTOP)
    try:
        ids = kvm.get_async_many([on_ssd, in_cpu], [slots_for(d, 4 * T) for d in dst])
        res = kvm.wait(ids[1], timeout=30)[ids[1]]
        assert res.status is TaskStatus.SUCCESS, "the CPU hit is not held up by the stalled SSD read"
        assert kvm.try_wait(ids[0])[ids[0]].status is TaskStatus.UNREADY
        assert _same([bufs], list(range(16, 20)), dst[1]) and _poisoned([bufs], dst[0])
    finally:
        os.kill(ssd_pid, signal.SIGCONT)
    res = kvm.wait(ids[0], timeout=30)[ids[0]]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
    assert _same([bufs], list(range(4)), dst[0])
    assert _ops_since(kvm, before, 1) == [2], "the CPU hit's H2D at launch, the SSD hit's after its read"
    _idle(kvm)


def test_ssd_hits_launched_together_are_one_h2d_once_their_reads_land(
        ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    prompts = [tokens(4 * T, seed=90 + i) for i in range(3)]
    _put_all(kvm, prompts, [list(range(4 * i, 4 * i + 4)) for i in range(3)])
    _put_all(kvm, [tokens(16 * T, seed=95)], [list(range(16, 32))])  # fills the CPU pool: all three on SSD only
    dst = [list(range(40 + 4 * i, 44 + 4 * i)) for i in range(3)]
    poison(bufs, [d for blocks in dst for d in blocks])
    before = _device_ops(kvm)
    ssd_pid = int(kvm.stats()["pid:ssd-0"])
    os.kill(ssd_pid, signal.SIGSTOP)  # the three reads wait in its queue, so it runs them as one batch
    try:
        ids = kvm.get_async_many(prompts, [slots_for(d, 4 * T) for d in dst])
        assert all(r.status is TaskStatus.TIMEOUT for r in kvm.wait(ids, timeout=0.3).values())
    finally:
        os.kill(ssd_pid, signal.SIGCONT)
    res = kvm.wait(ids, timeout=30)
    assert all(r.status is TaskStatus.SUCCESS and r.return_mask is not None and r.return_mask.all()
               for r in res.values()), res
    assert all(_same([bufs], list(range(4 * i, 4 * i + 4)), dst[i]) for i in range(3))
    # ... and reports them in one message: the three H2Ds it released leave as one batched op.
    assert _ops_since(kvm, before, 1) == [1]
    _idle(kvm)
