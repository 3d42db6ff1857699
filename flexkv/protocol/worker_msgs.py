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
    """Completions. ``errors[i]`` is "" for success, else a message naming what failed.

    The worker's own figures ride along for the server's metrics and trace (empty/0 from a worker that
    does not measure): ``num_bytes[i]`` the bytes this worker moved for op i, ``queue_s[i]`` the seconds
    op i waited in the worker before its batch started, ``busy_s`` the seconds the batch ran."""

    op_ids: list[int]
    errors: list[str]
    num_bytes: list[int] = []
    queue_s: list[float] = []
    busy_s: float = 0.0


WorkerToServer = WorkerHelloMsg | OpsDoneMsg


class ServerToWorker(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pass


class ExecuteOpMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    """Frames: src block ids (int64), dst block ids (int64), then block hashes (uint64) for remote ops."""

    op_id: int
    op_type: int


class StopWorkerMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    reason: str = ""


ServerToWorkerMsg = ExecuteOpMsg | StopWorkerMsg
