"""The worker socket trusts only its own workers (DESIGN §7, trust): a hello must carry the credential
the server handed that worker, and an op completes only when the connection bound to the worker it
was sent to reports it, once. Spoofed completions never turn a get into SUCCESS over unwritten bytes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from flexkv.client import KVTPClient
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.protocol.codec import SERVER_TO_WORKER, WORKER_TO_SERVER
from flexkv.protocol.worker_msgs import (
    ExecuteOpMsg,
    HelloAcceptedMsg,
    OpsDoneMsg,
    StopWorkerMsg,
    WorkerByeMsg,
    WorkerHelloMsg,
)
from flexkv.scheduler.graph import TransferOp
from flexkv.scheduler.supervisor import RestartPolicy, WorkerSupervisor
from flexkv.shm import SHM_DIR
from flexkv.types import FlexKVError, OpType, TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    host_buffers,
    poison,
    serving,
    slots_for,
    small_cache,
    small_model,
    tokens,
)

pytestmark = pytest.mark.timeout(90)


def _spoof(ctx: zmq.Context[Any], address: str, identity: bytes | None, worker_id: str) -> zmq.Socket[bytes]:
    """A local process's DEALER claiming to be ``worker_id``: a hello with a guessed credential, then
    completions for every op id it might have been sent."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    hello = WorkerHelloMsg(worker_id=worker_id, pid=os.getpid(), op_types=[0, 1], credential="0" * 32, lane=7)
    sock.send_multipart(WORKER_TO_SERVER.encode(hello))
    ids = list(range(2000))
    sock.send_multipart(WORKER_TO_SERVER.encode(OpsDoneMsg(worker_id=worker_id, op_ids=ids, errors=[""] * len(ids))))
    return sock


def test_spoofed_completions_from_a_stopped_workers_identity_never_complete_a_get() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_BLOCK_FIRST, num_blocks=24, seed=3) as (kvm, bufs):
        toks = tokens(4 * T, seed=8)
        put = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
        assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
        dst = [10, 11, 12, 13]
        poison(bufs, dst)
        poisoned = [block_bytes(bufs, b) for b in dst]
        pid = int(kvm.stats()["pid:device-0-0"])
        worker_address = kvm.server_address.replace("server.sock", "workers.sock")
        ctx: zmq.Context[Any] = zmq.Context()
        os.kill(pid, signal.SIGSTOP)
        try:
            get = kvm.get_async(toks, slots_for(dst, len(toks)))
            assert kvm.wait(get, timeout=0.3)[get].status is TaskStatus.TIMEOUT
            spoofers = [_spoof(ctx, worker_address, ident, "device-0-0")
                        for ident in (b"device-0-0/lane7", b"device-0-0", b"device-0-0/lane0", None)]
            for s in spoofers[:1]:  # the hello is answered: refused, told to stop
                assert s.poll(10_000), "a refused hello gets an answer"
                msg, _ = SERVER_TO_WORKER.decode(s.recv_multipart())
                assert isinstance(msg, StopWorkerMsg) and "refused" in msg.reason
            assert kvm.wait(get, timeout=1.0)[get].status is TaskStatus.TIMEOUT, "a spoofed report completed the get"
            assert [block_bytes(bufs, b) for b in dst] == poisoned
            assert int(kvm.stats()["worker_msgs_refused"]) >= 2 * len(spoofers)
        finally:
            os.kill(pid, signal.SIGCONT)
            ctx.destroy(linger=0)
        resp = kvm.wait(get, timeout=30)[get]
        assert resp.status is TaskStatus.SUCCESS
        for src, d in zip([0, 1, 2, 3], dst, strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, src), "the real worker's bytes landed"
        kvm.check_invariants()


@pytest.fixture
def supervisor() -> Iterator[tuple[WorkerSupervisor, zmq.Context[Any], zmq.Socket[bytes]]]:
    ctx: zmq.Context[Any] = zmq.Context()
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    router.bind("inproc://workers")
    sup = WorkerSupervisor(router, {"worker_address": "inproc://workers"}, tp_size=1, use_mla=False,
                           policy=RestartPolicy())
    try:
        yield sup, ctx, router
    finally:
        ctx.destroy(linger=0)


def _connect(ctx: zmq.Context[Any], router: zmq.Socket[bytes], sup: WorkerSupervisor, hello: WorkerHelloMsg,
             ) -> tuple[zmq.Socket[bytes], bytes]:
    """A DEALER that says ``hello``; the server side's routing id of it, after the supervisor saw the hello."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.connect("inproc://workers")
    sock.send_multipart(WORKER_TO_SERVER.encode(hello))
    assert router.poll(5000)
    rid, *frames = router.recv_multipart()
    msg, _ = WORKER_TO_SERVER.decode(frames)
    assert isinstance(msg, WorkerHelloMsg)
    sup.on_hello(rid, msg)
    return sock, rid


def _h2d(op_id: int) -> TransferOp:
    ids = np.arange(2, dtype=np.int64)
    return TransferOp(op_id=op_id, task_key=(0, 1), op_type=OpType.H2D, src_block_ids=ids, dst_block_ids=ids,
                      block_hashes=None)


def test_an_op_completes_once_and_only_from_the_worker_it_was_sent_to(
        supervisor: tuple[WorkerSupervisor, zmq.Context[Any], zmq.Socket[bytes]]) -> None:
    sup, ctx, router = supervisor
    lane = sup.expect_lane("device-0-0", {"dp_client_id": 0, "tp_rank": 0})
    other = sup.expect_lane("device-1-0", {"dp_client_id": 1, "tp_rank": 0})
    main, main_rid = _connect(ctx, router, sup, WorkerHelloMsg(worker_id="device-0-0", pid=os.getpid(), op_types=[0],
                                                               credential=lane.credential))
    _, lane_rid = _connect(ctx, router, sup, WorkerHelloMsg(worker_id="device-0-0", pid=os.getpid(), op_types=[],
                                                            credential=lane.credential, lane=0))
    _, other_rid = _connect(ctx, router, sup, WorkerHelloMsg(worker_id="device-1-0", pid=os.getpid(), op_types=[0],
                                                             credential=other.credential))
    _, bad_rid = _connect(ctx, router, sup, WorkerHelloMsg(worker_id="device-0-0", pid=os.getpid(), op_types=[0],
                                                           credential=other.credential, lane=1))
    assert sup.worker_of(main_rid) == sup.worker_of(lane_rid) == "device-0-0"
    assert sup.worker_of(other_rid) == "device-1-0" and sup.worker_of(bad_rid) is None, "another worker's secret"
    accepted, _ = SERVER_TO_WORKER.decode(main.recv_multipart())
    assert isinstance(accepted, HelloAcceptedMsg)
    assert sup.dispatch(_h2d(5)) is None
    sent, _ = SERVER_TO_WORKER.decode(main.recv_multipart())
    assert isinstance(sent, ExecuteOpMsg) and sent.op_id == 5, "ops go to the connection that said hello"
    assert sup.on_done("device-1-0", [5], [""]) == [], "another worker cannot report it"
    assert sup.on_done("device-0-0", [6], [""]) == [], "an op never sent is no completion"
    assert sup.on_done("device-0-0", [5], [""]) == [(5, "")]
    assert sup.on_done("device-0-0", [5], ["late"]) == [], "reported once"
    assert sup.num_in_flight == 0


def _segment_of_another_user(model: Any) -> Any:
    bufs = host_buffers(model, LayoutKind.VLLM_BLOCK_FIRST, 8, seed=1)
    path = os.path.join(SHM_DIR, bufs.segment.name.lstrip("/"))
    os.chown(path, 65534, 65534)  # as if user "nobody" made it and let us in
    os.chmod(path, 0o666)
    return bufs


@pytest.mark.skipif(os.getuid() != 0, reason="making a segment owned by another user needs root")
def test_a_registration_naming_another_users_segment_is_refused_with_a_reason() -> None:
    model = small_model()
    foreign = _segment_of_another_user(model)
    own = host_buffers(model, LayoutKind.VLLM_BLOCK_FIRST, 8, seed=2)
    try:
        with KVManager(model, small_cache()) as kvm:
            tp = KVTPClient(kvm.server_address)
            try:
                t0 = time.monotonic()
                with pytest.raises(FlexKVError, match="device-0-0 could not start"):
                    tp.register(foreign, foreign.layout)
                assert time.monotonic() - t0 < 60, "the failed start is reported, not waited out"
                assert not kvm.is_ready() and "pid:device-0-0" not in kvm.stats()
                tp.register(own, own.layout)  # the server is fine; a proper registration works
                assert kvm.is_ready()
            finally:
                tp.close()
    finally:
        foreign.close()
        own.close()


def _fuzz_frames(rng: np.random.Generator, valid: list[bytes]) -> list[bytes]:
    """One message of a seeded mix: random bytes, truncated or bit-flipped valid messages, valid tags
    with wrong field types, and well-formed messages from a connection that never said a good hello."""
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 64)))]
    base = valid[int(rng.integers(0, len(valid)))]
    if kind == 1:
        return [base[: int(rng.integers(0, len(base)))]]
    if kind == 2:
        flipped = bytearray(base)
        flipped[int(rng.integers(0, len(flipped)))] ^= 1 << int(rng.integers(0, 8))
        return [bytes(flipped), rng.bytes(int(rng.integers(0, 16)))]
    if kind == 3:
        wrong = {"type": "OpsDoneMsg", "worker_id": int(rng.integers(0, 9)), "op_ids": "x", "errors": [1]}
        return [msgspec.msgpack.encode(wrong)]
    return [base]


def test_worker_socket_fuzz_leaves_the_server_serving_byte_exact() -> None:
    rng = np.random.default_rng(1234)
    ids = [int(i) for i in rng.integers(-2**40, 2**40, 64)]
    valid = [bytes(f) for m in (
        OpsDoneMsg(worker_id="device-0-0", op_ids=ids, errors=[""] * len(ids)),
        WorkerHelloMsg(worker_id="device-0-0", pid=1, op_types=[0, 1], credential="f" * 32, lane=3),
        WorkerByeMsg(worker_id="device-0-0", reason="fuzz"),
    ) for f in WORKER_TO_SERVER.encode(m)]
    model = small_model()
    with serving(model, small_cache(), LayoutKind.SGLANG, num_blocks=24, seed=6) as (kvm, bufs):
        server_pid = int(kvm.stats()["server_pid"])
        rss_before = _rss_kib(server_pid)
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            socks = []
            for ident in (b"device-0-0", b"device-0-0/lane0", b"ssd-0", None):
                s: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
                if ident is not None:
                    s.setsockopt(zmq.IDENTITY, ident)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 0)
                s.connect(kvm.server_address.replace("server.sock", "workers.sock"))
                socks.append(s)
            for i in range(20_000):
                socks[i % len(socks)].send_multipart(_fuzz_frames(rng, valid))
            deadline = time.monotonic() + 60
            while int(kvm.stats()["worker_msgs_refused"]) < 20_000 * 0.9:  # every message is dropped
                assert time.monotonic() < deadline, "the server did not get through the fuzz frames"
                time.sleep(0.1)
        finally:
            ctx.destroy(linger=0)
        assert kvm.is_ready(), "the real worker is still registered and bound"
        toks = tokens(5 * T, seed=3)
        put = kvm.put_async(toks, slots_for([0, 1, 2, 3, 4], len(toks)))
        assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
        poison(bufs, [10, 11, 12, 13, 14])
        get = kvm.get_async(toks, slots_for([10, 11, 12, 13, 14], len(toks)))
        assert kvm.wait(get)[get].status is TaskStatus.SUCCESS
        for src, d in zip(range(5), range(10, 15), strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, src)
        stats = kvm.stats()
        assert stats["in_flight_ops"] == 0
        kvm.check_invariants()
        assert _rss_kib(server_pid) - rss_before < 64 * 1024, "server memory grew by the fuzz"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
