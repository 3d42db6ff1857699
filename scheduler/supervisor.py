"""Workers: spawn, authenticate, route ops to them, collect completions, notice deaths and restart.

Runs inside the server process, on the server's one thread. A worker is a child process started with
``python -m flexkv.workers.main <spec>`` (its credential on stdin), or an engine-side lane: the same
worker code as a thread of the engine process, announced by a registration (DESIGN §7b). Each of a
worker's sockets says hello with its credential first; the ROUTER's own name for that connection is
then bound to the worker (and lane), and only those connections can complete the worker's ops (DESIGN
§7, trust). A GPU-side op (H2D/D2H) fans out to every TP rank of the task's DP client and completes when
each of them reported it once.

Restarts: a spawned worker that dies is restarted after a backoff that doubles with each death in the
restart window; once it died more than ``max_restarts`` times in the window it is *down*: ops for it
fail at once with the reason, the server reports not ready, and one more start is tried when the
window has passed (a re-registration starts it at once, with a fresh budget).
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from flexkv.protocol.codec import SERVER_TO_WORKER
from flexkv.protocol.worker_msgs import ExecuteOpMsg, HelloAcceptedMsg, StopWorkerMsg, WorkerHelloMsg
from flexkv.scheduler.graph import TransferOp
from flexkv.scheduler.sessions import task_of
from flexkv.types import ConfigError, OpType

log = logging.getLogger("flexkv.server")

OpResult = tuple[int, str]  # (op_id, error or "")


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` restarts of one worker per ``window_s``; the n-th death in the window
    waits ``min(backoff_max_s, backoff_s * 2**(n-1))`` before its restart."""

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0

    @classmethod
    def from_env(cls) -> RestartPolicy:
        """FLEXKV_WORKER_RESTARTS (per window) and FLEXKV_WORKER_RESTART_WINDOW_S, else the defaults."""
        try:
            policy = cls(max_restarts=int(os.environ.get("FLEXKV_WORKER_RESTARTS", cls.max_restarts)),
                         window_s=float(os.environ.get("FLEXKV_WORKER_RESTART_WINDOW_S", cls.window_s)))
        except ValueError as e:
            raise ConfigError(f"FLEXKV_WORKER_RESTARTS / FLEXKV_WORKER_RESTART_WINDOW_S: {e}") from None
        if policy.max_restarts < 0 or not policy.window_s > 0:
            raise ConfigError(f"FLEXKV_WORKER_RESTARTS must be >= 0 and FLEXKV_WORKER_RESTART_WINDOW_S > 0, got "
                              f"{policy.max_restarts} and {policy.window_s}")
        return policy

    def backoff(self, num_deaths: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, num_deaths - 1)))


@dataclasses.dataclass
class WorkerHandle:
    worker_id: str
    spec: dict[str, Any]
    engine_side: bool = False  # a lane inside the engine process: never spawned, never restarted
    proc: subprocess.Popen[bytes] | None = None
    pid: int = -1  # of the process that said hello
    credential: str = ""
    routing_id: bytes | None = None  # the ROUTER's name of the worker's main socket, once it said hello
    ready: bool = False
    op_types: frozenset[int] = frozenset()
    backlog: list[TransferOp] = dataclasses.field(default_factory=list)
    in_flight: set[int] = dataclasses.field(default_factory=set)  # op ids sent, not yet reported
    deaths: collections.deque[float] = dataclasses.field(default_factory=collections.deque)  # in the window
    restart_at: float | None = None  # when a dead worker is started again
    restarts: int = 0  # restarts over the handle's life (metrics)
    down_reason: str = ""  # set while the restart budget is spent
    last_exit: str = ""
    on_ready: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    # Called (with the reason) if the worker dies before its first hello; it is then removed, not restarted.
    on_start_failed: list[Callable[[str], None]] = dataclasses.field(default_factory=list)
    ever_ready: bool = False


@dataclasses.dataclass
class _Fanout:
    remaining: set[str]
    error: str = ""
    layer_major: bool = False  # sent as ExecuteOpMsg.layer_major


_REGISTER_HINT = ("; register the engine's KV buffers first: KVManager.register_kv_buffers(kv_tensors, layout) "
                  "in a single-process engine, or KVTPClient(server_address, dp_client_id, tp_rank, "
                  "device_id).register(kv_tensors, layout) in each TP rank")


def device_worker_id(dp_client_id: int, tp_rank: int) -> str:
    return f"device-{dp_client_id}-{tp_rank}"


class WorkerSupervisor:
    """Owns the workers and the op -> worker routing. Not thread-safe (server thread only)."""

    def __init__(self, sock: zmq.Socket[bytes], base_spec: dict[str, Any], tp_size: int, use_mla: bool,
                 policy: RestartPolicy | None = None) -> None:
        self._sock = sock
        self._base_spec = base_spec
        self._tp_size = tp_size
        self._use_mla = use_mla
        self.policy = policy or RestartPolicy.from_env()
        self.workers: dict[str, WorkerHandle] = {}
        self._routes: dict[bytes, tuple[str, int]] = {}  # routing id -> (worker id, lane; -1 = main socket)
        self._fanouts: dict[int, _Fanout] = {}
        self.num_refused = 0  # messages dropped: bad credential or an unknown connection

    # -- lifecycle ------------------------------------------------------------------------------
    def spawn(self, worker_id: str, spec: dict[str, Any]) -> WorkerHandle:
        """Start (or replace) worker ``worker_id``. Ops for it queue until it says hello."""
        handle = self._new_handle(worker_id, spec, engine_side=False)
        self._start_process(handle)
        return handle

    def expect_lane(self, worker_id: str, spec: dict[str, Any]) -> WorkerHandle:
        """Announce (or replace) an engine-side lane: no process; the engine runs the worker with
        ``handle.credential`` and the lane spec (``lane_spec``). Ops for it queue until it says hello."""
        handle = self._new_handle(worker_id, spec, engine_side=True)
        handle.credential = secrets.token_hex(16)
        return handle

    def lane_spec(self, handle: WorkerHandle) -> dict[str, Any]:
        """What an engine-side lane needs to connect and run (sent in the registration reply)."""
        return {**handle.spec, "credential": handle.credential, "engine_side": True}

    def _new_handle(self, worker_id: str, spec: dict[str, Any], engine_side: bool) -> WorkerHandle:
        old = self.workers.get(worker_id)
        if old is not None:
            self._stop_one(old, "replaced")
            for cb in old.on_start_failed:  # its registrant waits for a reply
                cb(f"worker {worker_id} was replaced by a newer registration before it started")
        handle = WorkerHandle(worker_id=worker_id, spec={**self._base_spec, **spec, "worker_id": worker_id},
                              engine_side=engine_side)
        self.workers[worker_id] = handle
        return handle

    def _start_process(self, handle: WorkerHandle) -> None:
        self._forget_routes(handle)
        handle.ready = False
        handle.restart_at = None
        handle.credential = secrets.token_hex(16)  # a new one per process: no predecessor can speak for it
        cmd = [sys.executable, "-m", "flexkv.workers.main", json.dumps(handle.spec)]
        handle.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=False)
        assert handle.proc.stdin is not None
        try:
            handle.proc.stdin.write(handle.credential.encode() + b"\n")
            handle.proc.stdin.close()
        except BrokenPipeError:  # it died at once; check_liveness notices
            pass
        log.info("started worker %s (pid %d)", handle.worker_id, handle.proc.pid)

    def on_hello(self, routing_id: bytes, msg: WorkerHelloMsg) -> None:
        """Bind connection ``routing_id`` to the worker (or lane) it names if its credential is that
        worker's; refuse (logged, told to stop) otherwise."""
        handle = self.workers.get(msg.worker_id)
        if handle is None or not handle.credential or not hmac.compare_digest(msg.credential, handle.credential):
            why = "unknown worker" if handle is None else "wrong credential"
            self._refuse(routing_id, f"hello as {msg.worker_id!r} (lane {msg.lane}, pid {msg.pid}) refused: {why}")
            return
        self._routes[routing_id] = (handle.worker_id, msg.lane)
        if msg.lane >= 0:
            return
        handle.routing_id, handle.pid = routing_id, msg.pid
        handle.ready = handle.ever_ready = True
        handle.on_start_failed = []
        handle.down_reason = ""
        handle.op_types = frozenset(msg.op_types)
        backlog, handle.backlog = handle.backlog, []
        for op in backlog:
            self._send(handle, op)
        callbacks, handle.on_ready = handle.on_ready, []
        for cb in callbacks:
            cb()
        self._sock.send_multipart([routing_id, *SERVER_TO_WORKER.encode(HelloAcceptedMsg())])

    def worker_of(self, routing_id: bytes) -> str | None:
        """The worker a connection said hello for, or None (the caller drops its message)."""
        route = self._routes.get(routing_id)
        return route[0] if route is not None else None

    def refuse(self, routing_id: bytes, what: str) -> None:
        """Drop a message from a connection that is not (or no longer) a worker; logged, rate-limited."""
        self._refuse(routing_id, what, answer=False)

    def _refuse(self, routing_id: bytes, what: str, answer: bool = True) -> None:
        self.num_refused += 1
        if self.num_refused <= 20 or self.num_refused % 1000 == 0:
            log.warning("worker socket: %s (%d refused so far)", what, self.num_refused)
        if answer:
            msg = SERVER_TO_WORKER.encode(StopWorkerMsg(reason="hello refused: not a worker of this server"))
            self._sock.send_multipart([routing_id, *msg])

    def remove(self, worker_id: str, reason: str) -> list[OpResult]:
        """Stop a worker for good; its in-flight and queued ops fail."""
        handle = self.workers.pop(worker_id, None)
        if handle is None:
            return []
        self._stop_one(handle, reason)
        return self._fail_worker_ops(handle, f"worker {worker_id} stopped: {reason}")

    def on_bye(self, routing_id: bytes) -> str | None:
        """A worker's main socket says goodbye. An engine-side lane is then gone (returns its id: the
        caller removes it); a spawned worker's exit is handled by ``check_liveness``."""
        route = self._routes.get(routing_id)
        if route is None or route[1] >= 0:
            return None
        handle = self.workers.get(route[0])
        if handle is None or handle.routing_id != routing_id:
            return None
        handle.ready = False
        return handle.worker_id if handle.engine_side else None

    def stop_all(self, timeout_s: float = 5.0) -> None:
        for handle in self.workers.values():
            self._send_stop(handle, "server stopping")
        deadline = time.monotonic() + timeout_s
        for handle in self.workers.values():
            if handle.proc is not None:
                _reap(handle.proc, max(0.1, deadline - time.monotonic()))
        self.workers.clear()
        self._routes.clear()

    def _send_stop(self, handle: WorkerHandle, reason: str) -> None:
        if handle.ready and handle.routing_id is not None:
            msg = SERVER_TO_WORKER.encode(StopWorkerMsg(reason=reason))
            self._sock.send_multipart([handle.routing_id, *msg])

    def _stop_one(self, handle: WorkerHandle, reason: str) -> None:
        self._send_stop(handle, reason)
        if handle.proc is not None and handle.proc.poll() is None:
            _reap(handle.proc, 2.0)
        self._forget_routes(handle)

    def _forget_routes(self, handle: WorkerHandle) -> None:
        for rid in [r for r, (w, _) in self._routes.items() if w == handle.worker_id]:
            del self._routes[rid]
        handle.routing_id = None

    def check_liveness(self) -> tuple[list[OpResult], list[str]]:
        """Notice dead workers: fail their ops; restart spawned ones within the budget. Returns the
        failed ops and the engine-side lanes whose process is gone (the caller removes them)."""
        failed: list[OpResult] = []
        gone: list[str] = []
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.engine_side:
                if handle.ready and handle.pid > 0 and not pid_alive(handle.pid):
                    gone.append(handle.worker_id)
                continue
            if handle.proc is not None and handle.proc.poll() is not None:
                failed += self._on_death(handle, now)
            if handle.proc is None and handle.restart_at is not None and now >= handle.restart_at:
                handle.restarts += 1
                self._start_process(handle)
        return failed, gone

    def _on_death(self, handle: WorkerHandle, now: float) -> list[OpResult]:
        assert handle.proc is not None
        code = handle.proc.returncode
        handle.proc, handle.ready = None, False
        self._forget_routes(handle)
        handle.last_exit = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        failed = self._fail_worker_ops(handle, f"worker {handle.worker_id} died ({handle.last_exit})")
        if not handle.ever_ready and handle.on_start_failed:  # e.g. a registration it cannot open
            log.error("worker %s could not start (%s); not restarting it", handle.worker_id, handle.last_exit)
            del self.workers[handle.worker_id]
            for cb in handle.on_start_failed:
                cb(f"worker {handle.worker_id} could not start ({handle.last_exit}; the server log says why)")
            return failed
        handle.deaths.append(now)
        while handle.deaths and handle.deaths[0] < now - self.policy.window_s:
            handle.deaths.popleft()
        n = len(handle.deaths)
        if n > self.policy.max_restarts:
            handle.down_reason = (f"{handle.worker_id} is down: died {n} times in {self.policy.window_s:g} s "
                                  f"(last: {handle.last_exit}); next start in {self.policy.window_s:g} s")
            handle.restart_at = now + self.policy.window_s
            handle.deaths.clear()
            log.error("%s", handle.down_reason)
        else:
            delay = self.policy.backoff(n)
            handle.restart_at = now + delay
            log.warning("worker %s died (%s); restarting in %.1f s (%d/%d in %g s)", handle.worker_id,
                        handle.last_exit, delay, n, self.policy.max_restarts, self.policy.window_s)
        return failed

    def _fail_worker_ops(self, handle: WorkerHandle, error: str) -> list[OpResult]:
        ids = list(handle.in_flight) + [op.op_id for op in handle.backlog]
        handle.in_flight.clear()
        handle.backlog.clear()
        return self._part_results(handle.worker_id, ids, [error] * len(ids))

    def down(self) -> dict[str, str]:
        """Workers whose restart budget is spent, with the reason."""
        return {w: h.down_reason for w, h in self.workers.items() if h.down_reason}

    # -- ops ------------------------------------------------------------------------------------
    def targets(self, op: TransferOp) -> list[str]:
        if op.op_type in (OpType.H2D, OpType.D2H):
            client_id = op.task_key[0]
            ranks = [0] if (op.op_type is OpType.D2H and self._use_mla) else range(self._tp_size)
            return [device_worker_id(client_id, r) for r in ranks]
        return [h.worker_id for h in self.workers.values() if int(op.op_type) in h.spec.get("op_types", [])][:1]

    def publishes_landing(self, op: TransferOp) -> bool:
        """Whether every rank ``op`` goes to writes its landing into the engine's progress table (the rank
        registered with ``layerwise=True``; flexkv.layerwise)."""
        targets = self.targets(op)
        return bool(targets) and all(t in self.workers and self.workers[t].spec.get("registration", {})
                                     .get("layer_progress") for t in targets)

    def dispatch(self, op: TransferOp, layer_major: bool = False) -> OpResult | None:
        """Send ``op`` to its worker(s) (``layer_major``: an H2D to copy layer by layer). Returns an immediate
        failure if nobody can run it."""
        targets = self.targets(op)
        missing = [t for t in targets if t not in self.workers]
        if not targets or missing:
            what = ", ".join(missing) if missing else f"a {op.op_type.name} worker"
            error = f"no worker for {op.op_type.name}: {what} not registered"
            if op.op_type in (OpType.H2D, OpType.D2H):
                error += _REGISTER_HINT
            return op.op_id, error
        down = [self.workers[t].down_reason for t in targets if self.workers[t].down_reason]
        if down:
            return op.op_id, down[0]
        self._fanouts[op.op_id] = _Fanout(remaining=set(targets), layer_major=layer_major)
        for worker_id in targets:
            handle = self.workers[worker_id]
            if handle.ready:
                self._send(handle, op)
            else:
                handle.backlog.append(op)
        return None

    def _send(self, handle: WorkerHandle, op: TransferOp) -> None:
        assert handle.routing_id is not None
        arrays: list[Any] = [op.src_block_ids, op.dst_block_ids]
        if op.block_hashes is not None:
            arrays.append(op.block_hashes)
        # The engine's own task id (its session's part of the key): a layer-wise GET's progress slot.
        fan = self._fanouts.get(op.op_id)
        msg = ExecuteOpMsg(op_id=op.op_id, op_type=int(op.op_type), task_id=task_of(op.task_key),
                           task_ids=[task_of(m.task_key) for m in op.members],
                           layer_major=fan is not None and fan.layer_major)
        frames = SERVER_TO_WORKER.encode(msg, arrays)
        self._sock.send_multipart([handle.routing_id, *frames], copy=False)
        handle.in_flight.add(op.op_id)

    def on_done(self, worker_id: str, op_ids: list[int], errors: list[str]) -> list[OpResult]:
        """Completions reported by ``worker_id`` (from ``worker_of``). Only ops in flight on that worker
        count, each once: anything else is ignored."""
        handle = self.workers.get(worker_id)
        if handle is None:
            return []
        sent = [(op_id, err) for op_id, err in zip(op_ids, errors, strict=True) if op_id in handle.in_flight]
        handle.in_flight.difference_update(op_id for op_id, _ in sent)
        return self._part_results(worker_id, [op_id for op_id, _ in sent], [err for _, err in sent])

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


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
