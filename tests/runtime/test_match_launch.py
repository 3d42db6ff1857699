"""get_match_launch: get_match and launch in one round trip, through the whole stack (server process,
device worker, shared memory), against the two-step get_match + launch it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.kvmanager import KVManager, hash_page_keys
from flexkv.layout import LayoutKind
from flexkv.types import InvalidRequest, TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    host_buffers,
    poison,
    serving,
    slots_for,
    small_cache,
    small_model,
    tokens,
)
from tests.runtime.test_layerwise import layer_bytes

pytestmark = pytest.mark.timeout(90)


def _stored(kvm: KVManager, toks: np.ndarray, blocks: list[int]) -> None:
    put = kvm.put_async(toks, slots_for(blocks, len(toks)))
    assert kvm.wait(put)[put].status is TaskStatus.SUCCESS


def test_a_get_matched_and_launched_at_once_restores_exact_bytes_and_the_mask_of_get_match() -> None:
    with serving(small_model(), small_cache(), LayoutKind.SGLANG, 48, seed=1) as (kvm, bufs):
        toks = tokens(10 * T + 3, seed=7)
        _stored(kvm, toks, list(range(11)))
        longer = np.concatenate([toks[: 10 * T], tokens(4 * T, seed=8)])  # 10 cached blocks, 4 new
        tid, mask = kvm.get_match(longer)
        kvm.cancel(tid)

        dst = list(range(20, 34))  # a page for every block of the prompt: the engine cannot know the match yet
        poison(bufs, dst)
        tid2, mask2 = kvm.get_match_launch(longer, slots_for(dst, len(longer)))
        assert np.array_equal(mask, mask2) and int(mask2.sum()) == 10 * T
        res = kvm.wait(tid2)[tid2]
        assert res.status is TaskStatus.SUCCESS, res
        assert res.return_mask is not None and np.array_equal(res.return_mask, mask2)
        for s, d in zip(range(10), dst[:10], strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s), f"block {s} -> {d} differs"
        for d in dst[10:]:
            assert set(block_bytes(bufs, d)) == {0xAB}, f"page {d} of an unmatched block was written"
        kvm.check_invariants()


def test_a_later_launch_of_the_same_slots_is_a_no_op_and_other_slots_are_refused() -> None:
    with serving(small_model(), small_cache(), LayoutKind.VLLM_KV_FIRST, 32, seed=2) as (kvm, _bufs):
        toks = tokens(4 * T, seed=3)
        _stored(kvm, toks, list(range(4)))
        slots = slots_for(list(range(8, 12)), len(toks))
        tid, mask = kvm.get_match_launch(toks, slots)
        assert mask.all()
        kvm.launch(tid, slots)  # the same mapping again: nothing sent
        with pytest.raises(InvalidRequest, match="different slot_mapping"):
            kvm.launch(tid, slots_for(list(range(12, 16)), len(toks)))
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
        kvm.check_invariants()


def test_an_empty_match_is_not_launched_and_cancels_as_after_get_match() -> None:
    with serving(small_model(), small_cache(), LayoutKind.VLLM_KV_FIRST, 32, seed=3) as (kvm, bufs):
        toks = tokens(3 * T, seed=4)
        poison(bufs, [0, 1, 2])
        tid, mask = kvm.get_match_launch(toks, slots_for([0, 1, 2], len(toks)))
        assert not mask.any()
        kvm.cancel(tid)
        assert kvm.wait(tid)[tid].status is TaskStatus.CANCELLED
        assert all(set(block_bytes(bufs, b)) == {0xAB} for b in (0, 1, 2))
        kvm.check_invariants()


def test_bad_slots_are_refused_with_a_reason_and_leave_no_reservation() -> None:
    with serving(small_model(), small_cache(), LayoutKind.VLLM_KV_FIRST, 32, seed=4) as (kvm, _bufs):
        toks = tokens(4 * T, seed=5)
        _stored(kvm, toks, list(range(4)))
        with pytest.raises(InvalidRequest, match="one per token"):
            kvm.get_match_launch(toks, slots_for([8, 9], 2 * T))  # sent nowhere: the client counts first
        bad = slots_for(list(range(8, 12)), len(toks))
        bad[T + 3] += 1  # block 1's slots are no longer one page
        tid, mask = kvm.get_match_launch(toks, bad)
        assert mask.all()
        res = kvm.wait(tid)[tid]
        assert res.status is TaskStatus.FAILED and "gpu_block_id" in (res.error or ""), res
        kvm.check_invariants()  # the failed launch released its locks
        tid, mask = kvm.get_match_launch(toks, slots_for(list(range(8, 12)), len(toks)))  # still all cached
        assert mask.all() and kvm.wait(tid)[tid].status is TaskStatus.SUCCESS


def test_a_layerwise_match_launch_lands_every_layer_exactly_when_its_wait_returns() -> None:
    model = small_model()
    bufs = host_buffers(model, LayoutKind.SGLANG, 64, seed=5)
    kvm = KVManager(model, small_cache())
    try:
        kvm.start()
        kvm.register_kv_buffers(bufs, bufs.layout, layerwise=True)
        n = 20  # at least LAYER_MAJOR_MIN_BLOCKS: copied layer-major
        toks = tokens(n * T, seed=6)
        _stored(kvm, toks, list(range(n)))
        dst = list(range(30, 30 + n))
        poison(bufs, dst)
        tid, mask = kvm.get_match_launch(toks, slots_for(dst, len(toks)), layerwise=True)
        assert mask.all()
        want = {(d, layer): layer_bytes(bufs, s, layer) for s, d in zip(range(n), dst, strict=True)
                for layer in range(model.num_layers)}
        for layer in range(model.num_layers):
            assert kvm.wait_layer(tid, layer, timeout=30).status is TaskStatus.SUCCESS
            assert all(layer_bytes(bufs, d, layer) == want[d, layer] for d in dst), f"layer {layer} not in place"
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
        for s, d in zip(range(n), dst, strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s)
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        bufs.close()


def test_a_key_match_launched_at_once_loads_the_pages_after_first_block_byte_exact() -> None:
    """The key-based form (the SGLang backend's batch_get): compact slots from ``first_block`` on."""
    with serving(small_model(), small_cache(), LayoutKind.SGLANG, 48, seed=6) as (kvm, bufs):
        keys = hash_page_keys([f"page-{i}" for i in range(8)])
        tid, begin, end = kvm.put_match_keys(keys)
        assert (begin, end) == (0, 8)
        kvm.launch(tid, slots_for(list(range(8)), 8 * T))
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS

        more = hash_page_keys([f"page-{i}" for i in range(10)])  # 8 cached, 2 not
        dst = list(range(30, 37))  # pages for blocks 3..9: first_block 3
        poison(bufs, dst)
        tid, begin, end = kvm.get_match_keys_launch(more, slots_for(dst, 7 * T), first_block=3)
        assert (begin, end) == (3, 8)
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
        for s, d in zip(range(3, 8), dst[:5], strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s), f"block {s} -> {d} differs"
        assert all(set(block_bytes(bufs, d)) == {0xAB} for d in dst[5:]), "pages of uncached blocks were written"
        with pytest.raises(InvalidRequest, match="one per token"):
            kvm.get_match_keys_launch(more, slots_for(list(range(30, 38)), 8 * T), first_block=3)
        tid, begin, end = kvm.get_match_keys_launch(hash_page_keys(["other"]), slots_for([40], T))
        assert begin == end == 0
        kvm.cancel(tid)
        kvm.check_invariants()
