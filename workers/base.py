"""Worker process base: connect, announce, receive ops, batch them, execute, report per op.

A worker never decides policy: it runs exactly the ops the server sends and reports each one's
success or a typed failure message. Subclasses implement ``op_types`` and ``execute``.

Lanes: a worker whose ``num_lanes`` is above 1 runs each lane (``lane_of(op)``) in its own threads,
so for example a GPU worker's H2D and D2H copies overlap on two streams. Within a lane ops start in
arrival order; the server only sends an op once everything it depends on completed, so lanes need
no ordering between them. A lane has a starter thread and a finisher thread: ``start(ops)`` begins
a batch and returns a function that waits for it, so a worker whose work completes asynchronously
(GPU copies on a stream) starts the next batch while the previous one is still running and the
stream never drains between ops. Each finisher reports straight to the server on its own socket
(it says hello with ``lane=i`` and the worker's credential first), so a completion costs no extra thread hop.

Trust: no socket sets an identity; every socket's first message is a hello carrying the credential the
server handed this worker (on stdin at spawn, or in an engine-side registration's reply), and the server
drops whatever an unknown connection sends.

Engine-side lane (DESIGN §7b): the same class runs as a thread inside the engine process
(``run_in_thread``); then nothing here touches signals or looks at the parent process.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import signal
import threading
import time
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from flexkv import hoptrace
from flexkv.common.config import CacheConfig, ModelConfig, configs_from_json
from flexkv.protocol.codec import SERVER_TO_WORKER, WORKER_TO_SERVER, Frame, ProtocolError, frame_array
from flexkv.protocol.worker_msgs import (
    ExecuteOpMsg,
    HelloAcceptedMsg,
    OpsDoneMsg,
    StopWorkerMsg,
    WorkerByeMsg,
    WorkerHelloMsg,
)
from flexkv.shm import SharedPool
from flexkv.types import OpType

log = logging.getLogger("flexkv.worker")

MAX_BATCH = 256


class Op:
    """One op as a worker sees it."""

    __slots__ = ("block_hashes", "corrupt_at", "dst_ids", "layer_major", "op_id", "op_type", "received", "src_ids",
                 "task_id", "task_ids")

    def __init__(self, op_id: int, op_type: OpType, src_ids: npt.NDArray[np.int64], dst_ids: npt.NDArray[np.int64],
                 block_hashes: npt.NDArray[np.uint64] | None, task_id: int = -1,
                 task_ids: tuple[int, ...] = (), layer_major: bool = False) -> None:
        self.op_id, self.op_type, self.task_id = op_id, op_type, task_id
        self.layer_major = layer_major  # an H2D some engine waits for layer by layer
        self.task_ids = task_ids or (task_id,)  # a batched op: every task it moves blocks for
        self.src_ids, self.dst_ids, self.block_hashes = src_ids, dst_ids, block_hashes
        self.received = time.monotonic()
        self.corrupt_at = -1  # set by a worker that found this op's bytes corrupt (see OpsDoneMsg)


class Worker(abc.ABC):
    """Base of every worker process. ``spec`` is the JSON-able dict the server spawned us with."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.worker_id: str = spec["worker_id"]
        self.model, self.cache = self._configs(spec)
        self.pool = SharedPool.attach(spec["pool_name"])
        self.pool_block_bytes = int(spec["pool_block_bytes"])
        self.pool_num_blocks: int = spec["pool_num_blocks"]
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(spec["worker_address"])
        self.credential = str(spec.get("credential", ""))
        self.engine_side: bool = bool(spec.get("engine_side", False))
        self.accepted = threading.Event()  # set when the server counted our hello
        self.stop_reason = ""  # why the server stopped us ("" = not stopped by the server)
        self._running = True

    @staticmethod
    def _configs(spec: dict[str, Any]) -> tuple[ModelConfig, CacheConfig]:
        return configs_from_json(spec["configs"])

    @abc.abstractmethod
    def op_types(self) -> list[OpType]:
        """The op types this worker executes."""

    @abc.abstractmethod
    def execute(self, ops: list[Op]) -> list[str]:
        """Run a batch of ops (all of one lane); return one error message per op ("" = success)."""

    def start(self, ops: list[Op]) -> Callable[[], list[str]]:
        """Begin a batch of one lane; return a function that waits for it and returns its errors
        (as ``execute``). The default runs the batch at once; asynchronous workers override it."""
        return _known(self._execute_safely(ops))

    num_lanes = 1  # > 1: ops of different lanes run concurrently, each lane in its own threads
    pool_block_bytes = 0  # from the spec (0 only in test doubles that build no pool: they report 0 bytes moved)
    pool_pinned = False  # True once something (cudaHostRegister) mapped and pinned every pool page

    def _populate_pool(self) -> None:
        """Map the whole pool before saying hello: the first ops must not fault in every page."""
        if self.pool_pinned:
            return
        big = self.pool.nbytes >= 4 << 30
        t0 = time.monotonic()
        self.pool.populate(progress=_progress_line(self.worker_id, "mapping the CPU pool") if big else None)
        log.debug("%s: pool mapped in %.2f s", self.worker_id, time.monotonic() - t0)

    def lane_of(self, op: Op) -> int:
        """The lane (0 .. num_lanes - 1) that runs ``op``."""
        return 0

    credential: str = ""  # the secret of this worker's hellos (set in __init__)

    def close(self) -> None:
        """Release what the worker opened (subclasses extend)."""
        self.pool.close()

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Say hello, then execute ops until told to stop; release everything on the way out. In a
        process's main thread SIGTERM stops it; in any other thread (an engine-side lane) call stop()."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
        lanes: _Lanes | None = None
        try:
            self._populate_pool()
            self._sock.send_multipart(WORKER_TO_SERVER.encode(self._hello(-1, self.op_types())))
            lanes = _Lanes(self, self._ctx, self.spec["worker_address"]) if self.num_lanes > 1 else None
            self._loop(lanes)
        finally:
            if lanes is not None:
                lanes.stop()
            bye = WorkerByeMsg(worker_id=self.worker_id, reason=self.stop_reason or "stopped")
            self._sock.send_multipart(WORKER_TO_SERVER.encode(bye))
            self.close()
            self._ctx.destroy(linger=1000)

    def run_in_thread(self) -> threading.Thread:
        """Run this worker as a daemon thread of the calling process (an engine-side lane)."""
        thread = threading.Thread(target=self.run, name=f"flexkv-lane-{self.worker_id}", daemon=True)
        thread.start()
        return thread

    def op_bytes(self, op: Op) -> int:
        """Bytes this worker moves for ``op`` (whole pool blocks; a device worker moves its rank's shard)."""
        return int(op.src_ids.size) * self.pool_block_bytes

    def _done_frames(self, batch: list[Op], errors: list[str], t_start: float, t_done: float) -> list[Frame]:
        corrupt = [op.corrupt_at for op in batch]
        done = OpsDoneMsg(worker_id=self.worker_id, op_ids=[op.op_id for op in batch], errors=errors,
                          corrupt_at=corrupt if max(corrupt, default=-1) >= 0 else [],
                          num_bytes=[0 if e else self.op_bytes(op) for op, e in zip(batch, errors, strict=True)],
                          queue_s=[max(0.0, t_start - op.received) for op in batch], busy_s=t_done - t_start)
        return WORKER_TO_SERVER.encode(done)

    def stop(self) -> None:
        """Ask the loop to end (any thread); it finishes the batch it runs and says goodbye."""
        self._running = False

    def _hello(self, lane: int, op_types: list[OpType]) -> WorkerHelloMsg:
        return WorkerHelloMsg(worker_id=self.worker_id, pid=os.getpid(), op_types=[int(t) for t in op_types],
                              credential=self.credential, lane=lane)

    def _loop(self, lanes: _Lanes | None) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        idle_ms = 100 if self.engine_side else 500
        while self._running:
            if not poller.poll(timeout=idle_ms):
                if not self.engine_side and os.getppid() == 1:  # the server died without stopping us
                    break
                continue
            batch = self._receive_batch()
            if batch and lanes is not None:
                lanes.submit(batch)
            elif batch:
                t_start = time.monotonic()
                _trace(batch, "copy_started")
                errors = self._execute_safely(batch)
                _trace(batch, "copy_done")
                frames = self._done_frames(batch, errors, t_start, time.monotonic())
                _trace(batch, "worker_reported")
                self._sock.send_multipart(frames)


    def _receive_batch(self) -> list[Op]:
        batch: list[Op] = []
        while len(batch) < MAX_BATCH:
            # Asking the socket costs less than the zmq.Again a NOBLOCK receive raises when it is empty.
            if not typing.cast(int, self._sock.get(zmq.EVENTS)) & zmq.POLLIN:
                break
            frames = self._sock.recv_multipart(copy=False)
            try:
                msg, arrays = SERVER_TO_WORKER.decode(frames)
            except ProtocolError as e:
                log.error("%s: bad message from server: %s", self.worker_id, e)
                continue
            if isinstance(msg, StopWorkerMsg):
                if msg.reason:
                    log.info("%s: the server stops us: %s", self.worker_id, msg.reason)
                self.stop_reason = msg.reason or "stopped by the server"
                self._running = False
                break
            if isinstance(msg, HelloAcceptedMsg):
                self.accepted.set()
                continue
            assert isinstance(msg, ExecuteOpMsg)
            batch.append(self._decode_op(msg, arrays))
        return batch

    @staticmethod
    def _decode_op(msg: ExecuteOpMsg, arrays: list[memoryview]) -> Op:
        src = frame_array(arrays[0], np.int64, "src_block_ids")
        dst = frame_array(arrays[1], np.int64, "dst_block_ids")
        hashes = frame_array(arrays[2], np.uint64, "block_hashes") if len(arrays) > 2 else None
        if hoptrace.ENABLED:
            hoptrace.mark("worker_received", msg.task_id)
        return Op(msg.op_id, OpType(msg.op_type), src, dst, hashes, msg.task_id, tuple(msg.task_ids), msg.layer_major)

    def _execute_safely(self, batch: list[Op]) -> list[str]:
        try:
            errors = self.execute(batch)
            assert len(errors) == len(batch)
            return errors
        except Exception as e:
            log.exception("%s: batch failed", self.worker_id)
            return [f"{type(e).__name__}: {e}"] * len(batch)


class _Lanes:
    """Per lane a starter thread (starts batches in arrival order) and a finisher thread (waits for
    them in the same order and reports each to the server on the lane's own DEALER socket)."""

    # Started batches a lane may have unfinished before its starter waits for the oldest.
    DEPTH = int(os.environ.get("FLEXKV_LANE_DEPTH", "4"))

    def __init__(self, worker: Worker, ctx: zmq.Context[Any], server_address: str) -> None:
        self._worker = worker
        self._ctx = ctx
        self._server_address = server_address
        self._queues: list[queue.SimpleQueue[Op | None]] = [queue.SimpleQueue() for _ in range(worker.num_lanes)]
        self._threads: list[threading.Thread] = []
        for i, q in enumerate(self._queues):
            started: queue.SimpleQueue[_Started | None] = queue.SimpleQueue()
            slots = threading.Semaphore(max(1, self.DEPTH))
            self._threads += [
                threading.Thread(target=self._starter, args=(q, started, slots), name=f"lane-{i}-start"),
                threading.Thread(target=self._finisher, args=(i, started, slots), name=f"lane-{i}-finish")]
        for t in self._threads:
            t.daemon = True
            t.start()

    def submit(self, batch: list[Op]) -> None:
        for op in batch:
            self._queues[self._worker.lane_of(op)].put(op)

    def _starter(self, q: queue.SimpleQueue[Op | None], started: queue.SimpleQueue[_Started | None],
                 slots: threading.Semaphore) -> None:
        while (batch := _take_batch(q, slots)) is not None:
            t0 = time.monotonic()
            _trace(batch, "copy_started")
            try:
                finish = self._worker.start(batch)
            except Exception as e:  # start() should report per op; never lose a batch
                log.exception("%s: starting a batch failed", self._worker.worker_id)
                finish = _known([f"{type(e).__name__}: {e}"] * len(batch))
            started.put((batch, finish, t0, time.monotonic()))
        started.put(None)

    def _finisher(self, lane: int, started: queue.SimpleQueue[_Started | None], slots: threading.Semaphore) -> None:
        push: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._server_address)
        push.send_multipart(WORKER_TO_SERVER.encode(self._worker._hello(lane, [])))
        try:
            while (item := started.get()) is not None:
                batch, finish, t_start, t_started = item
                try:
                    errors = finish()
                except Exception as e:
                    log.exception("%s: a batch failed", self._worker.worker_id)
                    errors = [f"{type(e).__name__}: {e}"] * len(batch)
                slots.release()
                t_done = time.monotonic()
                _trace(batch, "copy_done")
                frames = self._worker._done_frames(batch, errors, t_start, t_done)
                _trace(batch, "worker_reported")
                push.send_multipart(frames)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: %d %s op(s), %d blocks: queued %.2f ms, start %.2f ms, done %.2f ms later "
                              "(received at monotonic %.6f)", self._worker.worker_id, len(batch),
                              batch[0].op_type.name, sum(op.src_ids.size for op in batch),
                              1e3 * (t_start - batch[0].received), 1e3 * (t_started - t_start),
                              1e3 * (t_done - t_started), batch[0].received)
        finally:
            push.close()

    def stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=30)


_Started = tuple[list[Op], Callable[[], list[str]], float, float]  # batch, finisher, start began, ended


def _trace(batch: list[Op], hop: str) -> None:
    if hoptrace.ENABLED:
        for op in batch:
            hoptrace.mark(hop, op.task_id)


def _progress_line(worker_id: str, what: str, every_s: float = 5.0) -> Callable[[int, int], None]:
    """A progress callback that logs at most every ``every_s`` seconds, and at the end."""
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every_s:
            last[0] = now
            log.info("%s: %s: %.1f / %.1f GiB", worker_id, what, done / 2**30, total / 2**30)
    return progress


def _known(errors: list[str]) -> Callable[[], list[str]]:
    """The finisher of a batch that is already over."""
    return lambda: errors


def _take_batch(q: queue.SimpleQueue[Op | None], slots: threading.Semaphore) -> list[Op] | None:
    """The next op and everything queued behind it once a slot is free (up to MAX_BATCH); None once
    told to stop. Ops that arrive while the lane is full wait here and start as one batch."""
    op = q.get()
    if op is None:
        return None
    slots.acquire()
    batch = [op]
    while len(batch) < MAX_BATCH:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            q.put(None)
            break
        batch.append(nxt)
    return batch
