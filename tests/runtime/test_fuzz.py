"""Seeded fuzz of both server sockets (issue 13 §1): ~16k frames on the client socket from sessions
and from connections that never said hello, ~4k on the worker socket from identities the server did
not spawn. Random bytes, truncated messages, valid types with wrong field types, huge lengths,
negative and out-of-range block ids, unknown task ids, double launches. Afterwards: the server is
alive, its RSS grew little, no task, wait, match or lock is left once the fuzzing sessions said bye,
the invariants hold, a forged completion finished nothing, and a put/get is byte-exact."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from flexkv.layout import LayoutKind
from flexkv.protocol import client_msgs as cm
from flexkv.protocol import worker_msgs as wm
from flexkv.protocol.codec import CLIENT_REQUESTS, SERVER_REPLIES, WORKER_TO_SERVER
from flexkv.types import TaskStatus
from tests.runtime.kvtest import T, block_bytes, poison, serving, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(180)
SEED = 20261201
NUM_CLIENT_FRAMES = 16_000
NUM_WORKER_FRAMES = 4_000
ENGINE_BLOCKS = 32
RSS_GROWTH_LIMIT = 64 << 20
_ODD_VALUES: list[Any] = ["x", -1, 2**63 - 1, -(2**63), 1.5, float("nan"), None, [], {}, [1, "a"], b"\x00" * 9, True]


class ClientFuzzer:
    """Makes one client-socket message (a list of frames) at a time, from a seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.matched: list[int] = []  # task ids matched so far (launched again and again)
        self.next_id = 0

    def frames(self, session_id: int) -> list[bytes]:
        r = self.rng.random()
        if r < 0.08:
            return [self.rng.randbytes(self.rng.randint(0, 64)) for _ in range(self.rng.randint(1, 3))]
        if r < 0.16:
            frames = self._valid(session_id)
            head = frames[0][: self.rng.randint(0, max(0, len(frames[0]) - 1))]
            return [head, *frames[1: self.rng.randint(1, len(frames))]]
        if r < 0.30:
            return self._wrong_types(session_id)
        if r < 0.34:
            return self._huge()
        return self._valid(session_id)

    def _id(self) -> int:
        """Mostly fresh task ids, often one used before (duplicates, double launches), a few weird ones."""
        r = self.rng.random()
        if r < 0.55 or not self.matched:
            self.next_id += 1
            return self.next_id
        if r < 0.9:
            return self.rng.choice(self.matched[-64:])
        return self.rng.choice([-1, 0, 2**32, 2**63 - 1, 2**64 - 1, -(2**63)])

    def _session(self, session_id: int) -> int:
        return session_id if self.rng.random() < 0.9 else self.rng.choice([0, session_id + 1, -5, 2**40])

    def _client(self) -> int:
        return 0 if self.rng.random() < 0.93 else self.rng.choice([1, -1, 2**40])

    def _slots(self, num_tokens: int) -> np.ndarray:
        blocks = -(-num_tokens // T)
        r = self.rng.random()
        if r < 0.6:
            ids = self.rng.sample(range(ENGINE_BLOCKS), min(blocks, ENGINE_BLOCKS))
            ids += [0] * (blocks - len(ids))
        elif r < 0.8:  # negative and out-of-range block ids
            ids = [self.rng.randint(-4, ENGINE_BLOCKS + 8) for _ in range(blocks)]
        else:
            return np.asarray([self.rng.randint(-100, 10_000) for _ in range(self.rng.randint(0, num_tokens + 2))],
                              dtype=np.int64)
        return slots_for(ids, num_tokens) if blocks else np.zeros(0, dtype=np.int64)

    def _tokens(self) -> np.ndarray:
        prompt = self.rng.randint(0, 5)  # few prompts: hits, shared prefixes, evictions
        return tokens(self.rng.choice([0, 1, T, 3 * T, 8 * T + 1, 16 * T]), seed=prompt)

    def _valid(self, sid: int) -> list[bytes]:
        kind = self.rng.choice(["match", "match", "async", "async", "launch", "launch", "cancel", "wait", "register",
                                "query", "hello"])
        base: dict[str, Any] = {"client_id": self._client(), "session_id": self._session(sid)}
        arrays: list[Any] = []
        msg: msgspec.Struct
        if kind == "match":
            toks = self._tokens()
            tid = self._id()
            match_cls: type[cm.GetMatchMsg] = self.rng.choice([cm.GetMatchMsg, cm.PutMatchMsg])
            if self.rng.random() < 0.5:
                n = toks.shape[0] if self.rng.random() < 0.8 else self.rng.choice([-1, 2**62, 3])
                num_hashes = toks.shape[0] // T  # a huge num_tokens comes with a short hash frame
                arrays = [np.arange(num_hashes, dtype=np.uint64) + self.rng.randint(0, 3)]
                msg = match_cls(**base, req_id=self.rng.randint(1, 10**6), task_id=tid, num_tokens=n)
            else:
                arrays = [toks]
                msg = match_cls(**base, req_id=self.rng.randint(1, 10**6), task_id=tid, namespace=self._namespace())
            self.matched.append(tid)
        elif kind == "async":
            toks = self._tokens()
            async_cls: type[cm.GetAsyncMsg] = self.rng.choice([cm.GetAsyncMsg, cm.PutAsyncMsg])
            msg = async_cls(**base, task_id=self._id(), namespace=self._namespace())
            arrays = [toks, self._slots(toks.shape[0])]
        elif kind == "launch":
            ids = [self.rng.choice(self.matched[-64:]) if self.matched and self.rng.random() < 0.7 else self._id()
                   for _ in range(self.rng.randint(1, 3))]
            msg = cm.LaunchMsg(**base, task_ids=ids)
            arrays = [self._slots(self.rng.choice([T, 3 * T, 8 * T + 1, 16 * T])) for _ in ids]
            if self.rng.random() < 0.1:
                arrays = arrays[:-1]
        elif kind == "cancel":
            msg = cm.CancelMsg(**base, task_ids=[self._id() for _ in range(self.rng.randint(0, 4))])
        elif kind == "wait":
            timeout = self.rng.choice([0.0, 0.0, 0.01, 0.05, float("inf"), float("nan"), -1.0, 1e300])
            msg = cm.WaitMsg(**base, req_id=self.rng.randint(1, 10**6), task_ids=[self._id() for _ in range(3)],
                             timeout_s=timeout, completely=self.rng.random() < 0.5)
        elif kind == "register":
            msg = cm.RegisterKVMsg(**base, req_id=1, tp_rank=self.rng.choice([0, 0, 1, -1]), device_id=0,
                                   layout_kind=self.rng.choice(["vllm_kv_first", "sglang", "nope"]),
                                   num_blocks=self.rng.choice([ENGINE_BLOCKS, 0, -1, 2**40]), tokens_per_block=T,
                                   num_heads=4, head_size=8, itemsize=2, num_layers=3,
                                   host_segment=self.rng.choice(["/flexkv-nonexistent", None, "x"]),
                                   tensor_offsets=[0, 0, 0], cuda_event=self.rng.choice([b"", b"\x01" * 64]))
        elif kind == "query":
            msg = cm.QueryMsg(**base, req_id=2, what=self.rng.choice(["is_ready", "stats", "nope", ""]))
        else:  # hellos that are refused (a valid one would end the session, tested elsewhere)
            msg = cm.HelloMsg(client_id=self.rng.choice([7, -1]), req_id=3, pid=os.getpid(), host="fuzz",
                              role=self.rng.choice(["manager", "tp", "boss"]))
        return [bytes(f) for f in CLIENT_REQUESTS.encode(msg, arrays)]

    def _namespace(self) -> list[str] | None:
        return None if self.rng.random() < 0.8 else ["lora", str(self.rng.randint(0, 2))]

    def _wrong_types(self, sid: int) -> list[bytes]:
        frames = self._valid(sid)
        fields = msgspec.msgpack.decode(frames[0])
        key = self.rng.choice(sorted(fields))
        fields[key] = self.rng.choice(_ODD_VALUES)
        return [msgspec.msgpack.encode(fields), *frames[1:]]

    def _huge(self) -> list[bytes]:
        r = self.rng.random()
        if r < 0.4:  # msgpack headers claiming 4 G entries / bytes
            return [self.rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                                     b"\xc6\xff\xff\xff\xff"]) + self.rng.randbytes(8)]
        if r < 0.7:  # a long list of task ids
            msg = cm.CancelMsg(client_id=0, task_ids=[self.rng.randint(0, 2**31) for _ in range(5000)])
            return [bytes(f) for f in CLIENT_REQUESTS.encode(msg)]
        head = msgspec.msgpack.encode({"type": "GetAsyncMsg", "client_id": 0, "task_id": 5})
        return [head, bytes(64 << 10), bytes(16 << 10)]  # 4 MiB of tokens, a slot mapping that does not fit


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _drain(sock: zmq.Socket[bytes]) -> int:
    n = 0
    while sock.poll(0):
        sock.recv_multipart()
        n += 1
    return n


def _hello(sock: zmq.Socket[bytes]) -> int:
    sock.send_multipart(CLIENT_REQUESTS.encode(cm.HelloMsg(client_id=0, req_id=1, pid=os.getpid(), host="fuzz",
                                                           role="manager")))
    while True:
        assert sock.poll(10_000), "no hello reply"
        reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
        if isinstance(reply, cm.OkReplyMsg) and "session_id" in reply.info:
            return int(reply.info["session_id"])


def _await_bye(sock: zmq.Socket[bytes]) -> None:
    """Read replies until the bye's (req_id 99) comes: closing before would drop a bye still queued."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sock.poll(100):
            reply, _ = SERVER_REPLIES.decode(sock.recv_multipart())
            if isinstance(reply, cm.OkReplyMsg) and reply.req_id == 99:
                return
    raise AssertionError("no reply to bye")


def _fuzz_clients(address: str, rng: random.Random) -> list[tuple[zmq.Socket[bytes], int]]:
    """Send the client-socket frames; returns the sessions opened (to say bye later)."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sessions, strangers = [], []
    for _ in range(4):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sessions.append((sock, _hello(sock)))
    for _ in range(2):  # connections that never say hello
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        strangers.append((sock, rng.randint(1, 50)))
    fuzzer = ClientFuzzer(rng)
    every = sessions + strangers
    for i in range(NUM_CLIENT_FRAMES):
        sock, sid = every[i % len(every)]
        sock.send_multipart(fuzzer.frames(sid))
        if i % 64 == 0:
            for s, _ in every:
                _drain(s)
    for s, _ in strangers:
        s.close()
    return sessions


def _fuzz_workers(worker_address: str, rng: random.Random) -> None:
    """Frames from identities the server never spawned: hellos, completions of any op id, garbage."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    socks = []
    for _ in range(40):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        name = rng.choice(["device-9-9", "ssd-7", "remote-3", "x"]) + rng.randbytes(3).hex()
        sock.setsockopt(zmq.IDENTITY, name.encode())
        sock.connect(worker_address)
        socks.append((sock, name))
    for i in range(NUM_WORKER_FRAMES):
        sock, name = socks[i % len(socks)]
        r = rng.random()
        wid = name if r < 0.7 else rng.choice(["device-0-0", "ssd-0", name + "/lane0"])
        frames: list[Any]
        if r < 0.15:
            frames = [rng.randbytes(rng.randint(0, 40))]
        elif r < 0.3:
            frames = WORKER_TO_SERVER.encode(wm.WorkerHelloMsg(worker_id=wid, pid=rng.randint(-1, 10**6),
                                                               op_types=[rng.randint(-1, 9)]))
        else:
            ids = [rng.randint(-2, 3000) for _ in range(rng.randint(0, 50))]
            errors = [rng.choice(["", "", "EIO"]) for _ in ids]
            if rng.random() < 0.1:
                errors = errors[:-1]
            frames = WORKER_TO_SERVER.encode(wm.OpsDoneMsg(worker_id=wid, op_ids=ids, errors=errors))
        sock.send_multipart([bytes(f) for f in frames])
    time.sleep(0.2)
    for sock, _ in socks:
        sock.close()


def _wait_until(cond: Any, timeout_s: float, what: str, state: object = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}"
        time.sleep(0.05)


def _put_get_exact(kvm: Any, bufs: Any, seed: int) -> None:
    src, dst = list(range(8)), list(range(16, 24))
    x = tokens(8 * T, seed=seed)
    put = kvm.put_async(x, slots_for(src, len(x)))
    assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
    poison(bufs, dst)
    get = kvm.get_async(x, slots_for(dst, len(x)))
    res = kvm.wait(get, timeout=30)[get]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
    assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(src, dst, strict=True))


def test_fuzzing_both_sockets_leaves_the_server_alive_clean_and_exact() -> None:
    rng = random.Random(SEED)
    model = small_model()
    cache = small_cache(num_cpu_blocks=64, result_cache_bytes=1 << 20, match_ttl_s=1.0)
    with serving(model, cache, LayoutKind.VLLM_KV_FIRST, ENGINE_BLOCKS, seed=7) as (kvm, bufs):
        _put_get_exact(kvm, bufs, seed=100)
        server_pid = int(kvm.stats()["server_pid"])
        rss_before = _rss_bytes(server_pid)
        t0 = time.monotonic()
        sessions = _fuzz_clients(kvm.server_address, rng)
        assert kvm.is_ready(), "the server survived the client-socket fuzz"
        for sock, sid in sessions:
            _drain(sock)
            sock.send_multipart(CLIENT_REQUESTS.encode(cm.ByeMsg(client_id=0, session_id=sid, req_id=99)))
        for sock, _ in sessions:
            _await_bye(sock)
            sock.close()

        last: dict[str, Any] = {}

        def settled() -> bool:
            last.update(kvm.stats())
            return (last["num_tasks"] == 0 and last["in_flight_ops"] == 0 and last["num_ops_in_flight"] == 0
                    and last["num_sessions"] == 2)

        _wait_until(settled, 30, "the fuzzing sessions' work to end", last)
        stats = kvm.stats()
        assert stats["num_unlaunched_matches"] == 0 and stats["num_waits"] == 0
        kvm.check_invariants()  # also: lock counts equal the (no) live reservations; sessions own everything

        # A get in flight with its worker stopped: forged completions on the worker socket must not end it.
        x = tokens(8 * T, seed=101)
        put = kvm.put_async(x, slots_for(list(range(8)), len(x)))
        res = kvm.wait(put, timeout=30)[put]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
        poison(bufs, list(range(24, 32)))
        worker = int(kvm.stats()["pid:device-0-0"])
        os.kill(worker, signal.SIGSTOP)
        try:
            get = kvm.get_async(x, slots_for(list(range(24, 32)), len(x)))
            worker_address = kvm.server_address.replace("server.sock", "workers.sock")
            _fuzz_workers(worker_address, rng)
            assert kvm.wait(get, timeout=0.3)[get].status is TaskStatus.TIMEOUT, "a forged completion ended it"
            assert all(set(block_bytes(bufs, d)) == {0xAB} for d in range(24, 32))
        finally:
            os.kill(worker, signal.SIGCONT)
        res = kvm.wait(get, timeout=30)[get]
        assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), range(24, 32), strict=True))
        elapsed = time.monotonic() - t0
        assert kvm.is_ready() and int(kvm.stats()["pid:device-0-0"]) == worker, "no worker replaced or lost"
        kvm.check_invariants()
        growth = _rss_bytes(server_pid) - rss_before
        assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth / 2**20:.1f} MiB"
        _put_get_exact(kvm, bufs, seed=102)
        kvm.check_invariants()
        print(f"fuzz: {NUM_CLIENT_FRAMES} client + {NUM_WORKER_FRAMES} worker frames in {elapsed:.1f} s, "
              f"server RSS {growth / 2**20:+.1f} MiB")
