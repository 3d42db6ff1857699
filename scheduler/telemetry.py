"""Telemetry: the server's operational figures, counted on the server thread and read as one snapshot.

The server loop calls the ``on_*`` hooks (a dict increment or two each; per op, not per token or block).
Workers' own figures (bytes moved, time queued, busy time) arrive inside ``OpsDoneMsg``. Everything an
operator sees (``flexkv stats``, the Prometheus metrics of ``flexkv.scheduler.metrics``) comes from
:func:`build_snapshot`, a plain JSON-able dict built on the server thread; nothing else reads this
state, so no locks. Server process only.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from flexkv.protocol import client_msgs as cm
from flexkv.protocol.worker_msgs import OpsDoneMsg
from flexkv.types import KVResponse, OpType, TaskStatus, TaskType

if TYPE_CHECKING:
    from flexkv.scheduler.graph import TransferOp
    from flexkv.scheduler.supervisor import WorkerHandle
    from flexkv.scheduler.trace import TraceWriter

TaskKey = tuple[int, int]
# Seconds from dispatch to completion of one op, as the server sees it (0.5 ms .. 10 s).
OP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REMOTE_OPS = (OpType.REMOTE2H, OpType.H2REMOTE)
_ENGINE_OPS = (OpType.H2D, OpType.D2H)


class Histogram:
    """Counts per upper bound (``le``, cumulative when exported), plus +Inf, sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = OP_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": self.count}


@dataclasses.dataclass(slots=True)
class _OpRecord:
    op_type: OpType
    task_key: TaskKey
    num_blocks: int
    dispatched: float
    num_bytes: int = 0
    queue_s: float = 0.0


@dataclasses.dataclass(slots=True)
class _TaskRecord:
    task_type: TaskType
    started: float  # the match request arrived
    matched: float
    num_tokens: int
    matched_tokens: int
    launched: float = 0.0
    engine_done: float = 0.0
    waited: float = 0.0  # first wait that covered this task arrived
    ops: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _count(table: dict[str, int], key: str, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


class Telemetry:
    """Counters, histograms and in-flight records of one server. Server thread only."""

    def __init__(self, trace: TraceWriter | None = None) -> None:
        self.trace = trace
        self.requests: dict[str, int] = {}  # "<message type>|ok" or "|error"
        self.tasks: dict[str, int] = {}  # "<get|put|unknown>|<status>"
        self.tokens = dict.fromkeys(("get_query", "put_query", "matched", "loaded", "stored"), 0)
        self.op_counts: dict[str, int] = {}  # "<op>|ok" / "<op>|error"
        self.op_bytes: dict[str, int] = {}
        self.op_seconds: dict[str, Histogram] = {}
        self.worker_busy_s: dict[str, float] = {}
        self.worker_restarts: dict[str, int] = {}
        self.clients = dict.fromkeys(("connects", "disconnects"), 0)
        self.remote_errors = 0
        self._ops: dict[int, _OpRecord] = {}
        self._tasks: dict[TaskKey, _TaskRecord] = {}
        self._restarts_seen: dict[str, tuple[int, int]] = {}  # worker id -> (id(handle), restarts)

    # -- requests and clients -------------------------------------------------------------------
    def on_request(self, msg_type: type, ok: bool) -> None:
        _count(self.requests, f"{REQUEST_NAMES.get(msg_type, msg_type.__name__)}|{'ok' if ok else 'error'}")

    def on_connect(self) -> None:
        self.clients["connects"] += 1

    def on_disconnect(self) -> None:
        self.clients["disconnects"] += 1

    # -- tasks ----------------------------------------------------------------------------------
    def on_matched(self, key: TaskKey, task_type: TaskType, started: float, num_tokens: int,
                   mask: np.ndarray) -> None:
        """A match succeeded: ``mask`` marks the tokens to load (GET) or store (PUT)."""
        moved = int(np.count_nonzero(mask))
        if task_type is TaskType.GET:
            self.tokens["get_query"] += num_tokens
            self.tokens["matched"] += moved
        else:
            self.tokens["put_query"] += num_tokens
        self._tasks[key] = _TaskRecord(task_type, started, time.monotonic(), num_tokens, moved)

    def on_launched(self, key: TaskKey) -> None:
        rec = self._tasks.get(key)
        if rec is not None and not rec.launched:
            rec.launched = time.monotonic()

    def on_wait(self, client_id: int, task_ids: list[int]) -> None:
        if self.trace is None:
            return
        now = time.monotonic()
        for tid in task_ids:
            rec = self._tasks.get((client_id, tid))
            if rec is not None and not rec.waited:
                rec.waited = now

    def on_final(self, key: TaskKey, engine: KVResponse, full: KVResponse, task_type: TaskType | None) -> None:
        """A task left the control plane (or failed before it got there)."""
        rec = self._tasks.pop(key, None)
        if rec is not None:
            task_type = rec.task_type
        kind = task_type.name.lower() if task_type is not None else "unknown"
        _count(self.tasks, f"{kind}|{full.status.name.lower()}")
        if engine.status is TaskStatus.SUCCESS and engine.return_mask is not None:
            moved = int(np.count_nonzero(engine.return_mask))
            self.tokens["loaded" if task_type is TaskType.GET else "stored"] += moved
        if self.trace is not None:
            self.trace.write(_trace_line(key, kind, rec, engine, full))

    # -- ops ------------------------------------------------------------------------------------
    def on_dispatch(self, op: TransferOp) -> None:
        self._ops[op.op_id] = _OpRecord(op.op_type, op.task_key, int(op.src_block_ids.size), time.monotonic())

    def on_reported(self, msg: OpsDoneMsg) -> None:
        """A worker's completions, with its figures (bytes per op summed over TP ranks)."""
        if msg.busy_s:
            self.worker_busy_s[msg.worker_id] = self.worker_busy_s.get(msg.worker_id, 0.0) + msg.busy_s
        if len(msg.num_bytes) != len(msg.op_ids):
            return
        queue = msg.queue_s if len(msg.queue_s) == len(msg.op_ids) else [0.0] * len(msg.op_ids)
        for op_id, nbytes, queue_s in zip(msg.op_ids, msg.num_bytes, queue, strict=True):
            rec = self._ops.get(op_id)
            if rec is not None:
                rec.num_bytes += nbytes
                rec.queue_s = max(rec.queue_s, queue_s)

    def on_op_done(self, op_id: int, error: str) -> None:
        rec = self._ops.pop(op_id, None)
        if rec is None:
            return
        now = time.monotonic()
        name = rec.op_type.name
        _count(self.op_counts, f"{name}|{'error' if error else 'ok'}")
        _count(self.op_bytes, name, rec.num_bytes)
        seconds = now - rec.dispatched
        hist = self.op_seconds.get(name)
        if hist is None:
            hist = self.op_seconds[name] = Histogram()
        hist.observe(seconds)
        if error and rec.op_type in _REMOTE_OPS:
            self.remote_errors += 1
        task = self._tasks.get(rec.task_key)
        if task is not None:
            if rec.op_type in _ENGINE_OPS:
                task.engine_done = now
            if self.trace is not None:
                task.ops.append({"op": name, "blocks": rec.num_blocks, "bytes": rec.num_bytes,
                                 "dispatch_s": _since(task.launched, rec.dispatched), "queue_s": rec.queue_s,
                                 "seconds": seconds, "error": error})

    # -- workers --------------------------------------------------------------------------------
    def on_tick(self, workers: dict[str, WorkerHandle]) -> None:
        """Count restarts since the last tick (a replaced worker's handle starts again at 0)."""
        for worker_id, handle in workers.items():
            ident, seen = self._restarts_seen.get(worker_id, (id(handle), 0))
            if ident != id(handle):
                seen = 0
            if handle.restarts > seen:
                _count(self.worker_restarts, worker_id, handle.restarts - seen)  # type: ignore[arg-type]
            self._restarts_seen[worker_id] = (id(handle), handle.restarts)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "tasks": dict(self.tasks), "tokens": dict(self.tokens),
                "op_counts": dict(self.op_counts), "op_bytes": dict(self.op_bytes),
                "op_seconds": {k: h.to_dict() for k, h in self.op_seconds.items()},
                "worker_busy_s": dict(self.worker_busy_s), "worker_restarts": dict(self.worker_restarts),
                "clients": dict(self.clients), "remote_errors": self.remote_errors}


def _since(start: float, t: float) -> float:
    return t - start if start else 0.0


def _trace_line(key: TaskKey, kind: str, rec: _TaskRecord | None, engine: KVResponse,
                full: KVResponse) -> dict[str, Any]:
    now = time.monotonic()
    line: dict[str, Any] = {"ts": time.time(), "client_id": key[0], "task_id": key[1], "type": kind,
                            "status": full.status.name, "engine_status": engine.status.name, "error": full.error}
    if rec is None:
        return line
    launched = rec.launched or now
    line.update({
        "num_tokens": rec.num_tokens, "matched_tokens": rec.matched_tokens,
        "match_s": rec.matched - rec.started,  # the control plane's match (hashing, index walk, reservations)
        "launch_wait_s": max(0.0, launched - rec.matched),  # matched, waiting for the engine's launch
        "queue_s": sum(op["queue_s"] for op in rec.ops),  # its ops waited in workers' queues
        "ops": rec.ops,
        "engine_s": (rec.engine_done - launched) if rec.engine_done else 0.0,  # launch to the GPU-side op done
        "total_s": now - rec.started,
        "wait_s": (max(rec.engine_done, rec.waited) - rec.waited) if rec.waited else None,  # a wait blocked
    })
    return line


REQUEST_NAMES: dict[type, str] = {cm.HelloMsg: "hello", cm.GetMatchMsg: "get_match", cm.PutMatchMsg: "put_match",
                                   cm.GetAsyncMsg: "get_async", cm.PutAsyncMsg: "put_async", cm.LaunchMsg: "launch",
                                   cm.CancelMsg: "cancel", cm.WaitMsg: "wait", cm.RegisterKVMsg: "register",
                                   cm.QueryMsg: "query"}


def build_snapshot(stats: dict[str, Any], telemetry: Telemetry, workers: dict[str, WorkerHandle],
                   clients: dict[str, int], block_bytes: int, tokens_per_block: int) -> dict[str, Any]:
    """Everything an operator reads, as one JSON-able dict (``flexkv stats --json`` prints it).

    ``stats`` is ``ControlPlane.stats()`` (plus keys other parts add, e.g. ``ssd_checksum_failures``);
    ``clients`` counts live connections by role."""
    tiers = {}
    for tier in ("cpu", "ssd", "remote"):
        if f"{tier}_free_blocks" in stats:
            tiers[tier] = {"used_blocks": stats[f"{tier}_used_blocks"], "free_blocks": stats[f"{tier}_free_blocks"],
                           "evicted_blocks": stats[f"{tier}_evicted_blocks"],
                           "hit_blocks": stats.get(f"get_hit_blocks_{tier}", 0)}
    worker_info = {wid: {"pid": h.proc.pid if h.proc is not None else -1, "ready": h.ready,
                         "queue_depth": len(h.in_flight) + len(h.backlog), "restarts": h.restarts}
                   for wid, h in workers.items()}
    return {"block_bytes": block_bytes, "tokens_per_block": tokens_per_block, "tiers": tiers,
            "get_query_blocks": stats.get("get_query_blocks", 0), "get_hit_blocks": stats.get("get_hit_blocks", 0),
            "num_tasks": stats.get("num_tasks", 0), "num_ops_in_flight": stats.get("num_ops_in_flight", 0),
            "checksum_failures": {"ssd": stats.get("ssd_checksum_failures", 0),
                                  "remote": stats.get("remote_checksum_failures", 0)},
            "remote_outages": stats.get("remote_outages", 0),
            "clients": clients, "workers": worker_info, "counters": telemetry.to_dict()}
