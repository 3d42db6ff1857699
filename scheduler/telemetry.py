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
from flexkv.scheduler.sessions import session_of, task_of
from flexkv.types import KVResponse, OpType, TaskStatus, TaskType

if TYPE_CHECKING:
    from flexkv.scheduler.graph import TransferOp
    from flexkv.scheduler.read_rates import ReadRates
    from flexkv.scheduler.supervisor import WorkerHandle
    from flexkv.scheduler.trace import TraceWriter

TaskKey = tuple[int, int]
# Seconds from dispatch to completion of one op, as the server sees it (0.5 ms .. 10 s).
OP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REMOTE_OPS = (OpType.REMOTE2H, OpType.H2REMOTE)
_ENGINE_OPS = (OpType.H2D, OpType.D2H)
_GET, _H2D, _D2H = TaskType.GET, OpType.H2D, OpType.D2H  # module globals: cheaper than enum lookups per call


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


# An op in flight: [op type, dispatched at, bytes reported, task key, blocks, longest worker queue time].
_OpRecord = list[Any]


@dataclasses.dataclass(slots=True)
class _TaskRecord:
    """What the trace line of one task needs (kept only while the trace is on)."""

    task_type: TaskType
    started: float  # the match request arrived
    matched: float
    num_tokens: int
    matched_tokens: int
    launched: float = 0.0
    engine_done: float = 0.0
    waited: float = 0.0  # first wait that covered this task arrived
    ops: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Telemetry:
    """Counters, histograms and in-flight records of one server. Server thread only.

    The hooks run per message or per op: they only bump dicts keyed by enums and types (names are
    made at snapshot time) and keep per-task timings only while the trace is on."""

    def __init__(self, tokens_per_block: int, trace: TraceWriter | None = None,
                 read_rates: ReadRates | None = None) -> None:
        self.trace = trace
        self.read_rates = read_rates  # fed by every successful read op (H2D, DISK2H, REMOTE2H)
        self.tokens_per_block = tokens_per_block
        self._requests: dict[tuple[type, bool], int] = {}
        self._tasks: dict[tuple[TaskType | None, TaskStatus], int] = {}
        self.tokens = dict.fromkeys(("get_query", "put_query", "loaded", "stored"), 0)  # matched: ControlPlane
        self._op_counts: dict[tuple[OpType, bool], int] = {}
        self._op_bytes = dict.fromkeys(OpType, 0)
        self._op_seconds = {op: Histogram() for op in OpType}
        self.worker_busy_s: dict[str, float] = {}
        self.worker_ops: dict[str, int] = {}  # ops each worker reported done (a batched op counts once)
        self.worker_restarts: dict[str, int] = {}
        self.clients = dict.fromkeys(("connects", "disconnects"), 0)
        self.remote_errors = 0
        self._ops: dict[int, _OpRecord] = {}
        self._kinds: dict[TaskKey, TaskType] = {}
        self._records: dict[TaskKey, _TaskRecord] = {}  # trace only
        self._restarts_seen: dict[str, tuple[int, int]] = {}  # worker id -> (id(handle), restarts)

    # -- requests and clients -------------------------------------------------------------------
    def on_request(self, msg_type: type, ok: bool) -> None:
        key = (msg_type, ok)
        self._requests[key] = self._requests.get(key, 0) + 1

    def on_connect(self) -> None:
        self.clients["connects"] += 1

    def on_disconnect(self) -> None:
        self.clients["disconnects"] += 1

    # -- tasks ----------------------------------------------------------------------------------
    def on_matched(self, key: TaskKey, task_type: TaskType, started: float, num_tokens: int,
                   mask: np.ndarray) -> None:
        """A match succeeded: ``mask`` marks the tokens to load (GET) or store (PUT); counted only for the
        trace (the matched total is the ControlPlane's ``get_moved_blocks``)."""
        self.tokens["get_query" if task_type is _GET else "put_query"] += num_tokens
        self._kinds[key] = task_type
        if self.trace is not None:
            moved = int(np.count_nonzero(mask))
            self._records[key] = _TaskRecord(task_type, started, time.monotonic(), num_tokens, moved)

    def on_launched(self, key: TaskKey) -> None:
        rec = self._records.get(key) if self.trace is not None else None
        if rec is not None and not rec.launched:
            rec.launched = time.monotonic()

    def on_wait(self, keys: list[TaskKey]) -> None:
        if self.trace is None:
            return
        now = time.monotonic()
        for key in keys:
            rec = self._records.get(key)
            if rec is not None and not rec.waited:
                rec.waited = now

    def on_final(self, key: TaskKey, engine: KVResponse, full: KVResponse, task_type: TaskType | None) -> None:
        """A task left the control plane (or failed before it got there; then ``task_type`` may say which)."""
        task_type = self._kinds.pop(key, task_type)
        counted = (task_type, full.status)
        self._tasks[counted] = self._tasks.get(counted, 0) + 1
        if self.trace is not None:
            kind = task_type.name.lower() if task_type is not None else "unknown"
            self.trace.write(_trace_line(key, kind, self._records.pop(key, None), engine, full))

    # -- ops ------------------------------------------------------------------------------------
    def on_dispatch(self, op: TransferOp) -> None:
        self._ops[op.op_id] = [op.op_type, time.monotonic(), 0, op.task_keys, op.src_block_ids.size, 0.0]

    def on_reported(self, msg: OpsDoneMsg) -> None:
        """A worker's completions, with its figures (bytes per op summed over TP ranks)."""
        if msg.busy_s:
            self.worker_busy_s[msg.worker_id] = self.worker_busy_s.get(msg.worker_id, 0.0) + msg.busy_s
        self.worker_ops[msg.worker_id] = self.worker_ops.get(msg.worker_id, 0) + len(msg.op_ids)
        if len(msg.num_bytes) != len(msg.op_ids):
            return
        ops = self._ops
        for op_id, nbytes in zip(msg.op_ids, msg.num_bytes):  # noqa: B905 - lengths checked above
            rec = ops.get(op_id)
            if rec is not None:
                rec[2] += nbytes
        if self.trace is not None and len(msg.queue_s) == len(msg.op_ids):
            for op_id, queue_s in zip(msg.op_ids, msg.queue_s, strict=True):
                rec = ops.get(op_id)
                if rec is not None:
                    rec[5] = max(rec[5], queue_s)

    def on_op_done(self, op_id: int, error: str) -> None:
        rec = self._ops.pop(op_id, None)
        if rec is None:
            return
        op_type, dispatched, num_bytes = rec[0], rec[1], rec[2]
        now = time.monotonic()
        counted = (op_type, not error)
        self._op_counts[counted] = self._op_counts.get(counted, 0) + 1
        self._op_bytes[op_type] += num_bytes
        self._op_seconds[op_type].observe(now - dispatched)
        if not error and self.read_rates is not None:
            self.read_rates.observe(op_type, rec[4], now - dispatched)
        if error:
            if op_type in _REMOTE_OPS:
                self.remote_errors += 1
        elif op_type is _H2D:  # the blocks reached the engine (all TP ranks)
            self.tokens["loaded"] += rec[4] * self.tokens_per_block
        elif op_type is _D2H:
            self.tokens["stored"] += rec[4] * self.tokens_per_block
        if self.trace is not None:
            self._trace_op(rec, now, error)

    def _trace_op(self, rec: _OpRecord, now: float, error: str) -> None:
        op_type, dispatched, num_bytes, task_keys, num_blocks, queue_s = rec
        for task_key in task_keys:  # a batched op is in the trace line of each of its tasks
            task = self._records.get(task_key)
            if task is None:
                continue
            if op_type in _ENGINE_OPS:
                task.engine_done = now
            task.ops.append({"op": op_type.name, "blocks": int(num_blocks), "bytes": num_bytes,
                             "dispatch_s": _since(task.launched, dispatched), "queue_s": queue_s,
                             "seconds": now - dispatched, "error": error, "batch_tasks": len(task_keys)})

    # -- workers --------------------------------------------------------------------------------
    def on_tick(self, workers: dict[str, WorkerHandle]) -> None:
        """Count restarts since the last tick (a replaced worker's handle starts again at 0)."""
        for worker_id, handle in workers.items():
            ident, seen = self._restarts_seen.get(worker_id, (id(handle), 0))
            if ident != id(handle):
                seen = 0
            if handle.restarts > seen:
                self.worker_restarts[worker_id] = self.worker_restarts.get(worker_id, 0) + handle.restarts - seen
            self._restarts_seen[worker_id] = (id(handle), handle.restarts)

    def to_dict(self) -> dict[str, Any]:
        """The counters with names for keys: ``"<type>|<ok|error>"``, ``"<get|put|unknown>|<status>"``, op names."""
        requests = {f"{REQUEST_NAMES.get(t, t.__name__)}|{'ok' if ok else 'error'}": n
                    for (t, ok), n in self._requests.items()}
        tasks = {f"{t.name.lower() if t is not None else 'unknown'}|{st.name.lower()}": n
                 for (t, st), n in self._tasks.items()}
        op_counts = {f"{op.name}|{'ok' if ok else 'error'}": n for (op, ok), n in self._op_counts.items()}
        return {"requests": requests, "tasks": tasks, "tokens": dict(self.tokens), "op_counts": op_counts,
                "op_bytes": {op.name: n for op, n in self._op_bytes.items()},
                "op_seconds": {op.name: h.to_dict() for op, h in self._op_seconds.items()},
                "worker_busy_s": dict(self.worker_busy_s), "worker_ops": dict(self.worker_ops),
                "worker_restarts": dict(self.worker_restarts),
                "clients": dict(self.clients), "remote_errors": self.remote_errors}


def _since(start: float, t: float) -> float:
    return t - start if start else 0.0


def _trace_line(key: TaskKey, kind: str, rec: _TaskRecord | None, engine: KVResponse,
                full: KVResponse) -> dict[str, Any]:
    now = time.monotonic()
    line: dict[str, Any] = {"ts": time.time(), "client_id": key[0], "session_id": session_of(key),
                            "task_id": task_of(key), "type": kind,
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
                                   cm.GetMatchInfoMsg: "get_match_info", cm.GetMatchLaunchMsg: "get_match_launch",
                                   cm.GetAsyncMsg: "get_async", cm.PutAsyncMsg: "put_async",
                                   cm.GetAsyncBatchMsg: "get_async_many", cm.PutAsyncBatchMsg: "put_async_many",
                                   cm.LaunchMsg: "launch",
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
    counters = telemetry.to_dict()
    counters["tokens"]["matched"] = stats.get("get_moved_blocks", 0) * tokens_per_block
    rates = telemetry.read_rates
    return {"read_rates": rates.stats() if rates is not None else {},
            "block_bytes": block_bytes, "tokens_per_block": tokens_per_block, "tiers": tiers,
            "get_query_blocks": stats.get("get_query_blocks", 0), "get_hit_blocks": stats.get("get_hit_blocks", 0),
            "num_tasks": stats.get("num_tasks", 0), "num_ops_in_flight": stats.get("num_ops_in_flight", 0),
            "checksum_failures": {"ssd": stats.get("ssd_checksum_failures", 0),
                                  "remote": stats.get("remote_checksum_failures", 0)},
            "remote_outages": stats.get("remote_outages", 0),
            "clients": clients, "workers": worker_info, "counters": counters}
