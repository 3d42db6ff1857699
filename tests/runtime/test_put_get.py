"""Scenarios through the whole stack: KVManager -> server process -> device worker -> shared memory."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    poison,
    serving,
    slots_for,
    small_cache,
    small_model,
    tokens,
)

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("kind", [LayoutKind.VLLM_KV_FIRST, LayoutKind.VLLM_BLOCK_FIRST, LayoutKind.SGLANG,
                                  LayoutKind.MLA])
def test_put_then_get_restores_exact_bytes(kind: LayoutKind) -> None:
    model = small_model(use_mla=kind is LayoutKind.MLA)
    with serving(model, small_cache(), kind, 32, seed=1) as (kvm, bufs):
        assert kvm.is_ready()
        toks = tokens(10 * T + 3, seed=7)  # 10 whole blocks + a partial one
        src_blocks = list(range(11))
        put = kvm.put_async(toks, slots_for(src_blocks, len(toks)))
        res = kvm.wait([put])[put]
        assert res.status is TaskStatus.SUCCESS, res
        assert res.return_mask is not None and res.return_mask.sum() == 10 * T

        dst_blocks = list(range(16, 27))
        poison(bufs, dst_blocks)
        get = kvm.get_async(toks, slots_for(dst_blocks, len(toks)))
        res = kvm.wait([get])[get]
        assert res.status is TaskStatus.SUCCESS, res
        assert res.return_mask is not None
        assert res.return_mask[: 10 * T].all() and not res.return_mask[10 * T:].any()
        for s, d in zip(src_blocks[:10], dst_blocks[:10], strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s), f"block {s} -> {d} differs"
        assert set(block_bytes(bufs, dst_blocks[10])) == {0xAB}, "the partial block must not be written"
        kvm.check_invariants()


def test_masks_match_then_launch_and_try_wait() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 32, seed=2) as (kvm, _bufs):
        toks = tokens(6 * T + 1, seed=3)
        tid, mask = kvm.get_match(toks)
        assert not mask.any(), "nothing cached yet"
        kvm.cancel([tid])

        tid, mask = kvm.put_match(toks)
        assert mask.tolist() == [True] * (6 * T) + [False]
        kvm.launch([tid], [slots_for(list(range(7)), len(toks))])
        kvm.launch([tid], [slots_for(list(range(7)), len(toks))])  # same mapping again: a no-op
        assert kvm.wait([tid], timeout=10)[tid].status is TaskStatus.SUCCESS

        # a longer prompt sharing the prefix: put_match marks only the new blocks
        longer = np.concatenate([toks[: 6 * T], tokens(2 * T, seed=4)])
        tid, mask = kvm.put_match(longer)
        assert mask.tolist() == [False] * (6 * T) + [True] * (2 * T)
        kvm.cancel([tid])

        tid, mask = kvm.get_match(longer)
        assert mask.tolist() == [True] * (6 * T) + [False] * (2 * T)
        kvm.launch(tid, slots_for(list(range(10, 18)), len(longer)))
        res = kvm.try_wait([tid])[tid]
        assert res.status in (TaskStatus.UNREADY, TaskStatus.SUCCESS)
        assert kvm.wait([tid])[tid].status is TaskStatus.SUCCESS
        kvm.check_invariants()


def test_cancel_after_match_releases_reservations() -> None:
    model = small_model()
    with KVManager(model, small_cache(num_cpu_blocks=16)) as kvm:
        before = kvm.stats()
        tid, mask = kvm.put_match(tokens(8 * T, seed=5))
        assert mask.all()
        during = kvm.stats()
        assert during != before, "a put_match reserves CPU blocks"
        kvm.cancel([tid])
        assert kvm.wait([tid])[tid].status is TaskStatus.CANCELLED
        after = kvm.stats()
        assert {k: v for k, v in after.items() if "free" in k or "used" in k} == \
               {k: v for k, v in before.items() if "free" in k or "used" in k}
        kvm.check_invariants()


def test_tasks_nobody_waits_for_do_not_pile_up_in_the_server() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=6) as (kvm, _bufs):
        toks = tokens(4 * T, seed=8)
        for _ in range(50):
            tid, _mask = kvm.get_match(toks)
            kvm.cancel(tid)
        for _ in range(20):
            last = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))  # fire and forget, never waited
        deadline = time.monotonic() + 10
        while kvm.stats()["num_tasks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kvm.stats()["num_tasks"] == 0, "finished and cancelled tasks leave the control plane"
        assert kvm.wait(last)[last].status is TaskStatus.SUCCESS, "a retired result can still be read"


def test_two_lanes_run_a_get_and_a_put_at_once_byte_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU worker's two-lane path (each lane reporting on its own socket), on host buffers."""
    monkeypatch.setenv("FLEXKV_HOST_LANES", "2")  # inherited by the server and its device worker
    model = small_model()
    with serving(model, small_cache(num_cpu_blocks=64), LayoutKind.VLLM_KV_FIRST, 48, seed=3) as (kvm, bufs):
        a, b = tokens(8 * T, seed=1), tokens(8 * T, seed=2)
        put_a = kvm.put_async(a, slots_for(list(range(8)), len(a)))
        assert kvm.wait(put_a)[put_a].status is TaskStatus.SUCCESS
        poison(bufs, list(range(16, 24)))
        get_a = kvm.get_async(a, slots_for(list(range(16, 24)), len(a)))
        put_b = kvm.put_async(b, slots_for(list(range(8, 16)), len(b)))
        res = kvm.wait([get_a, put_b])
        assert all(r.status is TaskStatus.SUCCESS for r in res.values()), res
        poison(bufs, list(range(24, 32)))
        get_b = kvm.get_async(b, slots_for(list(range(24, 32)), len(b)))
        assert kvm.wait(get_b)[get_b].status is TaskStatus.SUCCESS
        for i in range(8):
            assert block_bytes(bufs, 16 + i) == block_bytes(bufs, i)
            assert block_bytes(bufs, 24 + i) == block_bytes(bufs, 8 + i)
        kvm.check_invariants()
