"""The scheduler server: one process, one thread owning the control plane, two ZeroMQ ROUTERs.

Engine clients (KVManager, KVTPClient) talk to the client ROUTER; worker processes to the worker
ROUTER. Every message is decoded by the decoder of its socket and dispatched through one table that
is checked complete at start-up. A malformed or unknown message gets an error reply (when it can be
attributed) and the loop carries on: no input kills the server or leaves a reservation behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from flexkv.common.config import CacheConfig, ModelConfig, RemoteConfig, configs_to_json, kv_fingerprint
from flexkv.layout import BlockFirstLayout, KVCacheLayout
from flexkv.native.hasher import encode_namespace
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.codec import (
    CLIENT_REQUESTS,
    SERVER_REPLIES,
    WORKER_TO_SERVER,
    ProtocolError,
    frame_array,
    mask_to_range,
)
from flexkv.protocol.worker_msgs import OpsDoneMsg, WorkerByeMsg, WorkerHelloMsg
from flexkv.remote import RemoteStore, RemoteUnavailable, open_remote_store
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.graph import TransferOp
from flexkv.scheduler.remote_lookup import RemoteLookup
from flexkv.scheduler.supervisor import OpResult, WorkerSupervisor, device_worker_id
from flexkv.shm import SharedPool, make_pool_name
from flexkv.types import ConfigError, FlexKVError, KVResponse, OpType, TaskStatus, TaskType

log = logging.getLogger("flexkv.server")

TaskKey = tuple[int, int]
_FINAL = (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.NOTFOUND)
_TICK_S = 0.1
_RESULT_CACHE = 65536


@dataclasses.dataclass
class _Conn:
    client_id: int
    role: str
    pid: int
    host: str


@dataclasses.dataclass
class _Wait:
    identity: bytes
    req_id: int
    client_id: int
    task_ids: list[int]
    deadline: float
    completely: bool


def default_runtime_dir() -> str:
    """A private (0700) directory for the IPC socket files."""
    base = os.environ.get("FLEXKV_RUNTIME_DIR") or None
    return tempfile.mkdtemp(prefix="flexkv-", dir=base)


class SchedulerServer:
    """Owns index, pools, tasks and workers. Construct, then ``serve_forever()``; ``close()`` cleans up."""

    def __init__(self, model: ModelConfig, cache: CacheConfig, client_address: str | None = None,
                 runtime_dir: str | None = None, parent_pid: int | None = None) -> None:
        self.model = model
        self._closed = False
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = runtime_dir or default_runtime_dir()
        os.chmod(self.runtime_dir, 0o700)
        self.client_address = client_address or f"ipc://{self.runtime_dir}/server.sock"
        self.worker_address = f"ipc://{self.runtime_dir}/workers.sock"
        self._parent_pid = parent_pid
        self._host = socket.gethostname()
        self._lookup_store: RemoteStore | None = None
        self._ctx = zmq.Context()
        try:
            cache = self._open_remote_lookup(model, cache)
            self.cache = cache
            self.control = ControlPlane(model, cache, remote_lookup=self._remote_lookup)
            self.block_bytes = model.block_bytes(cache.tokens_per_block)
            self.block_first = BlockFirstLayout(model, cache.tokens_per_block)
            self.pool = SharedPool.create(make_pool_name("cpu"), cache.num_cpu_blocks * self.block_bytes,
                                          progress=_prefault_progress)
            self._clients = self._bind(zmq.ROUTER, self.client_address)
            # Workers set no identity: the ROUTER names each connection, and a hello binds it (supervisor).
            self._workers_sock = self._bind(zmq.ROUTER, self.worker_address)
        except BaseException:
            self.close()  # e.g. the address is taken: leave no segment or socket file behind
            raise
        base_spec = {"worker_address": self.worker_address, "pool_name": self.pool.name,
                     "pool_block_bytes": self.block_bytes, "pool_num_blocks": cache.num_cpu_blocks,
                     "configs": configs_to_json(model, cache)}
        self.supervisor = WorkerSupervisor(self._workers_sock, base_spec, model.tp_size, model.use_mla)
        self._conns: dict[bytes, _Conn] = {}
        self._registered: set[tuple[int, int]] = set()
        self._launched: set[TaskKey] = set()  # launched (or cancelled) tasks still in the control plane
        self._op_keys: dict[int, TaskKey] = {}  # dispatched op -> its task
        # Final results of retired tasks, (engine part, every op), kept for later waits; bounded.
        self._results: OrderedDict[TaskKey, tuple[KVResponse, KVResponse]] = OrderedDict()
        self._waits: list[_Wait] = []
        self._running = False
        self._handlers: dict[type, Callable[[bytes, Any, list[memoryview]], None]] = {
            cm.HelloMsg: self._on_hello,
            cm.GetMatchMsg: self._on_match,
            cm.PutMatchMsg: self._on_match,
            cm.GetAsyncMsg: self._on_async,
            cm.PutAsyncMsg: self._on_async,
            cm.LaunchMsg: self._on_launch,
            cm.CancelMsg: self._on_cancel,
            cm.WaitMsg: self._on_wait,
            cm.RegisterKVMsg: self._on_register,
            cm.QueryMsg: self._on_query,
        }
        missing = set(typing.get_args(cm.ClientRequest)) - set(self._handlers)
        assert not missing, f"dispatch table incomplete: {missing}"
        try:
            self._start_tier_workers()
        except BaseException:
            self.close()
            raise
        log.info("flexkv server at %s: %d CPU blocks x %d bytes (%.2f GiB) in %s; SSD %s; remote %s",
                 self.client_address, cache.num_cpu_blocks, self.block_bytes, self.pool.nbytes / 2**30,
                 self.pool.name, cache.num_ssd_blocks if cache.enable_ssd else "off",
                 cache.remote.backend.value if cache.enable_remote else "off")  # type: ignore[union-attr]

    def _open_remote_lookup(self, model: ModelConfig, cache: CacheConfig) -> CacheConfig:
        """Open the server's own connection to the remote store, used for existence checks (the remote
        tier's index is the store, so several servers share prefixes). Unreachable at start: an error
        when ``remote.required``, else one warning and the remote tier is disabled."""
        self._remote_lookup: RemoteLookup | None = None
        if not cache.enable_remote:
            return cache
        assert isinstance(cache.remote, RemoteConfig)
        try:
            store = open_remote_store(cache.remote, kv_fingerprint(model, cache.tokens_per_block),
                                      connect_timeout_s=0.5, op_timeout_s=1.0)
        except RemoteUnavailable as e:
            if cache.remote.required:
                raise ConfigError(f"remote store unreachable at start: {e} (set remote.required=false to start "
                                  "without the remote tier)") from None
            log.warning("remote store unreachable at start (%s); remote tier disabled", e)
            return dataclasses.replace(cache, enable_remote=False)
        self._lookup_store = store
        self._remote_lookup = RemoteLookup(store.count_prefix, unavailable=(RemoteUnavailable, OSError))
        return cache

    def _bind(self, kind: int, address: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(address)
        return sock

    def _start_tier_workers(self, timeout_s: float = 120.0) -> None:
        """Start the SSD/remote workers and wait until they run; a worker that cannot start (missing
        directory, no space, store unreachable) fails the server's start with its reason logged above."""
        if self.cache.enable_ssd:
            for d in self.cache.ssd_cache_dir:
                if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
                    raise ConfigError(f"ssd_cache_dir: {d!r} is not a writable directory")
            self.supervisor.spawn("ssd-0", {"kind": "ssd", "op_types": [int(OpType.DISK2H), int(OpType.H2DISK)]})
        if self.cache.enable_remote:
            ops = [int(OpType.REMOTE2H), int(OpType.H2REMOTE)]
            self.supervisor.spawn("remote-0", {"kind": "remote", "op_types": ops})
        deadline = time.monotonic() + timeout_s
        while not all(h.ready for h in self.supervisor.workers.values()):
            for h in self.supervisor.workers.values():
                if h.proc is not None and h.proc.poll() is not None:
                    raise ConfigError(f"{h.worker_id} worker could not start (exit code {h.proc.returncode}); "
                                      "its error is logged above")
            if time.monotonic() > deadline:
                raise ConfigError(f"tier workers not ready after {timeout_s:.0f} s")
            if self._workers_sock.poll(100):
                self._drain(self._workers_sock, self._on_worker_frames)

    # -- loop -----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run until a shutdown request, SIGINT/SIGTERM, or the parent process (library mode) is gone."""
        self._running = True
        poller = zmq.Poller()
        poller.register(self._clients, zmq.POLLIN)
        poller.register(self._workers_sock, zmq.POLLIN)
        next_tick = 0.0
        while self._running:
            events = dict(poller.poll(timeout=int(_TICK_S * 1000)))
            if self._workers_sock in events:
                self._drain(self._workers_sock, self._on_worker_frames)
            if self._clients in events:
                self._drain(self._clients, self._on_client_frames)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_S
                self._tick()
            self._check_waits()

    def stop(self, *_: object) -> None:
        self._running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(256):  # bounded so one busy socket cannot starve the other
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _tick(self) -> None:
        failed, gone = self.supervisor.check_liveness()
        self._complete(failed)
        for worker_id in gone:
            self._lane_gone(worker_id, "its engine process is gone")
        for identity, conn in list(self._conns.items()):
            if conn.host == self._host and not _pid_alive(conn.pid):
                self._client_gone(identity, conn)
        if self._parent_pid is not None and not _pid_alive(self._parent_pid):
            log.warning("parent process %d is gone; shutting down", self._parent_pid)
            self._running = False

    # -- client side ----------------------------------------------------------------------------
    def _on_client_frames(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        req_id = -1
        try:
            msg, arrays = CLIENT_REQUESTS.decode(frames[1:])
            req_id = getattr(msg, "req_id", -1)
            self._handlers[type(msg)](identity, msg, arrays)
        except ProtocolError as e:
            log.warning("bad client message: %s", e)
            self._reply(identity, cm.ErrorReplyMsg(req_id=-1, error=str(e), kind="ProtocolError"))
        except FlexKVError as e:
            self._reply(identity, cm.ErrorReplyMsg(req_id=req_id, error=str(e), kind=type(e).__name__))
        except Exception as e:
            log.exception("error handling a client message")
            self._reply(identity, cm.ErrorReplyMsg(req_id=req_id, error=f"internal error: {e!r}", kind="InternalError"))

    def _reply(self, identity: bytes, msg: cm.ServerReply, arrays: list[Any] | None = None) -> None:
        if msg.req_id < 0 and not isinstance(msg, cm.ErrorReplyMsg):
            return
        self._clients.send_multipart([identity, *SERVER_REPLIES.encode(msg, arrays or [])], copy=False)

    def _on_hello(self, identity: bytes, msg: cm.HelloMsg, _: list[memoryview]) -> None:
        if not 0 <= msg.client_id < self.model.dp_size:
            raise _invalid(f"dp_client_id {msg.client_id} out of range for dp_size={self.model.dp_size}")
        self._conns[identity] = _Conn(msg.client_id, msg.role, msg.pid, msg.host)
        info: dict[str, int | float | str | bool] = {
                "tokens_per_block": self.cache.tokens_per_block, "pool_name": self.pool.name,
                "num_cpu_blocks": self.cache.num_cpu_blocks, "block_bytes": self.block_bytes}
        self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info=info))

    def _task_inputs(self, msg: Any, arrays: list[memoryview], with_slots: bool) -> tuple[Any, ...]:
        want = 1 + int(with_slots) + int(msg.has_mask)
        if len(arrays) != want:
            raise ProtocolError(f"{type(msg).__name__}: expected {want} array frames, got {len(arrays)}")
        tokens = frame_array(arrays[0], np.int64, "token_ids")
        slots = frame_array(arrays[1], np.int64, "slot_mapping") if with_slots else None
        mask = frame_array(arrays[-1], np.bool_, "token_mask") if msg.has_mask else None
        return tokens, slots, mask, encode_namespace(msg.namespace)

    def _check_new_key(self, key: TaskKey) -> None:
        if key in self._launched or key in self._results or self.control.poll(key).status is not TaskStatus.NOTFOUND:
            raise _invalid(f"task id {key[1]} of client {key[0]} is already in use")

    def _match(self, key: TaskKey, is_get: bool, tokens: Any, mask: Any, ns: bytes) -> np.ndarray:
        self._check_new_key(key)
        match = self.control.get_match if is_get else self.control.put_match
        return match(key, tokens, mask, ns)

    def _on_match(self, identity: bytes, msg: cm.GetMatchMsg, arrays: list[memoryview]) -> None:
        key = (msg.client_id, msg.task_id)
        is_get = not isinstance(msg, cm.PutMatchMsg)
        if msg.num_tokens >= 0:  # the client hashed its tokens
            if len(arrays) != 1 + int(msg.has_mask):
                raise ProtocolError(f"{type(msg).__name__}: expected {1 + int(msg.has_mask)} array frames")
            hashes = frame_array(arrays[0], np.uint64, "block_hashes")
            mask = frame_array(arrays[1], np.bool_, "token_mask") if msg.has_mask else None
            self._check_new_key(key)
            ret = self.control.match_hashes(TaskType.GET if is_get else TaskType.PUT, key, hashes, msg.num_tokens,
                                            mask)
        else:
            tokens, _, mask, ns = self._task_inputs(msg, arrays, with_slots=False)
            ret = self._match(key, is_get, tokens, mask, ns)
        n, begin, end, frame = mask_to_range(ret)
        reply = cm.MatchReplyMsg(req_id=msg.req_id, task_id=msg.task_id, num_tokens=n, mask_begin=begin, mask_end=end)
        self._reply(identity, reply, [frame] if frame is not None else [])

    def _on_async(self, _: bytes, msg: cm.GetAsyncMsg, arrays: list[memoryview]) -> None:
        key = (msg.client_id, msg.task_id)
        try:
            tokens, slots, mask, ns = self._task_inputs(msg, arrays, with_slots=True)
            self._match(key, not isinstance(msg, cm.PutAsyncMsg), tokens, mask, ns)
            self._launch(key, slots)
        except (FlexKVError, ProtocolError) as e:
            self._fail_unstarted(key, str(e))

    def _on_launch(self, _: bytes, msg: cm.LaunchMsg, arrays: list[memoryview]) -> None:
        if len(arrays) != len(msg.task_ids):
            for tid in msg.task_ids:
                self._fail_unstarted((msg.client_id, tid), "launch: one slot_mapping frame per task id expected")
            return
        for tid, frame in zip(msg.task_ids, arrays, strict=True):
            key = (msg.client_id, tid)
            try:
                self._launch(key, frame_array(frame, np.int64, "slot_mapping"))
            except (FlexKVError, ProtocolError) as e:
                self._fail_unstarted(key, str(e))

    def _launch(self, key: TaskKey, slots: Any) -> None:
        ops = self.control.launch(key, slots)
        self._launched.add(key)
        self._dispatch(ops)
        self._retire([key])  # a task with nothing to move is already done

    def _fail_unstarted(self, key: TaskKey, error: str) -> None:
        """A fire-and-forget request failed before it ran: roll back and report FAILED at wait."""
        log.info("task %s failed: %s", key, error)
        if key not in self._launched and self.control.poll(key).status is TaskStatus.UNREADY:
            self.control.cancel(key)
            self.control.release(key)
        if key not in self._launched and key not in self._results:
            failed = KVResponse(TaskStatus.FAILED, key[1], None, error)
            self._remember(key, failed, failed)

    def _on_cancel(self, _: bytes, msg: cm.CancelMsg, __: list[memoryview]) -> None:
        for tid in msg.task_ids:
            key = (msg.client_id, tid)
            if self.control.poll(key).status is not TaskStatus.NOTFOUND:
                self.control.cancel(key)
                self._launched.add(key)  # cancelled tasks are final; waiting on them must not hang
                self._retire([key])

    def _on_wait(self, identity: bytes, msg: cm.WaitMsg, _: list[memoryview]) -> None:
        deadline = time.monotonic() + max(0.0, msg.timeout_s)
        self._waits.append(_Wait(identity, msg.req_id, msg.client_id, list(msg.task_ids), deadline, msg.completely))

    def _on_register(self, identity: bytes, msg: cm.RegisterKVMsg, _: list[memoryview]) -> None:
        if not 0 <= msg.tp_rank < self.model.tp_size:
            raise _invalid(f"tp_rank {msg.tp_rank} out of range for tp_size={self.model.tp_size}")
        if not 0 <= msg.client_id < self.model.dp_size:
            raise _invalid(f"dp_client_id {msg.client_id} out of range for dp_size={self.model.dp_size}")
        if msg.tokens_per_block != self.cache.tokens_per_block:
            raise _invalid(f"tokens_per_block {msg.tokens_per_block} != server's {self.cache.tokens_per_block}")
        reg: dict[str, Any] = {name: getattr(msg, name) for name in _REG_FIELDS}
        reg["kind"] = msg.layout_kind
        try:
            self.block_first.check_engine_layout(KVCacheLayout.from_fields(reg))
        except ValueError as e:
            raise _invalid(f"register rank {msg.tp_rank}: {e}") from None
        if not msg.engine_side and not msg.cuda_handles and not msg.host_segment:
            raise _invalid("register: neither a host segment nor CUDA handles given (nor engine_side)")
        if msg.cuda_event and (not msg.cuda_handles or len(msg.cuda_event) != 64):
            raise _invalid("register: cuda_event needs CUDA tensors and a 64-byte cudaIpcEventHandle_t")
        reg["cuda_handles"] = [h.hex() for h in msg.cuda_handles]
        reg["cuda_event"] = msg.cuda_event.hex()
        worker_id = device_worker_id(msg.client_id, msg.tp_rank)
        spec = {"kind": "device", "dp_client_id": msg.client_id, "tp_rank": msg.tp_rank, "registration": reg}
        key = (msg.client_id, msg.tp_rank)
        if msg.engine_side:
            self._register_lane(identity, msg.req_id, worker_id, key, spec)
            return
        handle = self.supervisor.spawn(worker_id, spec)

        def ready() -> None:
            self._registered.add(key)
            self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info={"worker": worker_id}))

        handle.on_ready.append(ready)

    def _register_lane(self, identity: bytes, req_id: int, worker_id: str, key: tuple[int, int],
                       spec: dict[str, Any]) -> None:
        """An engine-side lane (DESIGN §7b): reply at once with what the engine needs to run the device
        worker itself (its credential included); the rank counts as registered when the lane says hello."""
        self._registered.discard(key)
        handle = self.supervisor.expect_lane(worker_id, spec)
        handle.on_ready.append(lambda: self._registered.add(key))
        lane = self.supervisor.lane_spec(handle)
        info: dict[str, int | float | str | bool] = {"worker": worker_id, "lane_spec": json.dumps(lane)}
        self._reply(identity, cm.OkReplyMsg(req_id=req_id, info=info))

    def _lane_gone(self, worker_id: str, reason: str) -> None:
        """An engine-side lane stopped (or its process died): its rank is unregistered, its ops fail."""
        handle = self.supervisor.workers.get(worker_id)
        if handle is None:
            return
        log.warning("engine-side lane %s is gone (%s)", worker_id, reason)
        dp, rank = handle.spec["dp_client_id"], handle.spec["tp_rank"]
        self._registered.discard((dp, rank))
        self._complete(self.supervisor.remove(worker_id, reason))

    def _on_query(self, identity: bytes, msg: cm.QueryMsg, _: list[memoryview]) -> None:
        info: dict[str, int | float | str | bool]
        if msg.what == "is_ready":
            info = {"ready": self.is_ready()}
        elif msg.what == "stats":
            info = {**self.control.stats(), "in_flight_ops": self.supervisor.num_in_flight,
                    "num_workers": len(self.supervisor.workers), "server_pid": os.getpid()}
            for worker_id, handle in self.supervisor.workers.items():
                info[f"pid:{worker_id}"] = handle.proc.pid if handle.proc is not None else handle.pid
            for worker_id, reason in self.supervisor.down().items():
                info[f"down:{worker_id}"] = reason
            info["worker_msgs_refused"] = self.supervisor.num_refused
        elif msg.what == "check":
            self.control.check_invariants()
            info = {"ok": True}
        elif msg.what == "shutdown":
            self._running = False
            info = {"ok": True}
        else:
            raise _invalid(f"unknown query {msg.what!r}; allowed: is_ready, stats, check, shutdown")
        self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info=info))

    def is_ready(self) -> bool:
        want = {(d, r) for d in range(self.model.dp_size) for r in range(self.model.tp_size)}
        workers_ready = all(h.ready and not h.down_reason for h in self.supervisor.workers.values())
        return want <= self._registered and workers_ready

    # -- tasks and waits ------------------------------------------------------------------------
    def _status(self, key: TaskKey, completely: bool) -> KVResponse:
        if key in self._results:
            engine, full = self._results[key]
            return full if completely else engine
        return self.control.poll(key, completely)

    def _is_final(self, key: TaskKey, resp: KVResponse) -> bool:
        """Final for a wait: done, or matched but never launched (waiting cannot help)."""
        return resp.status in _FINAL or (resp.status is TaskStatus.UNREADY and key not in self._launched)

    def _check_waits(self) -> None:
        if not self._waits:
            return
        now = time.monotonic()
        keep: list[_Wait] = []
        for w in self._waits:
            keys = [(w.client_id, t) for t in w.task_ids]
            resps = [self._status(k, w.completely) for k in keys]
            done = all(self._is_final(k, r) for k, r in zip(keys, resps, strict=True))
            if not done and now < w.deadline:
                keep.append(w)
                continue
            statuses = [r.status if self._is_final(k, r) else TaskStatus.TIMEOUT
                        for k, r in zip(keys, resps, strict=True)]
            errors = [r.error for r in resps]
            ranges = [mask_to_range(r.return_mask) for r in resps]
            reply = cm.WaitReplyMsg(req_id=w.req_id, task_ids=w.task_ids, statuses=[int(s) for s in statuses],
                                    errors=errors, num_tokens=[r[0] for r in ranges],
                                    mask_begins=[r[1] for r in ranges], mask_ends=[r[2] for r in ranges])
            self._reply(w.identity, reply, [r[3] for r in ranges if r[3] is not None])
        self._waits = keep

    def _retire(self, keys: list[TaskKey]) -> None:
        """Move tasks whose every op is done out of the control plane into the bounded result cache,
        whether or not anyone waited for them (an engine that never waits must not grow the server)."""
        for key in keys:
            if key not in self._launched:
                continue
            full = self.control.poll(key, completely=True)
            if full.status is TaskStatus.UNREADY:
                continue
            self._remember(key, self.control.poll(key, completely=False), full)
            self.control.release(key)
            self._launched.discard(key)

    def _remember(self, key: TaskKey, engine: KVResponse, full: KVResponse) -> None:
        self._results[key] = (engine, full)
        if len(self._results) > _RESULT_CACHE:
            self._results.popitem(last=False)

    # -- workers --------------------------------------------------------------------------------
    def _on_worker_frames(self, frames: list[zmq.Frame]) -> None:
        """A hello binds its connection to a worker (or lane) if its credential is right; anything else
        counts only from a connection so bound, and only for that worker (DESIGN §7, trust)."""
        routing_id = frames[0].bytes
        try:
            msg, _ = WORKER_TO_SERVER.decode(frames[1:])
        except ProtocolError as e:
            self.supervisor.refuse(routing_id, f"bad message: {e}")
            return
        if isinstance(msg, WorkerHelloMsg):
            self.supervisor.on_hello(routing_id, msg)
            return
        worker_id = self.supervisor.worker_of(routing_id)
        if worker_id is None or msg.worker_id != worker_id:
            self.supervisor.refuse(routing_id, f"{type(msg).__name__} as {msg.worker_id!r} from a connection "
                                               f"that is not that worker's: dropped")
        elif isinstance(msg, OpsDoneMsg):
            self._complete(self.supervisor.on_done(worker_id, msg.op_ids, msg.errors))
        elif isinstance(msg, WorkerByeMsg) and self.supervisor.on_bye(routing_id) is not None:
            self._lane_gone(worker_id, msg.reason or "closed")

    def _dispatch(self, ops: list[TransferOp]) -> None:
        pending = list(ops)
        while pending:
            op = pending.pop()
            self._op_keys[op.op_id] = op.task_key
            failure = self.supervisor.dispatch(op)
            if failure is not None:
                pending += self._complete_one(failure)

    def _complete(self, results: list[OpResult]) -> None:
        for result in results:
            self._dispatch(self._complete_one(result))

    def _complete_one(self, result: OpResult) -> list[TransferOp]:
        op_id, error = result
        if error:
            log.warning("op %d failed: %s", op_id, error)
        key = self._op_keys.pop(op_id, None)
        try:
            ops = self.control.complete_op(op_id, not error, error)
        except FlexKVError as e:  # e.g. an op of a task dropped meanwhile
            log.debug("completion of op %d ignored: %s", op_id, e)
            return []
        if key is not None and not ops:
            self._retire([key])
        return ops

    # -- clients going away ---------------------------------------------------------------------
    def _client_gone(self, identity: bytes, conn: _Conn) -> None:
        del self._conns[identity]
        log.warning("client %d (%s, pid %d) is gone; releasing its work", conn.client_id, conn.role, conn.pid)
        if conn.role == "manager":
            self.control.drop_client(conn.client_id)
            self._waits = [w for w in self._waits if w.identity != identity]
            self._launched = {k for k in self._launched if k[0] != conn.client_id}
        else:
            for (dp, rank) in list(self._registered):
                if dp == conn.client_id and not any(c.client_id == dp and c.role == "tp" for c in self._conns.values()):
                    self._registered.discard((dp, rank))
                    self._complete(self.supervisor.remove(device_worker_id(dp, rank), "its TP client is gone"))

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop workers, unlink the shared-memory pool, remove socket files. Idempotent; also undoes a
        start that failed half way."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "supervisor"):
            self.supervisor.stop_all()
        self._ctx.destroy(linger=0)
        pool: SharedPool | None = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
            pool.unlink()
        if self._lookup_store is not None:
            self._lookup_store.close()
        if self._own_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        else:
            for name in ("server.sock", "workers.sock"):
                try:
                    os.unlink(os.path.join(self.runtime_dir, name))
                except FileNotFoundError:
                    pass
        log.info("flexkv server stopped")


_REG_FIELDS = ("num_layers", "num_blocks", "tokens_per_block", "num_heads", "head_size", "itemsize",
               "host_segment", "tensor_offsets", "device_id")


def _invalid(msg: str) -> FlexKVError:
    from flexkv.types import InvalidRequest

    return InvalidRequest(msg)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prefault_progress(done: int, total: int) -> None:
    if total >= 4 << 30:
        log.info("pre-faulting CPU pool: %.1f / %.1f GiB", done / 2**30, total / 2**30)
