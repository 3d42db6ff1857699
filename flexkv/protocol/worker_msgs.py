"""Messages between the scheduler server and its workers (processes it spawned, or engine-side lanes).

A worker's sockets carry no chosen identity: the server's ROUTER names each connection, and a
connection counts as a worker (or one of its lanes) only after a hello carrying that worker's
credential (DESIGN §7, trust). Everything else from an unknown connection is dropped and logged.
"""

from __future__ import annotations

import msgspec


class WorkerMsg(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every worker -> server message."""

    worker_id: str


class WorkerHelloMsg(WorkerMsg, frozen=True, tag=True, kw_only=True):
    """First message on each of a worker's sockets. ``lane`` -1 is the worker's main socket (it announces
    the op types it serves once it is ready to execute them); ``lane`` >= 0 is that lane's report socket.
    ``credential`` is the secret the server handed this worker at spawn (or at an engine-side registration)."""

    pid: int
    op_types: list[int]
    credential: str = ""
    lane: int = -1


class OpsDoneMsg(WorkerMsg, frozen=True, tag=True, kw_only=True):
    """Completions. ``errors[i]`` is "" for success, else a message naming what failed.
    ``corrupt_at`` (empty, or one per op): for a failed DISK2H whose bytes failed verification, the
    index of its first corrupt block (the blocks before it were verified); -1 otherwise.

    The worker's own figures ride along for the server's metrics and trace (empty/0 from a worker that
    does not measure): ``num_bytes[i]`` the bytes this worker moved for op i, ``queue_s[i]`` the seconds
    op i waited in the worker before its batch started, ``busy_s`` the seconds the batch ran."""

    op_ids: list[int]
    errors: list[str]
    corrupt_at: list[int] = []
    num_bytes: list[int] = []
    queue_s: list[float] = []
    busy_s: float = 0.0


class WorkerByeMsg(WorkerMsg, frozen=True, tag=True, kw_only=True):
    """A worker stops (an engine-side lane closed, or a worker told to stop): its rank is gone."""

    reason: str = ""


WorkerToServer = WorkerHelloMsg | OpsDoneMsg | WorkerByeMsg


class ServerToWorker(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    pass


class ExecuteOpMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    """Frames: src block ids (int64), dst block ids (int64), then block hashes (uint64) for remote ops.
    ``task_id``: the client's id of the op's task (device workers publish layer-wise progress under it).
    ``task_ids``: a batched op (several tasks' H2D or D2H in one, ``scheduler/batch.py``): every task's
    id, in block order (``task_id`` is the first); empty for an op of one task."""

    op_id: int
    op_type: int
    task_id: int = -1
    task_ids: list[int] = []
    layer_major: bool = False  # H2D of a layer-wise launch: copy (and publish) layer by layer


class HelloAcceptedMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    """The server counts the worker as running (its rank registered); ops may follow."""


class StopWorkerMsg(ServerToWorker, frozen=True, tag=True, kw_only=True):
    """Stop now. Also the answer to a hello whose credential was refused (``reason`` says so)."""

    reason: str = ""


ServerToWorkerMsg = ExecuteOpMsg | HelloAcceptedMsg | StopWorkerMsg
