"""Transfer graphs: the ops of one task, their dependencies and the reservations each op holds.

GET: ``[DISK2H, REMOTE2H] -> H2D -> END``; PUT: ``D2H -> END`` and ``D2H -> [H2DISK, H2REMOTE]``.
``END`` is a marker that never reaches a worker: when it runs, the engine-facing part of the task
is done (``wait(completely=False)`` may return). Each op holds the locks of the blocks it reads
and writes; ``commit`` (op succeeded) publishes what it wrote and drops its locks, ``rollback``
(op failed, dropped, or finished after its task failed) drops its locks and leaves what it wrote
dead, to be pruned. Either one calls the op's ``on_finish`` hook once (the remote tier in lookup
mode tracks its in-flight writes with it). ``truncate`` shortens a waiting read-only op (a GET's
H2D whose remote part could not be fetched). Server process only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from flexkv.scheduler.index import HashArray, RadixIndex
from flexkv.scheduler.pool import BlockIds
from flexkv.types import OpType

TaskKey = tuple[int, int]  # (client_id, task_id); task ids are chosen by clients, unique per client
_NO_IDS: BlockIds = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class TransferOp:
    """One op of a task's transfer graph, as sent to a worker.

    Block ids by type: H2D cpu -> gpu, D2H gpu -> cpu, DISK2H ssd -> cpu, H2DISK cpu -> ssd,
    REMOTE2H remote -> cpu, H2REMOTE cpu -> remote. ``block_hashes`` (uint64): REMOTE2H/H2REMOTE
    and DISK2H: one per block, the blocks' keys (the remote store's keys; the SSD worker checks
    that each slot holds the block it names); H2DISK: the whole path up to the last written
    block (its last ``len(dst)`` entries are the blocks' keys, the ones before name their parents
    and depth, for the SSD journal); None for H2D/D2H. When the remote tier is indexed by the
    store itself (``RemoteLookup``) there are no remote block ids: that side holds -1 per block.
    """

    op_id: int  # unique in this ControlPlane
    task_key: TaskKey
    op_type: OpType
    src_block_ids: np.ndarray
    dst_block_ids: np.ndarray
    block_hashes: np.ndarray | None
    # A batched op (``scheduler/batch.py``): the ops of several tasks in one, their blocks concatenated
    # in this order; ``task_key`` is the first member's. Empty for an op of one task.
    members: tuple[OpMember, ...] = ()

    @property
    def task_keys(self) -> tuple[TaskKey, ...]:
        """Every task this op moves blocks for."""
        return tuple(m.task_key for m in self.members) if self.members else (self.task_key,)


class OpMember(NamedTuple):
    """One task's op inside a batched op: its own op id (the control plane's op table) and block count."""

    op_id: int
    task_key: TaskKey
    num_blocks: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks of one tier that one op holds a lock on. For writes, ``path_hashes`` are the hashes
    of the path up to the last written block, so a rollback can find and prune them."""

    index: RadixIndex
    block_ids: BlockIds
    path_hashes: HashArray | None = None


class OpState(enum.IntEnum):
    WAITING = 0  # dependencies pending, or the task is not launched yet
    DISPATCHED = 1  # handed to a worker; its completion will come
    DONE = 2  # succeeded and committed
    DROPPED = 3  # failed, or never dispatched because its task failed/was cancelled; rolled back


@dataclass(eq=False, slots=True)
class OpNode:
    """A planned op. ``op_type`` None is the task-end marker. GPU ids (H2D dst, D2H src) are bound
    at launch."""

    op_type: OpType | None
    src_block_ids: BlockIds = field(default_factory=lambda: _NO_IDS)
    dst_block_ids: BlockIds = field(default_factory=lambda: _NO_IDS)
    block_hashes: HashArray | None = None
    reads: tuple[Reservation, ...] = ()
    writes: tuple[Reservation, ...] = ()
    successors: list[OpNode] = field(default_factory=list)
    num_deps_left: int = 0
    state: OpState = OpState.WAITING
    op_id: int = -1
    on_finish: Callable[[bool], None] | None = None  # called once: True on commit, False on rollback

    @property
    def is_live(self) -> bool:
        """Still holding its reservations."""
        return self.state <= OpState.DISPATCHED

    def to_op(self, op_id: int, key: TaskKey, gpu_block_ids: BlockIds) -> TransferOp:
        """Mark dispatched under ``op_id`` and build the worker's op."""
        assert self.op_type is not None and self.state is OpState.WAITING
        self.state = OpState.DISPATCHED
        self.op_id = op_id
        src, dst = self.src_block_ids, self.dst_block_ids
        if self.op_type is OpType.H2D:
            dst = gpu_block_ids[:src.shape[0]]  # shorter than the task's range once truncated
        elif self.op_type is OpType.D2H:
            src = gpu_block_ids
        return TransferOp(op_id, key, self.op_type, src, dst, self.block_hashes)


class TaskGraph:
    """The DAG of one task. Built by the planner, driven by ``Task``."""

    def __init__(self) -> None:
        self.nodes: list[OpNode] = []
        self.end = OpNode(None)

    def add(self, op_type: OpType, src: BlockIds, dst: BlockIds, *, reads: tuple[Reservation, ...] = (),
            writes: tuple[Reservation, ...] = (), deps: tuple[OpNode, ...] = (),
            block_hashes: HashArray | None = None, on_finish: Callable[[bool], None] | None = None) -> OpNode:
        node = OpNode(op_type, src, dst, block_hashes, reads, writes, on_finish=on_finish)
        self.depend(node, deps)
        self.nodes.append(node)
        return node

    def depend(self, node: OpNode, deps: tuple[OpNode, ...]) -> None:
        """``node`` runs only after every op of ``deps`` succeeded."""
        for dep in deps:
            dep.successors.append(node)
        node.num_deps_left += len(deps)

    def all_nodes(self) -> list[OpNode]:
        return [*self.nodes, self.end]

    def runnable(self) -> list[OpNode]:
        """Waiting nodes with no pending dependency (at launch)."""
        return [n for n in self.all_nodes() if n.state is OpState.WAITING and n.num_deps_left == 0]


def commit(node: OpNode) -> list[OpNode]:
    """``node`` succeeded: publish its writes, drop its locks; returns successors now runnable."""
    for res in node.writes:
        res.index.publish(res.block_ids)
        res.index.unlock(res.block_ids)
    for res in node.reads:
        res.index.unlock(res.block_ids)
    node.state = OpState.DONE
    if node.on_finish is not None:
        node.on_finish(True)
    runnable = []
    for succ in node.successors:
        succ.num_deps_left -= 1
        if succ.num_deps_left == 0 and succ.state is OpState.WAITING:
            runnable.append(succ)
    return runnable


def rollback(node: OpNode) -> list[Reservation]:
    """``node`` failed or is dropped: drop its locks; its written blocks stay unready (dead).

    Returns the writes, which the caller prunes once every rollback of the call is done."""
    for res in (*node.reads, *node.writes):
        res.index.unlock(res.block_ids)
    node.state = OpState.DROPPED
    if node.on_finish is not None:
        node.on_finish(False)
    return list(node.writes)


def truncate(node: OpNode, num_blocks: int) -> None:
    """Keep only the first ``num_blocks`` blocks of a waiting op that writes no tier (a GET's H2D):
    the read locks of the dropped blocks are released now. Each read reservation must list its
    blocks in the op's order (the planner's H2D has one, equal to its sources)."""
    assert node.state is OpState.WAITING and not node.writes, "only a waiting read-only op can be truncated"
    reads = []
    for res in node.reads:
        res.index.unlock(res.block_ids[num_blocks:])
        reads.append(Reservation(res.index, res.block_ids[:num_blocks]))
    node.reads = tuple(reads)
    node.src_block_ids = node.src_block_ids[:num_blocks]
    node.dst_block_ids = node.dst_block_ids[:num_blocks]
