"""Worker processes: spawn, route ops to them, collect completions, notice deaths and restart.

Runs inside the server process, on the server's one thread. A worker is a child process started with
``python -m flexkv.workers.main <spec>``; it connects a DEALER socket (identity = worker id) to the
server's worker ROUTER and announces the op types it serves. A GPU-side op (H2D/D2H) fans out to every
TP rank of the task's DP client and completes when all of them report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from flexkv.protocol.codec import SERVER_TO_WORKER
from flexkv.protocol.worker_msgs import ExecuteOpMsg, StopWorkerMsg
from flexkv.scheduler.graph import TransferOp
from flexkv.types import OpType

log = logging.getLogger("flexkv.server")

MAX_RESTARTS = 3
OpResult = tuple[int, str]  # (op_id, error or "")


@dataclasses.dataclass
class WorkerHandle:
    worker_id: str
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    op_types: frozenset[int] = frozenset()
    backlog: list[TransferOp] = dataclasses.field(default_factory=list)
    in_flight: set[int] = dataclasses.field(default_factory=set)  # op ids sent, not yet reported
    restarts: int = 0
    on_ready: list[Callable[[], None]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Fanout:
    remaining: set[str]
    error: str = ""


def device_worker_id(dp_client_id: int, tp_rank: int) -> str:
    return f"device-{dp_client_id}-{tp_rank}"


class WorkerSupervisor:
    """Owns the worker processes and the op -> worker routing. Not thread-safe (server thread only)."""

    def __init__(self, sock: zmq.Socket[bytes], base_spec: dict[str, Any], tp_size: int, use_mla: bool) -> None:
        self._sock = sock
        self._base_spec = base_spec
        self._tp_size = tp_size
        self._use_mla = use_mla
        self.workers: dict[str, WorkerHandle] = {}
        self._fanouts: dict[int, _Fanout] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def spawn(self, worker_id: str, spec: dict[str, Any]) -> WorkerHandle:
        """Start (or replace) worker ``worker_id``. Ops for it queue until it says hello."""
        old = self.workers.get(worker_id)
        if old is not None:
            self._stop_one(old, "replaced")
        handle = WorkerHandle(worker_id=worker_id, spec={**self._base_spec, **spec, "worker_id": worker_id})
        self.workers[worker_id] = handle
        self._start_process(handle)
        return handle

    def _start_process(self, handle: WorkerHandle) -> None:
        handle.ready = False
        cmd = [sys.executable, "-m", "flexkv.workers.main", json.dumps(handle.spec)]
        handle.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=False)
        log.info("started worker %s (pid %d)", handle.worker_id, handle.proc.pid)

    def on_hello(self, worker_id: str, op_types: list[int]) -> None:
        handle = self.workers.get(worker_id)
        if handle is None:
            log.warning("hello from unknown worker %r ignored", worker_id)
            return
        handle.ready = True
        handle.op_types = frozenset(op_types)
        backlog, handle.backlog = handle.backlog, []
        for op in backlog:
            self._send(handle, op)
        callbacks, handle.on_ready = handle.on_ready, []
        for cb in callbacks:
            cb()

    def remove(self, worker_id: str, reason: str) -> list[OpResult]:
        """Stop a worker for good; its in-flight and queued ops fail."""
        handle = self.workers.pop(worker_id, None)
        if handle is None:
            return []
        self._stop_one(handle, reason)
        return self._fail_worker_ops(handle, f"worker {worker_id} stopped: {reason}")

    def stop_all(self, timeout_s: float = 5.0) -> None:
        for handle in self.workers.values():
            if handle.ready:
                self._sock.send_multipart([handle.worker_id.encode(), *SERVER_TO_WORKER.encode(StopWorkerMsg())])
        deadline = time.monotonic() + timeout_s
        for handle in self.workers.values():
            if handle.proc is not None:
                _reap(handle.proc, max(0.1, deadline - time.monotonic()))
        self.workers.clear()

    def _stop_one(self, handle: WorkerHandle, reason: str) -> None:
        if handle.proc is not None and handle.proc.poll() is None:
            if handle.ready:
                msg = SERVER_TO_WORKER.encode(StopWorkerMsg(reason=reason))
                self._sock.send_multipart([handle.worker_id.encode(), *msg])
            _reap(handle.proc, 2.0)

    def check_liveness(self) -> list[OpResult]:
        """Notice dead workers: fail their ops and restart them (a few times)."""
        failed: list[OpResult] = []
        for handle in list(self.workers.values()):
            if handle.proc is None or handle.proc.poll() is None:
                continue
            code = handle.proc.returncode
            failed += self._fail_worker_ops(handle, f"worker {handle.worker_id} died (exit code {code})")
            if handle.restarts >= MAX_RESTARTS:
                log.error("worker %s died (exit %s) %d times; not restarting", handle.worker_id, code, handle.restarts)
                del self.workers[handle.worker_id]
                continue
            handle.restarts += 1
            log.warning("worker %s died (exit code %s); restarting (%d/%d)", handle.worker_id, code,
                        handle.restarts, MAX_RESTARTS)
            self._start_process(handle)
        return failed

    def _fail_worker_ops(self, handle: WorkerHandle, error: str) -> list[OpResult]:
        ids = list(handle.in_flight) + [op.op_id for op in handle.backlog]
        handle.in_flight.clear()
        handle.backlog.clear()
        return self._part_results(handle.worker_id, ids, [error] * len(ids))

    # -- ops ------------------------------------------------------------------------------------
    def targets(self, op: TransferOp) -> list[str]:
        if op.op_type in (OpType.H2D, OpType.D2H):
            client_id = op.task_key[0]
            ranks = [0] if (op.op_type is OpType.D2H and self._use_mla) else range(self._tp_size)
            return [device_worker_id(client_id, r) for r in ranks]
        return [h.worker_id for h in self.workers.values() if int(op.op_type) in h.spec.get("op_types", [])][:1]

    def dispatch(self, op: TransferOp) -> OpResult | None:
        """Send ``op`` to its worker(s). Returns an immediate failure if nobody can run it."""
        targets = self.targets(op)
        missing = [t for t in targets if t not in self.workers]
        if not targets or missing:
            what = ", ".join(missing) if missing else f"a {op.op_type.name} worker"
            return op.op_id, f"no worker for {op.op_type.name}: {what} not registered"
        self._fanouts[op.op_id] = _Fanout(remaining=set(targets))
        for worker_id in targets:
            handle = self.workers[worker_id]
            if handle.ready:
                self._send(handle, op)
            else:
                handle.backlog.append(op)
        return None

    def _send(self, handle: WorkerHandle, op: TransferOp) -> None:
        arrays: list[Any] = [op.src_block_ids, op.dst_block_ids]
        if op.block_hashes is not None:
            arrays.append(op.block_hashes)
        msg = ExecuteOpMsg(op_id=op.op_id, op_type=int(op.op_type), task_id=op.task_key[1])
        frames = SERVER_TO_WORKER.encode(msg, arrays)
        self._sock.send_multipart([handle.worker_id.encode(), *frames], copy=False)
        handle.in_flight.add(op.op_id)

    def on_done(self, worker_id: str, op_ids: list[int], errors: list[str]) -> list[OpResult]:
        handle = self.workers.get(worker_id)
        if handle is not None:
            handle.in_flight.difference_update(op_ids)
        return self._part_results(worker_id, op_ids, errors)

    def _part_results(self, worker_id: str, op_ids: list[int], errors: list[str]) -> list[OpResult]:
        done: list[OpResult] = []
        for op_id, error in zip(op_ids, errors, strict=True):
            fan = self._fanouts.get(op_id)
            if fan is None or worker_id not in fan.remaining:
                continue
            fan.remaining.discard(worker_id)
            if error and not fan.error:
                fan.error = error
            if not fan.remaining:
                del self._fanouts[op_id]
                done.append((op_id, fan.error))
        return done

    @property
    def num_in_flight(self) -> int:
        return len(self._fanouts)


def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
