"""Batched ops in the control plane (scheduler/batch.py): several tasks' device ops ready together
become one op per direction; its completion is each member's. No bytes move here; every step is
followed by check_invariants()."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.graph import TransferOp
from flexkv.types import InvalidRequest, OpType, TaskStatus
from tests.scheduler.test_scheduler_scenarios import T, drain, make_cp, put, slots, toks


def launch_all(cp: ControlPlane, keys: list[tuple[int, int]], first_gpu_blocks: list[int],
               num_tokens: int) -> list[TransferOp]:
    ops: list[TransferOp] = []
    for key, gpu in zip(keys, first_gpu_blocks, strict=True):
        ops += cp.launch(key, slots(num_tokens, first_gpu_block=gpu))
    out = cp.coalesce(ops)
    cp.check_invariants()
    return out


def test_gets_launched_together_are_one_h2d_with_every_tasks_blocks_in_order() -> None:
    cp = make_cp(cpu=64)
    keys = [(1, i) for i in range(1, 5)]
    for i, key in enumerate(keys):
        put(cp, (1, 100 + i), toks(4 * T, seed=i))
        assert cp.get_match(key, toks(4 * T, seed=i)).all()
    singles = [cp.launch(key, slots(4 * T, first_gpu_block=10 * i)) for i, key in enumerate(keys)]
    [batch] = cp.coalesce([op for ops in singles for op in ops])
    assert batch.op_type is OpType.H2D and batch.task_keys == tuple(keys)
    assert batch.dst_block_ids.tolist() == [10 * i + b for i in range(4) for b in range(4)]
    assert batch.src_block_ids.tolist() == [b for [op] in singles for b in op.src_block_ids.tolist()]
    assert [m.op_id for m in batch.members] == [op.op_id for [op] in singles]
    assert cp.stats()["num_batched_ops_in_flight"] == 1
    cp.check_invariants()
    with pytest.raises(InvalidRequest, match="part of batched op"):
        cp.complete_op(singles[0][0].op_id, True)
    assert cp.complete_op(batch.op_id, True) == []
    assert all(cp.poll(key).status is TaskStatus.SUCCESS for key in keys)
    with pytest.raises(InvalidRequest, match="already completed"):
        cp.complete_op(batch.op_id, True)
    for key in keys:
        cp.release(key)
    cp.check_invariants()
    assert cp.stats()["num_batched_ops"] == 1 and cp.stats()["num_batched_member_ops"] == 4


def test_a_failed_batch_fails_every_task_in_it_and_releases_everything() -> None:
    cp = make_cp(cpu=32)
    keys = [(1, 1), (1, 2), (1, 3)]
    base = cp.stats()
    for i, key in enumerate(keys):
        assert cp.put_match(key, toks(4 * T, seed=i)).all()
    [batch] = launch_all(cp, keys, [0, 4, 8], 4 * T)
    assert batch.op_type is OpType.D2H and len(batch.members) == 3
    assert cp.complete_op(batch.op_id, False, "engine buffer gone") == []
    cp.check_invariants()
    for key in keys:
        resp = cp.poll(key)
        assert resp.status is TaskStatus.FAILED and "engine buffer gone" in resp.error
        cp.release(key)
    cp.check_invariants()
    assert cp.stats()["cpu_used_blocks"] == base["cpu_used_blocks"], "nothing half-written stays indexed"
    assert not cp.get_match((1, 9), toks(4 * T, seed=0)).any()


def test_puts_and_gets_launched_together_make_one_op_per_direction() -> None:
    cp = make_cp(cpu=64)
    put(cp, (1, 100), toks(4 * T, seed=1))
    cp.get_match((1, 1), toks(4 * T, seed=1))
    cp.get_match((1, 2), toks(4 * T, seed=1))
    cp.put_match((1, 3), toks(4 * T, seed=2))
    cp.put_match((1, 4), toks(4 * T, seed=3))
    ops = launch_all(cp, [(1, 1), (1, 2), (1, 3), (1, 4)], [0, 4, 8, 12], 4 * T)
    assert sorted((op.op_type.name, len(op.members)) for op in ops) == [("D2H", 2), ("H2D", 2)]
    drain(cp, ops)
    assert all(cp.poll((1, i)).status is TaskStatus.SUCCESS for i in range(1, 5))


def test_ops_of_different_clients_or_overlapping_destinations_are_not_merged() -> None:
    cp = make_cp(cpu=64)
    put(cp, (1, 100), toks(4 * T, seed=1))
    put(cp, (2, 100), toks(4 * T, seed=1))
    cp.get_match((1, 1), toks(4 * T, seed=1))
    cp.get_match((1, 2), toks(4 * T, seed=1))
    cp.get_match((1, 3), toks(4 * T, seed=1))
    cp.get_match((2, 1), toks(4 * T, seed=1))
    ops = [*cp.launch((1, 1), slots(4 * T, 0)), *cp.launch((1, 2), slots(4 * T, 2)),  # blocks 2, 3 twice
           *cp.launch((1, 3), slots(4 * T, 8)), *cp.launch((2, 1), slots(4 * T, 0))]
    out = cp.coalesce(ops)
    cp.check_invariants()
    assert sorted(tuple(k for k in op.task_keys) for op in out) == [((1, 1), (1, 3)), ((1, 2),), ((2, 1),)]
    for op in out:
        assert len(set(op.dst_block_ids.tolist())) == op.dst_block_ids.size, "no engine block written twice"
    drain(cp, out)


def test_drop_client_reports_the_batched_op_and_its_completion_rolls_back() -> None:
    cp = make_cp(cpu=32)
    base = cp.stats()
    for i in (1, 2):
        cp.put_match((1, i), toks(4 * T, seed=i))
    [batch] = launch_all(cp, [(1, 1), (1, 2)], [0, 4], 4 * T)
    assert cp.drop_client(1) == [batch.op_id], "the op whose completion must still come"
    cp.check_invariants()
    cp.complete_op(batch.op_id, True)
    cp.check_invariants()
    assert cp.stats()["cpu_used_blocks"] == base["cpu_used_blocks"]
    assert cp.stats()["num_ops_in_flight"] == 0 and cp.stats()["num_batched_ops_in_flight"] == 0


def test_an_ssd_task_in_a_batch_runs_its_h2d_after_its_read_and_holds_up_nobody() -> None:
    cp = make_cp(cpu=8, ssd=64)
    put(cp, (1, 100), toks(4 * T, seed=1))  # CPU and SSD
    put(cp, (1, 101), toks(8 * T, seed=2))  # evicts the first prompt from the 8-block CPU tier
    assert cp.get_match((1, 1), toks(4 * T, seed=1)).all()  # from SSD
    assert cp.get_match((1, 2), toks(4 * T, seed=2)).all()  # from CPU
    ops = launch_all(cp, [(1, 1), (1, 2)], [0, 4], 4 * T)
    assert sorted(op.op_type.name for op in ops) == ["DISK2H", "H2D"]
    h2d = next(op for op in ops if op.op_type is OpType.H2D)
    assert h2d.task_keys == ((1, 2),) and not h2d.members, "the CPU hit goes at launch, alone"
    cp.complete_op(h2d.op_id, True)
    assert cp.poll((1, 2)).status is TaskStatus.SUCCESS and cp.poll((1, 1)).status is TaskStatus.UNREADY
    disk2h = next(op for op in ops if op.op_type is OpType.DISK2H)
    [later] = cp.coalesce(cp.complete_op(disk2h.op_id, True))
    assert later.op_type is OpType.H2D and later.task_keys == ((1, 1),)
    assert np.array_equal(later.dst_block_ids, np.arange(4))
    drain(cp, [later])
    assert cp.poll((1, 1)).status is TaskStatus.SUCCESS
