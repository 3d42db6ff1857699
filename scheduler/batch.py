"""Batched ops: the device ops (H2D, D2H) of several tasks, ready together, go out as one op per direction.

A launch of several tasks (one ``LaunchMsg`` with several ids, ``KVManager.get_async_many``) or one
worker report that releases several tasks' H2Ds yields the ready ops of all of them at once.
``coalesce`` turns each group of device ops of one DP client and one direction into one op whose
blocks are the members' blocks concatenated in order: each device worker (every TP rank, as for any
device op) gets one message, makes one copy call over all the blocks and sends one completion.

The members stay in the control plane's op table as dispatched ops; the batched op's outcome is every
member's (``ControlPlane.complete_op``): if it fails, every task in it fails (the engine recomputes).
Ops whose destinations overlap (two tasks given the same engine block) are never merged, so one copy
call never writes a block twice. SSD and remote ops are not merged: their workers already run every
op they receive at once (one io_uring submission, one store call) and report each op on its own,
which keeps a corrupt or missing block a miss of its own task only. Server process only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flexkv.scheduler.graph import OpMember, TransferOp
from flexkv.types import OpType

BATCHED_OP_TYPES = (OpType.H2D, OpType.D2H)


def coalesce(ops: list[TransferOp], new_op_id: Callable[[], int]) -> tuple[list[TransferOp], list[TransferOp]]:
    """Merge the single-task device ops of ``ops`` per (direction, DP client). Returns (the ops to
    dispatch, in place of ``ops``; the batched ops among them). Other ops pass through unchanged."""
    out: list[TransferOp] = []
    groups: dict[tuple[OpType, int], list[TransferOp]] = {}
    for op in ops:
        if op.op_type in BATCHED_OP_TYPES and not op.members:
            groups.setdefault((op.op_type, op.task_key[0]), []).append(op)
        else:
            out.append(op)
    batched = []
    for group in groups.values():
        for part in _disjoint_destinations(group):
            if len(part) == 1:
                out.append(part[0])
                continue
            op = merge(new_op_id(), part)
            out.append(op)
            batched.append(op)
    return out, batched


def merge(op_id: int, ops: list[TransferOp]) -> TransferOp:
    """One op of ``ops`` (same type and DP client, single-task) with their blocks in order."""
    first = ops[0]
    assert all(op.op_type is first.op_type and op.task_key[0] == first.task_key[0] and not op.members
               for op in ops), "a batch is one direction of one DP client's single-task ops"
    members = tuple(OpMember(op.op_id, op.task_key, int(op.src_block_ids.shape[0])) for op in ops)
    return TransferOp(op_id, first.task_key, first.op_type, np.concatenate([op.src_block_ids for op in ops]),
                      np.concatenate([op.dst_block_ids for op in ops]), None, members)


def _disjoint_destinations(ops: list[TransferOp]) -> list[list[TransferOp]]:
    """Split ``ops`` (in order) into groups in which no destination block appears twice."""
    parts: list[tuple[list[TransferOp], set[int]]] = []
    for op in ops:
        dst = op.dst_block_ids.tolist()
        for members, seen in parts:
            if seen.isdisjoint(dst):
                members.append(op)
                seen.update(dst)
                break
        else:
            parts.append(([op], set(dst)))
    return [members for members, _ in parts]
