"""A worker with two lanes runs them at once (a GPU worker's gets and puts overlap) and in order
within a lane; every op is reported exactly once, by its lane's own socket after that socket's hello."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from flexkv.protocol.codec import WORKER_TO_SERVER
from flexkv.protocol.worker_msgs import OpsDoneMsg, WorkerHelloMsg
from flexkv.types import OpType
from flexkv.workers.base import Op, Worker, _Lanes

pytestmark = pytest.mark.timeout(30)


class TwoLanes(Worker):
    """Lane 0 (H2D) blocks until lane 1 (D2H) has run an op: only concurrent lanes get through."""

    num_lanes = 2

    def __init__(self) -> None:  # no server, no pool: only what _Lanes uses
        self.worker_id = "lanes-test"
        self.d2h_ran = threading.Event()
        self.order: dict[int, list[int]] = {0: [], 1: []}

    def op_types(self) -> list[OpType]:
        return [OpType.H2D, OpType.D2H]

    def lane_of(self, op: Op) -> int:
        return int(op.op_type is OpType.D2H)

    def execute(self, ops: list[Op]) -> list[str]:
        lane = self.lane_of(ops[0])
        if lane == 0:
            assert self.d2h_ran.wait(10), "lane 1 never ran while lane 0 waited"
        else:
            self.d2h_ran.set()
        self.order[lane] += [op.op_id for op in ops]
        return ["" if op.op_id != 7 else "op 7 fails" for op in ops]


def _op(op_id: int, op_type: OpType) -> Op:
    ids = np.arange(2, dtype=np.int64)
    return Op(op_id, op_type, ids, ids, None)


@contextlib.contextmanager
def lanes_and_server(worker: Worker) -> Iterator[tuple[_Lanes, zmq.Socket[bytes]]]:
    """The worker's lanes, reporting to a ROUTER that stands in for the server; all stopped after."""
    ctx: zmq.Context[Any] = zmq.Context()
    server: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    server.bind("inproc://server")
    lanes = _Lanes(worker, ctx, "inproc://server")
    try:
        yield lanes, server
    finally:
        lanes.stop()
        server.close(linger=0)
        ctx.term()


def test_lanes_run_concurrently_in_order_and_report_every_op_once() -> None:
    worker = TwoLanes()
    with lanes_and_server(worker) as (lanes, server):
        h2d = [_op(i, OpType.H2D) for i in range(5)]
        d2h = [_op(i, OpType.D2H) for i in range(5, 10)]
        lanes.submit(h2d[:2] + d2h[:1])
        lanes.submit(h2d[2:] + d2h[1:])
        done: dict[int, str] = {}
        lane_of_socket: dict[bytes, int] = {}
        while len(done) < 10:
            assert server.poll(10_000), f"only {sorted(done)} reported"
            identity, *frames = server.recv_multipart()
            msg, _ = WORKER_TO_SERVER.decode(frames)
            if isinstance(msg, WorkerHelloMsg):  # each lane's socket introduces itself first
                assert msg.worker_id == "lanes-test" and identity not in lane_of_socket
                lane_of_socket[identity] = msg.lane
                continue
            assert isinstance(msg, OpsDoneMsg) and msg.worker_id == "lanes-test"
            lane = 1 if msg.op_ids[0] >= 5 else 0
            assert lane_of_socket.get(identity) == lane, "each lane reports on its own socket, after its hello"
            for op_id, err in zip(msg.op_ids, msg.errors, strict=True):
                assert op_id not in done, f"op {op_id} reported twice"
                done[op_id] = err
        assert done == {i: ("op 7 fails" if i == 7 else "") for i in range(10)}
        assert worker.order == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}


class Gated(Worker):
    """start() returns at once; the batch finishes only when the gate opens (like a GPU copy)."""

    num_lanes = 2

    def __init__(self) -> None:
        self.worker_id = "gated-test"
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.batches: list[list[int]] = []

    def op_types(self) -> list[OpType]:
        return [OpType.H2D]

    def execute(self, ops: list[Op]) -> list[str]:
        raise AssertionError("a lane uses start()")

    def start(self, ops: list[Op]) -> Any:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.batches.append([op.op_id for op in ops])

        def finish() -> list[str]:
            assert self.gate.wait(10)
            with self.lock:
                self.in_flight -= 1
            return [""] * len(ops)
        return finish


def test_a_lane_keeps_at_most_depth_batches_started_and_merges_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Lanes, "DEPTH", 2)
    worker = Gated()
    with lanes_and_server(worker) as (lanes, server):
        for i in range(2):  # two batches of one op each fill the lane
            lanes.submit([_op(i, OpType.H2D)])
            deadline = time.monotonic() + 5
            while len(worker.batches) <= i and time.monotonic() < deadline:
                time.sleep(0.005)
        lanes.submit([_op(i, OpType.H2D) for i in range(2, 6)])
        time.sleep(0.2)
        assert worker.most == 2 and len(worker.batches) == 2, "a third batch started before a slot freed"
        worker.gate.set()
        done: list[int] = []
        while len(done) < 6:
            assert server.poll(10_000), f"only {done} reported"
            msg, _ = WORKER_TO_SERVER.decode(server.recv_multipart()[1:])
            if isinstance(msg, WorkerHelloMsg):
                continue
            assert isinstance(msg, OpsDoneMsg)
            done += msg.op_ids
        assert sorted(done) == list(range(6)) and worker.most == 2
        assert worker.batches == [[0], [1], [2, 3, 4, 5]], "ops that waited for a slot start as one batch"
