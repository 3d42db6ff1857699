"""Incarnations (DESIGN §7): every connection gets a session at hello; its tasks, reservations,
results and registrations are its own and go with it. Engines that restart, die, or say things
for others: real server processes, real SIGKILLs, poisoned destinations, bytes compared."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from flexkv.common.config import configs_to_json
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.codec import CLIENT_REQUESTS, SERVER_REPLIES
from flexkv.shm import list_flexkv_segments
from flexkv.types import InvalidRequest, TaskStatus
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

pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("spawn")
SRC, DST = [0, 1, 2, 3], [8, 9, 10, 11]


def _server(model: Any, cache: Any, runtime_dir: Path) -> subprocess.Popen[bytes]:
    runtime_dir.mkdir(mode=0o700)
    return subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                             configs_to_json(model, cache), "--runtime-dir", str(runtime_dir),
                             "--address", f"ipc://{runtime_dir}/server.sock"])


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    assert server.wait(20) in (0, -signal.SIGKILL)


def _wait_until(cond: Any, timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _engine_a(address: str, model: Any, conn: Any) -> None:
    """Engine A in its own process: register, put X, get X back, report, then wait to be killed."""
    bufs = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=1)
    kvm = KVManager(model, small_cache(), address, dp_client_id=0)
    kvm.start()
    kvm.register_kv_buffers(bufs, bufs.layout)
    x = tokens(4 * T, seed=21)
    put = kvm.put_async(x, slots_for(SRC, len(x)))
    get = kvm.get_async(x, slots_for(DST, len(x)))
    ok = kvm.wait([put, get], timeout=20)
    conn.send(([r.status for r in ok.values()], bufs.segment.name))
    time.sleep(600)


def _run_engine_a_in_process(address: str, model: Any) -> None:
    bufs = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=1)
    kvm = KVManager(model, small_cache(), address, dp_client_id=0)
    try:
        kvm.start()
        kvm.register_kv_buffers(bufs, bufs.layout)
        x = tokens(4 * T, seed=21)
        put = kvm.put_async(x, slots_for(SRC, len(x)))
        get = kvm.get_async(x, slots_for(DST, len(x)))
        assert all(r.status is TaskStatus.SUCCESS for r in kvm.wait([put, get], timeout=20).values())
    finally:
        kvm.shutdown()
        bufs.close()


@pytest.mark.parametrize("how", ["close", "sigkill"])
def test_a_restarted_engine_never_sees_its_predecessors_tasks(tmp_path: Path, how: str) -> None:
    """Engine A (dp 0) puts and gets X, then closes or is SIGKILLed. Engine B, same dp 0: its get of
    Y loads nothing (B's buffers stay poisoned), its put of Y stores, and a third engine's get_match
    works with task ids of its own (every session numbers its tasks from its session id on, so a rank's
    layer progress table never mistakes one session's task for another's). A killed A's host KV segment
    is removed by the server."""
    model = small_model()
    server = _server(model, small_cache(), tmp_path / "rt")
    address = f"ipc://{tmp_path}/rt/server.sock"
    b = KVManager(model, small_cache(), address, dp_client_id=0)
    bufs_b = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=2)
    proc = None
    try:
        if how == "close":
            _run_engine_a_in_process(address, model)
        else:
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=_engine_a, args=(address, model, child))
            proc.start()
            assert parent.poll(60), "engine A did not finish its put and get"
            statuses, segment_a = parent.recv()
            assert statuses == [TaskStatus.SUCCESS, TaskStatus.SUCCESS]
            assert segment_a in list_flexkv_segments()
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            _wait_until(lambda: segment_a not in list_flexkv_segments(), what="the server to remove A's KV segment")
        b.start()
        _wait_until(lambda: b.stats()["num_sessions"] == 1, what="A's sessions to end")
        b.register_kv_buffers(bufs_b, bufs_b.layout)
        y = tokens(4 * T, seed=22)
        poison(bufs_b, DST)
        get = b.get_async(y, slots_for(DST, len(y)))
        first_of_b = get
        res = b.wait(get, timeout=20)[get]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and not res.return_mask.any()
        assert all(set(block_bytes(bufs_b, d)) == {0xAB} for d in DST), "B's get of Y loaded nothing"
        put = b.put_async(y, slots_for(SRC, len(y)))
        res = b.wait(put, timeout=20)[put]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
        get = b.get_async(y, slots_for(DST, len(y)))
        assert b.wait(get, timeout=20)[get].status is TaskStatus.SUCCESS
        for s, d in zip(SRC, DST, strict=True):
            assert block_bytes(bufs_b, d) == block_bytes(bufs_b, s), "B's put stored Y, B's get loaded it"
        with KVManager(model, small_cache(), address, dp_client_id=0) as c:
            tid, mask = c.get_match(y)  # the first task of a third session
            assert mask.all()
            assert tid != first_of_b and tid % (1 << 32) == first_of_b % (1 << 32) == 1, (tid, first_of_b)
            c.cancel(tid)
            assert c.wait(tid)[tid].status is TaskStatus.CANCELLED
        b.check_invariants()
    finally:
        if proc is not None and proc.is_alive():
            proc.kill()
        b.shutdown()
        _stop(server)
        bufs_b.close()


def test_a_stray_launch_does_not_break_the_put_that_later_takes_its_id() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=3) as (kvm, bufs):
        nxt = kvm._task_base + 1  # the id this session's next task takes
        with pytest.raises(InvalidRequest, match="not returned by get_match"):
            kvm.launch(nxt, slots_for(SRC, 4 * T))
        # the same launch straight on the socket (a client with its own ids): the server ignores it
        kvm._c.send(cm.LaunchMsg(client_id=0, task_ids=[nxt]), [slots_for(SRC, 4 * T)])
        x = tokens(4 * T, seed=23)
        put = kvm.put_async(x, slots_for(SRC, len(x)))
        assert put == nxt
        assert kvm.wait(put, timeout=20)[put].status is TaskStatus.SUCCESS
        poison(bufs, DST)
        get = kvm.get_async(x, slots_for(DST, len(x)))
        assert kvm.wait(get, timeout=20)[get].status is TaskStatus.SUCCESS
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(SRC, DST, strict=True))
        kvm.check_invariants()


@pytest.fixture
def raw() -> Iterator[Any]:
    """A factory of raw DEALER sockets; all closed at the end."""
    ctx = zmq.Context()

    def make(address: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(address)
        return sock

    yield make
    ctx.destroy(linger=0)


def _ask(sock: zmq.Socket[bytes], msg: Any, arrays: list[Any] | None = None) -> cm.ServerReply:
    sock.send_multipart(CLIENT_REQUESTS.encode(msg, arrays or []))
    reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
    return reply


def _hello(sock: zmq.Socket[bytes], client_id: int = 0, pid: int | None = None) -> int:
    reply = _ask(sock, cm.HelloMsg(client_id=client_id, req_id=1, pid=pid or os.getpid(), host="raw",
                                   role="manager"))
    assert isinstance(reply, cm.OkReplyMsg)
    return int(reply.info["session_id"])


def _refused(reply: cm.ServerReply, why: str) -> bool:
    return isinstance(reply, cm.ErrorReplyMsg) and "refused" in reply.error and why in reply.error


def test_messages_outside_a_live_session_are_refused_with_the_reason(raw: Any) -> None:
    model = small_model(dp_size=2)
    with KVManager(model, small_cache(num_cpu_blocks=32)) as kvm:
        free = kvm.stats()["cpu_free_blocks"]
        sock = raw(kvm.server_address)
        hashes = np.arange(8, dtype=np.uint64)
        match = cm.GetMatchMsg(client_id=0, req_id=2, task_id=1, num_tokens=8 * T)
        assert _refused(_ask(sock, match, [hashes]), "never said hello")
        sid = _hello(sock)
        assert sid != kvm._c.session_id
        stale = cm.GetMatchMsg(client_id=0, session_id=sid + 1000, req_id=3, task_id=1, num_tokens=8 * T)
        assert _refused(_ask(sock, stale, [hashes]), f"session {sid + 1000} is not live")
        other = cm.GetMatchMsg(client_id=1, session_id=sid, req_id=4, task_id=1, num_tokens=8 * T)
        assert _refused(_ask(sock, other, [hashes]), "claims client id 1")
        theirs = cm.QueryMsg(client_id=0, session_id=kvm._c.session_id, req_id=5, what="stats")
        assert _refused(_ask(sock, theirs, []), "is not live")  # another connection's session id
        sid2 = _hello(sock)  # a second hello ends the first session
        assert sid2 > sid
        old = cm.QueryMsg(client_id=0, session_id=sid, req_id=6, what="stats")
        assert _refused(_ask(sock, old, []), f"session {sid} is not live")
        ok = _ask(sock, cm.GetMatchMsg(client_id=0, session_id=sid2, req_id=7, task_id=1, num_tokens=8 * T), [hashes])
        assert isinstance(ok, cm.MatchReplyMsg)
        big = cm.GetMatchMsg(client_id=0, session_id=sid2, req_id=8, task_id=2**63, num_tokens=0)
        reply = _ask(sock, big, [np.zeros(0, np.uint64)])
        assert isinstance(reply, cm.ErrorReplyMsg) and "out of range" in reply.error
        assert kvm.stats()["num_tasks"] == 1
        assert isinstance(_ask(sock, cm.ByeMsg(client_id=0, session_id=sid2, req_id=9)), cm.OkReplyMsg)
        stats = kvm.stats()
        assert stats["num_tasks"] == 0 and stats["cpu_free_blocks"] == free and stats["num_sessions"] == 1
        assert _refused(_ask(sock, old, []), "never said hello"), "after bye the connection has no session"
        kvm.check_invariants()


def test_a_monitor_session_may_only_read(raw: Any) -> None:
    """What `flexkv stats` opens: queries of snapshot/stats/is_ready only; no task, no shutdown."""
    with KVManager(small_model(), small_cache(num_cpu_blocks=32)) as kvm:
        sock = raw(kvm.server_address)
        reply = _ask(sock, cm.HelloMsg(client_id=0, req_id=1, pid=os.getpid(), host="raw", role="monitor"))
        assert isinstance(reply, cm.OkReplyMsg)
        sid = int(reply.info["session_id"])
        snap = _ask(sock, cm.QueryMsg(client_id=0, session_id=sid, req_id=2, what="snapshot"))
        assert isinstance(snap, cm.OkReplyMsg) and "json" in snap.info
        match = cm.GetMatchMsg(client_id=0, session_id=sid, req_id=3, task_id=1, num_tokens=8 * T)
        assert _refused(_ask(sock, match, [np.arange(8, dtype=np.uint64)]), "a monitor connection may only query")
        down = cm.QueryMsg(client_id=0, session_id=sid, req_id=4, what="shutdown")
        assert _refused(_ask(sock, down), "a monitor connection may only query")
        assert kvm.is_ready() is False and kvm.stats()["num_tasks"] == 0, "the server still serves"
        assert isinstance(_ask(sock, cm.ByeMsg(client_id=0, session_id=sid, req_id=5)), cm.OkReplyMsg)
        kvm.check_invariants()


def test_a_live_ranks_registration_is_replaced_only_by_its_own_connection(raw: Any) -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=4) as (kvm, bufs):
        pid = kvm.stats()["pid:device-0-0"]
        sock = raw(kvm.server_address)
        sid = _hello(sock)
        lay = bufs.layout
        hijack = cm.RegisterKVMsg(client_id=0, session_id=sid, req_id=2, tp_rank=0, device_id=0,
                                  layout_kind=lay.kind.value, num_blocks=lay.num_blocks,
                                  tokens_per_block=lay.tokens_per_block, num_heads=lay.num_heads,
                                  head_size=lay.head_size, itemsize=lay.itemsize, num_layers=lay.num_layers,
                                  host_segment="/flexkv-nonexistent", tensor_offsets=[0] * lay.num_tensors)
        reply = _ask(sock, hijack)
        assert isinstance(reply, cm.ErrorReplyMsg) and "registered by another live connection" in reply.error
        assert kvm.stats()["pid:device-0-0"] == pid and kvm.is_ready(), "the live rank's worker stayed"
        x = tokens(4 * T, seed=24)
        put = kvm.put_async(x, slots_for(SRC, len(x)))
        assert kvm.wait(put, timeout=20)[put].status is TaskStatus.SUCCESS
        poison(bufs, DST)
        get = kvm.get_async(x, slots_for(DST, len(x)))
        assert kvm.wait(get, timeout=20)[get].status is TaskStatus.SUCCESS
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(SRC, DST, strict=True))
        kvm.check_invariants()


def test_matches_never_launched_expire_with_a_log_line(capfd: pytest.CaptureFixture[str]) -> None:
    model = small_model()
    with KVManager(model, small_cache(num_cpu_blocks=32, match_ttl_s=0.5)) as kvm:
        free = kvm.stats()["cpu_free_blocks"]
        put, mask = kvm.put_match(tokens(8 * T, seed=25))
        assert mask.all() and kvm.stats()["cpu_free_blocks"] == free - 8
        _wait_until(lambda: kvm.stats()["num_tasks"] == 0, what="the match to expire")
        assert kvm.stats()["cpu_free_blocks"] == free
        res = kvm.wait(put)[put]
        assert res.status is TaskStatus.FAILED and "never launched" in res.error
        kvm.launch(put, slots_for(list(range(8)), 8 * T))  # too late: ignored, still FAILED
        assert kvm.wait(put)[put].status is TaskStatus.FAILED
        kvm.check_invariants()
    assert "never launched: released after match_ttl_s=0.5" in capfd.readouterr().err


def test_cancel_of_a_running_get_is_a_no_op_and_wait_reports_its_real_end() -> None:
    """FlexKV's rule: cancel applies to tasks not yet running. With the device worker stopped mid get,
    cancel changes nothing: no final status until the worker ran, then SUCCESS with the right bytes."""
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 32, seed=5) as (kvm, bufs):
        src, dst = list(range(8)), list(range(16, 24))
        x = tokens(8 * T, seed=26)
        put = kvm.put_async(x, slots_for(src, len(x)))
        assert kvm.wait(put, timeout=20)[put].status is TaskStatus.SUCCESS
        poison(bufs, dst)
        worker = int(kvm.stats()["pid:device-0-0"])
        os.kill(worker, signal.SIGSTOP)
        try:
            get = kvm.get_async(x, slots_for(dst, len(x)))
            assert kvm.wait(get, timeout=0.5)[get].status is TaskStatus.TIMEOUT
            kvm.cancel(get)
            assert kvm.wait(get, timeout=0.5)[get].status is TaskStatus.TIMEOUT, "no final status while it runs"
            assert kvm.try_wait(get)[get].status is TaskStatus.UNREADY
        finally:
            os.kill(worker, signal.SIGCONT)
        res = kvm.wait(get, timeout=20)[get]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(src, dst, strict=True))
        # a match not yet launched is cancelled: released now, CANCELLED, and a later launch is ignored
        free = kvm.stats()["cpu_free_blocks"]
        tid, mask = kvm.put_match(tokens(4 * T, seed=27))
        assert mask.all()
        kvm.cancel(tid)
        assert kvm.wait(tid)[tid].status is TaskStatus.CANCELLED
        assert kvm.stats()["cpu_free_blocks"] == free
        kvm.launch(tid, slots_for([4, 5, 6, 7], 4 * T))
        assert kvm.wait(tid)[tid].status is TaskStatus.CANCELLED
        kvm.check_invariants()


def test_a_killed_servers_pool_is_removed_at_the_next_start_and_a_live_one_never(tmp_path: Path) -> None:
    model = small_model()
    first = _server(model, small_cache(), tmp_path / "a")
    second = third = None
    try:
        with KVManager(model, small_cache(), f"ipc://{tmp_path}/a/server.sock") as a:
            pool_a = a._c.server_info["pool_name"]
            assert pool_a in list_flexkv_segments()
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
        assert pool_a in list_flexkv_segments(), "a SIGKILLed server leaves its pool behind"
        second = _server(model, small_cache(), tmp_path / "b")
        with KVManager(model, small_cache(), f"ipc://{tmp_path}/b/server.sock") as b:
            assert pool_a not in list_flexkv_segments(), "the next server start removed it"
            pool_b = b._c.server_info["pool_name"]
            third = _server(model, small_cache(), tmp_path / "c")
            with KVManager(model, small_cache(), f"ipc://{tmp_path}/c/server.sock") as c:
                assert c._c.server_info["pool_name"] != pool_b
                assert pool_b in list_flexkv_segments(), "a live server's pool is never removed"
                tid, _ = b.put_match(tokens(4 * T, seed=28))
                b.cancel(tid)
                assert b.wait(tid)[tid].status is TaskStatus.CANCELLED
    finally:
        for s in (first, second, third):
            if s is not None:
                _stop(s)
    assert pool_a not in list_flexkv_segments()


def test_wait_timeouts_inf_and_nan_are_decided_before_anything_is_sent(raw: Any) -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=6) as (kvm, _bufs):
        x = tokens(4 * T, seed=29)
        put = kvm.put_async(x, slots_for(SRC, len(x)))
        assert kvm.wait(put, timeout=float("inf"))[put].status is TaskStatus.SUCCESS
        for bad in (float("nan"), -1.0, "1"):
            with pytest.raises(InvalidRequest, match="timeout must be"):
                kvm.wait(put, timeout=bad)  # type: ignore[arg-type]
        sock = raw(kvm.server_address)
        sid = _hello(sock)
        for t in (float("inf"), float("nan"), -0.5, 1e300):
            reply = _ask(sock, cm.WaitMsg(client_id=0, session_id=sid, req_id=3, task_ids=[1], timeout_s=t))
            assert isinstance(reply, cm.ErrorReplyMsg) and "timeout_s must be a finite number" in reply.error
        assert kvm.stats()["num_waits"] == 0
        assert kvm.wait(put, timeout=0)[put].status is TaskStatus.SUCCESS
        kvm.check_invariants()


def test_the_result_cache_is_bounded_by_bytes() -> None:
    model = small_model()
    bound = 1 << 16
    with KVManager(model, small_cache(result_cache_bytes=bound)) as kvm:
        ids = []
        for i in range(300):
            tid, _ = kvm.get_match(tokens(32 * T, seed=i))
            kvm.cancel(tid)
            ids.append(tid)
        res = kvm.wait(ids[-20:])
        assert all(r.status is TaskStatus.CANCELLED for r in res.values()), "recent results are kept"
        stats = kvm.stats()
        assert 0 < stats["result_cache_bytes"] <= bound
        assert 20 <= stats["num_results"] < 300
        assert kvm.wait(ids[0])[ids[0]].status is TaskStatus.NOTFOUND, "the oldest went first"
        kvm.check_invariants()
