"""Messages between the scheduler server and its worker processes."""

from __future__ import annotations

import msgspec


class WorkerMsg(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every worker -> server message."""

    worker_id: str


class WorkerHelloMsg(WorkerMsg, frozen=True, tag=True, kw_only=True):
    """A worker announces the op types it serves once it is ready to execute them."""

    pid: int
    op_types: list[int]


class OpsDoneMsg(WorkerMsg, frozen=True, tag=True, kw_only=True):
    """Completions. ``errors[i]`` is "" for success, else a message naming what failed."""

    op_ids: list[int]
    errors: list[str]


WorkerToServer = WorkerHelloMsg | OpsDoneMsg


class ServerToWorker(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pass


class ExecuteOpMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    """Frames: src block ids (int64), dst block ids (int64), then block hashes (uint64) for remote ops.
    ``task_id``: the client's id of the op's task (device workers publish layer-wise progress under it)."""

    op_id: int
    op_type: int
    task_id: int = -1


class StopWorkerMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    reason: str = ""


ServerToWorkerMsg = ExecuteOpMsg | StopWorkerMsg
