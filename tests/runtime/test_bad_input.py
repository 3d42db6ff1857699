"""Bad input through the API and raw garbage on both sockets: clear errors, the server stays alive,
no reservation leaks and the invariants hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
import zmq

from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.protocol import client_msgs as cm
from flexkv.protocol import worker_msgs as wm
from flexkv.protocol.codec import CLIENT_REQUESTS, SERVER_REPLIES, WORKER_TO_SERVER
from flexkv.types import FlexKVError, InvalidRequest, TaskStatus
from tests.runtime.kvtest import T, host_buffers, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def kvm() -> Iterator[KVManager]:
    model = small_model()
    m = KVManager(model, small_cache(num_cpu_blocks=32))
    m.start()
    bufs = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=9)
    m.register_kv_buffers(bufs, bufs.layout)
    yield m
    m.shutdown()
    bufs.close()


def _hello(sock: zmq.Socket[bytes]) -> int:
    """Open a session on a raw DEALER (this process's pid); returns its id."""
    import os

    sock.send_multipart(CLIENT_REQUESTS.encode(cm.HelloMsg(client_id=0, req_id=1, pid=os.getpid(), host="x",
                                                           role="manager")))
    reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
    assert isinstance(reply, cm.OkReplyMsg)
    return int(reply.info["session_id"])


def _free(kvm: KVManager) -> int:
    return int(kvm.stats()["cpu_free_blocks"])


@pytest.mark.parametrize(("token_ids", "message"), [
    (np.arange(8, dtype=np.float32), "int64"),
    (np.arange(8, dtype=np.int64).reshape(2, 4), "1-D"),
    ([1, 2, 3], "numpy array or torch tensor"),
    (torch.arange(8, dtype=torch.float16), "int64"),
])
def test_bad_token_ids_are_rejected_at_the_call(kvm: KVManager, token_ids: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        kvm.get_match(token_ids)
    with pytest.raises(InvalidRequest, match=message):
        kvm.put_async(token_ids, np.arange(8, dtype=np.int64))


def test_torch_tensors_are_accepted(kvm: KVManager) -> None:
    tid, mask = kvm.get_match(torch.arange(4 * T, dtype=torch.int64))
    assert mask.shape == (4 * T,)
    kvm.cancel(tid)


def test_bad_masks_are_rejected(kvm: KVManager) -> None:
    toks = tokens(4 * T, seed=1)
    with pytest.raises(InvalidRequest, match="entries"):
        kvm.get_match(toks, np.ones(3, dtype=np.bool_))
    with pytest.raises(InvalidRequest, match="bool"):
        kvm.get_match(toks, np.ones(4 * T, dtype=np.int64))
    holes = np.ones(4 * T, dtype=np.bool_)
    holes[T + 1] = False
    before = _free(kvm)
    with pytest.raises(InvalidRequest):
        kvm.put_match(toks, holes)
    assert _free(kvm) == before
    kvm.check_invariants()


def test_misaligned_slot_mapping_fails_the_task_and_leaks_nothing(kvm: KVManager) -> None:
    toks = tokens(4 * T, seed=2)
    before = _free(kvm)
    tid = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)) + 1)  # every block starts off its boundary
    res = kvm.wait(tid, timeout=5)[tid]
    assert res.status is TaskStatus.FAILED and "slot" in res.error
    assert _free(kvm) == before
    tid = kvm.get_async(toks, slots_for([0, 1], 2 * T))  # too short to cover the moved tokens
    assert kvm.wait(tid, timeout=5)[tid].status in (TaskStatus.FAILED, TaskStatus.SUCCESS)
    kvm.check_invariants()


def test_unknown_task_ids_and_relaunch_with_a_different_mapping(kvm: KVManager) -> None:
    assert kvm.wait(987654, timeout=1)[987654].status is TaskStatus.NOTFOUND
    with pytest.raises(InvalidRequest, match="was not returned by get_match"):
        kvm.launch([424242], [np.arange(4, dtype=np.int64)])  # never matched: refused before it is sent
    kvm.cancel([31337])  # unknown: ignored
    toks = tokens(2 * T, seed=3)
    tid, _ = kvm.put_match(toks)
    kvm.launch(tid, slots_for([4, 5], len(toks)))
    kvm.launch(tid, slots_for([4, 5], len(toks)))  # same: no-op
    with pytest.raises(InvalidRequest, match="different slot_mapping"):
        kvm.launch(tid, slots_for([6, 7], len(toks)))
    assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
    with pytest.raises(InvalidRequest, match="task ids but"):
        kvm.launch([1, 2], [np.arange(4, dtype=np.int64)])
    kvm.check_invariants()


def test_registering_a_layout_that_does_not_match_the_model_is_refused(kvm: KVManager) -> None:
    wrong = host_buffers(small_model(tp_size=1, use_mla=True), LayoutKind.MLA, 8, seed=4)
    try:
        with pytest.raises(InvalidRequest, match="does not match"):
            kvm.register_kv_buffers(wrong, wrong.layout, tp_rank=0)
        with pytest.raises(InvalidRequest, match="tp_rank"):
            kvm.register_kv_buffers(wrong, wrong.layout, tp_rank=5)
        with pytest.raises(InvalidRequest, match="shared memory"):
            kvm.register_kv_buffers([np.zeros((2, 8, T, 4, 8), np.float16)] * 3, "vllm_kv_first")
    finally:
        wrong.close()
    assert kvm.is_ready()


def test_raw_garbage_on_the_client_socket_gets_an_error_reply(kvm: KVManager) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(kvm.server_address)
    try:
        for frames in ([b"garbage"], [b"\x93\x01\x02"], [msgspec.msgpack.encode({"type": "QueryMsg"})], [b""] * 3):
            sock.send_multipart(frames)
            reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
            assert isinstance(reply, cm.ErrorReplyMsg) and reply.kind == "ProtocolError"
        sock.send_multipart(CLIENT_REQUESTS.encode(cm.QueryMsg(client_id=0, req_id=4, what="stats")))
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        assert isinstance(reply, cm.ErrorReplyMsg) and "never said hello" in reply.error
        session = _hello(sock)
        # a well-formed message with missing frames and one with a bad query
        sock.send_multipart(CLIENT_REQUESTS.encode(cm.GetMatchMsg(client_id=0, session_id=session, req_id=5,
                                                                  task_id=10**9)))
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        assert isinstance(reply, cm.ErrorReplyMsg) and "frames" in reply.error
        sock.send_multipart(CLIENT_REQUESTS.encode(cm.QueryMsg(client_id=0, session_id=session, req_id=6,
                                                               what="nope")))
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        assert isinstance(reply, cm.ErrorReplyMsg) and reply.req_id == 6 and "unknown query" in reply.error
        sock.send_multipart(CLIENT_REQUESTS.encode(cm.HelloMsg(client_id=99, req_id=7, pid=1, host="x", role="x")))
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        assert isinstance(reply, cm.ErrorReplyMsg) and "dp_client_id" in reply.error
    finally:
        ctx.destroy(linger=0)
    assert kvm.is_ready()
    kvm.check_invariants()


def test_raw_garbage_on_the_worker_socket_is_ignored(kvm: KVManager) -> None:
    worker_sock = Path(kvm.server_address.removeprefix("ipc://")).parent / "workers.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"intruder")
    sock.connect(f"ipc://{worker_sock}")
    try:
        sock.send_multipart([b"\xff\x00garbage"])
        sock.send_multipart(WORKER_TO_SERVER.encode(wm.WorkerHelloMsg(worker_id="intruder", pid=1, op_types=[0])))
        sock.send_multipart(WORKER_TO_SERVER.encode(wm.OpsDoneMsg(worker_id="intruder", op_ids=[1, 2, 3],
                                                                  errors=["", "", "x"])))
    finally:
        ctx.destroy(linger=1000)
    toks = tokens(3 * T, seed=5)
    tid = kvm.put_async(toks, slots_for([8, 9, 10], len(toks)))
    assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS, "server and worker still work"
    kvm.check_invariants()


def test_calls_before_start_are_clear_errors() -> None:
    m = KVManager(small_model(), small_cache())
    with pytest.raises(FlexKVError, match="start"):
        m.get_match(np.arange(8, dtype=np.int64))
    m.shutdown()


def test_a_bare_string_namespace_is_rejected(kvm: KVManager) -> None:
    with pytest.raises(InvalidRequest, match="list of strings"):
        kvm.get_match(tokens(T, seed=1), namespace="tenant")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="list of strings"):
        kvm.put_async(tokens(T, seed=1), slots_for([0], T), namespace=["a", 3])  # type: ignore[list-item]


def test_the_kv_written_event_needs_cuda_tensors(kvm: KVManager) -> None:
    from flexkv.client import KVTPClient

    bufs = host_buffers(small_model(), LayoutKind.VLLM_KV_FIRST, 16, seed=3)
    client = KVTPClient(kvm.server_address, tp_rank=0)
    try:
        with pytest.raises(InvalidRequest, match="use_event needs CUDA"):
            client.register(bufs, bufs.layout, use_event=True)
        with pytest.raises(InvalidRequest, match="use_event=True first"):
            client.mark_kv_written()
    finally:
        client.close()
    # The server checks too: an event handle beside host buffers is refused, the old worker stays.
    lay = bufs.layout
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(kvm.server_address)
    try:
        session = _hello(sock)
        sock.send_multipart(CLIENT_REQUESTS.encode(cm.RegisterKVMsg(
            client_id=0, session_id=session, req_id=8, tp_rank=0, device_id=0, layout_kind=lay.kind.value,
            num_blocks=lay.num_blocks, tokens_per_block=lay.tokens_per_block, num_heads=lay.num_heads,
            head_size=lay.head_size, itemsize=lay.itemsize, num_layers=lay.num_layers, host_segment=bufs.segment.name,
            tensor_offsets=bufs.offsets, cuda_event=b"\x01" * 64)))
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        assert isinstance(reply, cm.ErrorReplyMsg) and "cuda_event needs CUDA tensors" in reply.error
    finally:
        ctx.destroy(linger=0)
        bufs.close()
    assert kvm.is_ready()
