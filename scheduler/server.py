"""The scheduler server: one process, one thread owning the control plane, two ZeroMQ ROUTERs.

Engine clients (KVManager, KVTPClient) talk to the client ROUTER; worker processes to the worker
ROUTER. Every message is decoded by the decoder of its socket and dispatched through one table that
is checked complete at start-up. A malformed or unknown message gets an error reply (when it can be
attributed) and the loop carries on: no input kills the server or leaves a reservation behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
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

from flexkv import hoptrace, native, security
from flexkv.common.config import CacheConfig, ModelConfig, RemoteConfig, configs_to_json, kv_fingerprint
from flexkv.layout import BlockFirstLayout, KVCacheLayout
from flexkv.native.hasher import encode_namespace
from flexkv.progress import Progress
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.codec import (
    CLIENT_REQUESTS,
    SERVER_REPLIES,
    WORKER_TO_SERVER,
    ProtocolError,
    batch_frames,
    frame_array,
    mask_to_range,
)
from flexkv.protocol.worker_msgs import OpsDoneMsg, WorkerByeMsg, WorkerHelloMsg
from flexkv.remote import RemoteStore, RemoteUnavailable, open_remote_store
from flexkv.scheduler import endpoint
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.endpoint import IpcClaim
from flexkv.scheduler.graph import TransferOp
from flexkv.scheduler.read_rates import ReadRates
from flexkv.scheduler.remote_lookup import RemoteLookup
from flexkv.scheduler.sessions import ResultCache, Session, TaskResult, session_of, task_of
from flexkv.scheduler.ssd_rebuild import progress_logger
from flexkv.scheduler.supervisor import OpResult, RestartPolicy, WorkerSupervisor, device_worker_id, pid_alive
from flexkv.scheduler.telemetry import Telemetry, build_snapshot
from flexkv.scheduler.trace import TraceWriter
from flexkv.security import CurveAuthenticator, CurveServerKeys
from flexkv.shm import SharedPool, make_pool_name, remove_stale_segments, unlink_if_creator_dead
from flexkv.ssd_journal import journal_path, scan
from flexkv.types import ConfigError, FlexKVError, KVResponse, OpType, TaskStatus, TaskType

log = logging.getLogger("flexkv.server")

TaskKey = tuple[int, int]
_FINAL = (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.NOTFOUND)
_TICK_S = 0.1
_ROLES = ("manager", "tp", "monitor")  # a monitor (flexkv stats) may only read
_MONITOR_QUERIES = ("snapshot", "stats", "is_ready")


@dataclasses.dataclass
class _Wait:
    session: Session
    req_id: int
    task_ids: list[int]
    keys: list[TaskKey]
    deadline: float
    completely: bool
    landing: bool = False  # the client watches the ranks' progress tables (WaitMsg.landing)


@dataclasses.dataclass
class _Registration:
    """A TP rank's KV buffers, owned by the session that registered them (DESIGN §7, trust)."""

    session_id: int
    host_segment: str | None
    fence: str | None = None


def default_runtime_dir() -> str:
    """A private (0700) directory for the IPC socket files."""
    base = os.environ.get("FLEXKV_RUNTIME_DIR") or None
    return tempfile.mkdtemp(prefix="flexkv-", dir=base)


class SchedulerServer:
    """Owns index, pools, tasks and workers. Construct, then ``serve_forever()``; ``close()`` cleans up."""

    def __init__(self, model: ModelConfig, cache: CacheConfig, client_address: str | None = None,
                 runtime_dir: str | None = None, parent_pid: int | None = None,
                 curve: CurveServerKeys | None = None) -> None:
        """``curve``: CurveZMQ keys for a TCP client address (default: from the environment, see
        flexkv/security.py); binding a non-loopback address without them is a ConfigError."""
        self.model = model
        self._closed = False
        restart_policy = RestartPolicy.from_env()  # a bad setting fails here, before anything is built
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = runtime_dir or default_runtime_dir()
        os.chmod(self.runtime_dir, 0o700)
        self.client_address = client_address or f"ipc://{self.runtime_dir}/server.sock"
        self.worker_address = f"ipc://{self.runtime_dir}/workers.sock"
        self._parent_pid = parent_pid
        self._host = socket.gethostname()
        self._lookup_store: RemoteStore | None = None
        self._ctx = zmq.Context()
        self._claims: list[IpcClaim] = []
        self._auth: CurveAuthenticator | None = None
        try:
            # First: a second server on the same address fails here, before it builds anything.
            self._clients = self._bind_clients(curve if curve is not None else CurveServerKeys.from_env())
            # Workers set no identity: the ROUTER names each connection, and a hello binds it (supervisor).
            self._workers_sock = self._bind(zmq.ROUTER, self.worker_address)
            cache = self._open_remote_lookup(model, cache)
            self.cache = cache
            self.control = ControlPlane(model, cache, remote_lookup=self._remote_lookup)
            self.block_bytes = model.block_bytes(cache.tokens_per_block)
            self.block_first = BlockFirstLayout(model, cache.tokens_per_block)
            for name in remove_stale_segments("cpu"):  # pools of servers that were killed
                log.warning("removed the stale CPU pool %s of a server that is gone", name)
            pool_bytes = cache.num_cpu_blocks * self.block_bytes
            with Progress("pre-faulting CPU pool", pool_bytes) as progress:
                self.pool = SharedPool.create(make_pool_name("cpu"), pool_bytes, progress=progress)
        except BaseException:
            self.close()  # e.g. the address is taken: leave no segment or socket file behind
            raise
        base_spec = {"worker_address": self.worker_address, "pool_name": self.pool.name,
                     "pool_block_bytes": self.block_bytes, "pool_num_blocks": cache.num_cpu_blocks,
                     "configs": configs_to_json(model, cache)}
        self.supervisor = WorkerSupervisor(self._workers_sock, base_spec, model.tp_size, model.use_mla,
                                           restart_policy)
        self._sessions: dict[bytes, Session] = {}  # by connection identity
        self._session_ids = itertools.count(1)
        self._registrations: dict[tuple[int, int], _Registration] = {}  # (dp, rank) -> owner
        self._registered: set[tuple[int, int]] = set()  # ranks whose device worker runs
        self._launched: set[TaskKey] = set()  # launched (or cancelled) tasks still in the control plane
        self._matched: OrderedDict[TaskKey, float] = OrderedDict()  # matched, not launched: match time
        self._op_keys: dict[int, tuple[TaskKey, ...]] = {}  # dispatched op -> its task(s) (a batch: several)
        self._corrupt_at: dict[int, int] = {}  # failed DISK2H op -> its first corrupt block (OpsDoneMsg)
        # Final results of retired tasks, (engine part, every op), kept for later waits; bounded by bytes.
        self._results = ResultCache(cache.result_cache_bytes)
        self._waits: list[_Wait] = []
        # GETs whose H2D is dispatched to ranks that publish its landing in their progress tables: a landing
        # wait is answered for them at once, and the client returns when every rank's table says so.
        self._landing: set[TaskKey] = set()
        self._layer_major: set[TaskKey] = set()  # launched with layerwise=True: their H2D copies layer by layer
        self._spin_ns = cache.busy_poll_us * 1000
        self._running = False
        self._stop_requested = False  # a SIGTERM before serve_forever began still stops it
        self.trace = (TraceWriter(cache.trace_path, int(cache.trace_max_mb * 2**20), cache.trace_backups)
                      if cache.trace_path else None)
        self.read_rates = ReadRates(cache, self.block_bytes)  # fed by telemetry, told by get_match_info replies
        self.telemetry = Telemetry(cache.tokens_per_block, self.trace, self.read_rates)
        self.metrics: Any = None  # flexkv.scheduler.metrics.MetricsExporter when metrics_port is set
        self._handlers: dict[type, Callable[[bytes, Any, list[memoryview]], None]] = {
            cm.HelloMsg: self._on_hello,
            cm.GetMatchMsg: self._on_match,
            cm.PutMatchMsg: self._on_match,
            cm.GetMatchInfoMsg: self._on_match,
            cm.GetMatchLaunchMsg: self._on_match_launch,
            cm.GetAsyncMsg: self._on_async,
            cm.PutAsyncMsg: self._on_async,
            cm.GetAsyncBatchMsg: self._on_async_batch,
            cm.PutAsyncBatchMsg: self._on_async_batch,
            cm.PrefetchMsg: self._on_prefetch,
            cm.LaunchMsg: self._on_launch,
            cm.CancelMsg: self._on_cancel,
            cm.WaitMsg: self._on_wait,
            cm.RegisterKVMsg: self._on_register,
            cm.ByeMsg: self._on_bye,
            cm.QueryMsg: self._on_query,
        }
        missing = set(typing.get_args(cm.ClientRequest)) - set(self._handlers)
        assert not missing, f"dispatch table incomplete: {missing}"
        try:
            self._start_tier_workers()
            self._restore_ssd_index()
            self._start_metrics()
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
            # (a Mooncake lookup connection only asks: it contributes no DRAM segment)
            store = open_remote_store(dataclasses.replace(cache.remote, mooncake_segment_mb=0),
                                      kv_fingerprint(model, cache.tokens_per_block),
                                      connect_timeout_s=0.5, op_timeout_s=1.0)
        except RemoteUnavailable as e:
            if cache.remote.required:
                raise ConfigError(f"remote store unreachable at start: {e} (set remote.required=false to start "
                                  "without the remote tier)") from None
            log.warning("remote store unreachable at start (%s); remote tier disabled", e)
            return dataclasses.replace(cache, enable_remote=False)
        self._lookup_store = store
        # The existence check runs on the lookup's own thread; the loop waits for it at most
        # lookup_timeout_ms (a late answer is a miss), so a hung store never stalls other clients.
        self._remote_lookup = RemoteLookup(store.count_prefix, unavailable=(RemoteUnavailable, OSError),
                                           wait_s=cache.remote.lookup_timeout_ms / 1000)
        return cache

    def _bind_clients(self, curve: CurveServerKeys | None) -> zmq.Socket[bytes]:
        """The client ROUTER; over TCP with CurveZMQ when keys are configured (required off loopback)."""
        security.check_bind(self.client_address, curve)
        if curve is None or not self.client_address.startswith("tcp://"):
            return self._bind(zmq.ROUTER, self.client_address)
        self._auth = CurveAuthenticator(self._ctx, curve)

        def secure(sock: zmq.Socket[bytes]) -> None:
            security.make_curve_server(sock, curve)
            assert self._auth is not None
            self._auth.watch(sock)
        sock = self._bind(zmq.ROUTER, self.client_address, secure)
        self._auth.start()
        return sock

    def _start_metrics(self) -> None:
        if not self.cache.metrics_port:
            return
        from flexkv.scheduler.metrics import MetricsExporter  # prometheus-client only when metrics are on

        try:
            self.metrics = MetricsExporter(self._ctx, self.cache.metrics_address, self.cache.metrics_port)
        except OSError as e:
            raise ConfigError(f"metrics_port: cannot listen on {self.cache.metrics_address}:"
                              f"{self.cache.metrics_port}: {e.strerror or e}") from None

    def snapshot(self) -> dict[str, Any]:
        """What ``flexkv stats`` and /metrics show (server thread only)."""
        roles: dict[str, int] = {}
        for session in self._sessions.values():
            roles[session.role] = roles.get(session.role, 0) + 1
        return build_snapshot(self.control.stats(), self.telemetry, self.supervisor.workers, roles,
                              self.block_bytes, self.cache.tokens_per_block)

    def _bind(self, kind: int, address: str,
              prepare: Callable[[zmq.Socket[bytes]], None] | None = None) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if prepare is not None:
            prepare(sock)
        try:
            claim = endpoint.bind(sock, address)
        except BaseException:
            sock.close(linger=0)
            raise
        if claim is not None:
            self._claims.append(claim)
        return sock

    def _start_tier_workers(self, timeout_s: float = 120.0) -> None:
        """Start the SSD/remote workers and wait until they run; a worker that cannot start (missing
        directory, no space, store unreachable) fails the server's start with its reason logged above."""
        if self.cache.enable_ssd:
            for d in self.cache.ssd_cache_dir:
                if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
                    raise ConfigError(f"ssd_cache_dir: {d!r} is not a writable directory")
            if not native.built("uring"):  # (else the SSD worker dies at start on an import error)
                raise ConfigError(f"enable_ssd: {native.URING_MISSING}")
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

    def _restore_ssd_index(self) -> None:
        """Find the SSD tier's blocks again from the journal the SSD worker checked and compacted."""
        if not (self.cache.enable_ssd and self.cache.ssd_persist_index):
            return
        generation = _read_reset_generation(self.cache.ssd_cache_dir[0])
        if generation:
            self.control.set_reset_generation(generation)
            log.info("SSD tier: %d reset(s) recorded; blocks stored before the last one stay unmatched", generation)
        t0 = time.monotonic()
        fingerprint = kv_fingerprint(self.model, self.cache.tokens_per_block)
        found = scan(journal_path(self.cache.ssd_cache_dir[0]), fingerprint, None, self.cache.num_ssd_blocks)
        num = self.control.restore_ssd_index(found.records, progress_logger())
        log.info("SSD index rebuilt: %d blocks found again (%d slot records, %d skipped) in %.2f s", num,
                 found.records.shape[0], found.num_skipped, time.monotonic() - t0)

    # -- loop -----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run until a shutdown request, SIGINT/SIGTERM, or the parent process (library mode) is gone."""
        self._running = not self._stop_requested
        poller = zmq.Poller()
        poller.register(self._clients, zmq.POLLIN)
        poller.register(self._workers_sock, zmq.POLLIN)
        if self.metrics is not None:
            poller.register(self.metrics.sock, zmq.POLLIN)
        next_tick = 0.0
        while self._running:
            events = self._poll(poller)
            if self._workers_sock in events:
                self._drain(self._workers_sock, self._on_worker_frames)
            if self._clients in events:
                self._drain(self._clients, self._on_client_frames)
            if self.metrics is not None and self.metrics.sock in events:
                self.metrics.serve(self.snapshot)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_S
                self._tick()
            self._check_waits()

    def _poll(self, poller: zmq.Poller) -> dict[Any, int]:
        """The sockets ready now. While a wait is parked or an op is in flight, poll without sleeping
        for up to ``busy_poll_us`` first (the completion often comes within it); an idle server sleeps."""
        if self._spin_ns and (self._waits or self.supervisor.num_in_flight):
            spin_until = time.monotonic_ns() + self._spin_ns
            while time.monotonic_ns() < spin_until:
                events = poller.poll(0)
                if events:
                    return dict(events)
        return dict(poller.poll(timeout=int(_TICK_S * 1000)))

    def stop(self, *_: object) -> None:
        self._stop_requested = True
        self._running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(256):  # bounded so one busy socket cannot starve the other
            # Asking the socket costs less than the zmq.Again a NOBLOCK receive raises when it is empty.
            if not typing.cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN:
                return
            handle(sock.recv_multipart(copy=False))

    def _tick(self) -> None:
        failed, gone = self.supervisor.check_liveness()
        self._complete(failed)
        for worker_id in gone:
            self._lane_gone(worker_id, "its engine process is gone")
        self.control.evict_proactively()
        self.telemetry.on_tick(self.supervisor.workers)
        if self.trace is not None:
            self.trace.flush()
        for session in list(self._sessions.values()):
            if session.host == self._host and not pid_alive(session.pid):
                self._end_session(session, f"its process {session.pid} is gone", dead=True)
        self._expire_matches(time.monotonic())
        if self._parent_pid is not None and not pid_alive(self._parent_pid):
            log.warning("parent process %d is gone; shutting down", self._parent_pid)
            self._running = False

    # -- client side ----------------------------------------------------------------------------
    def _on_client_frames(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        req_id = -1
        try:
            msg, arrays = CLIENT_REQUESTS.decode(frames[1:])
            req_id = getattr(msg, "req_id", -1)
            if not isinstance(msg, cm.HelloMsg):
                self._check_session(identity, msg)
            self._handlers[type(msg)](identity, msg, arrays)
            self.telemetry.on_request(type(msg), ok=True)
        except ProtocolError as e:
            log.warning("bad client message: %s", e)
            self._reply(identity, cm.ErrorReplyMsg(req_id=-1, error=str(e), kind="ProtocolError"))
        except FlexKVError as e:
            self.telemetry.on_request(type(msg), ok=False)
            self._reply(identity, cm.ErrorReplyMsg(req_id=req_id, error=str(e), kind=type(e).__name__))
        except Exception as e:
            self.telemetry.on_request(type(msg), ok=False)
            log.exception("error handling a client message")
            self._reply(identity, cm.ErrorReplyMsg(req_id=req_id, error=f"internal error: {e!r}", kind="InternalError"))

    def _reply(self, identity: bytes, msg: cm.ServerReply, arrays: list[Any] | None = None) -> None:
        if msg.req_id < 0 and not isinstance(msg, cm.ErrorReplyMsg):
            return
        self._clients.send_multipart([identity, *SERVER_REPLIES.encode(msg, arrays or [])], copy=False)

    def _check_session(self, identity: bytes, msg: cm.ClientMsg) -> Session:
        """The live session of this connection, if ``msg`` may speak for it; else InvalidRequest naming why."""
        name = type(msg).__name__
        session = self._sessions.get(identity)
        if session is None:
            raise _invalid(f"{name} refused: this connection never said hello (send HelloMsg first)")
        if msg.session_id != session.session_id:
            raise _invalid(f"{name} refused: session {msg.session_id} is not live "
                           f"(this connection's session is {session.session_id})")
        if msg.client_id != session.client_id:
            raise _invalid(f"{name} refused: it claims client id {msg.client_id}, this connection said hello "
                           f"as client {session.client_id}")
        if session.role == "monitor" and not (isinstance(msg, cm.ByeMsg) or (
                isinstance(msg, cm.QueryMsg) and msg.what in _MONITOR_QUERIES)):
            raise _invalid(f"{name} refused: a monitor connection may only query {', '.join(_MONITOR_QUERIES)}")
        return session

    def _on_hello(self, identity: bytes, msg: cm.HelloMsg, _: list[memoryview]) -> None:
        if not 0 <= msg.client_id < self.model.dp_size:
            raise _invalid(f"dp_client_id {msg.client_id} out of range for dp_size={self.model.dp_size}")
        if msg.role not in _ROLES:
            raise _invalid(f"hello: unknown role {msg.role!r}; allowed: {', '.join(_ROLES)}")
        old = self._sessions.get(identity)
        if old is not None:
            self._end_session(old, "its connection said hello again")
        session = Session(next(self._session_ids), identity, msg.client_id, msg.role, msg.pid, msg.host)
        self._sessions[identity] = session
        log.info("session %d: client %d (%s, pid %d on %s)", session.session_id, msg.client_id, msg.role, msg.pid,
                 msg.host)
        self.telemetry.on_connect()
        info: dict[str, int | float | str | bool] = {
                "session_id": session.session_id, "tokens_per_block": self.cache.tokens_per_block,
                "pool_name": self.pool.name, "num_cpu_blocks": self.cache.num_cpu_blocks,
                "block_bytes": self.block_bytes}
        self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info=info))

    def _on_bye(self, identity: bytes, msg: cm.ByeMsg, _: list[memoryview]) -> None:
        self._end_session(self._sessions[identity], "it closed")
        self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id))

    def _task_inputs(self, msg: Any, arrays: list[memoryview], with_slots: bool) -> tuple[Any, ...]:
        want = 1 + int(with_slots) + int(msg.has_mask)
        if len(arrays) != want:
            raise ProtocolError(f"{type(msg).__name__}: expected {want} array frames, got {len(arrays)}")
        tokens = frame_array(arrays[0], np.int64, "token_ids")
        slots = frame_array(arrays[1], np.int64, "slot_mapping") if with_slots else None
        mask = frame_array(arrays[-1], np.bool_, "token_mask") if msg.has_mask else None
        return tokens, slots, mask, encode_namespace(msg.namespace)

    def _in_use(self, key: TaskKey) -> bool:
        return key in self._launched or key in self._results or self.control.poll(key).status is not TaskStatus.NOTFOUND

    def _check_new_key(self, key: TaskKey, task_id: int) -> None:
        if self._in_use(key):
            raise _invalid(f"task id {task_id} is already in use in this session")

    def _on_match(self, identity: bytes, msg: cm.GetMatchMsg, arrays: list[memoryview]) -> None:
        _, reply, frames = self._matched_reply(identity, msg, arrays)
        self._reply(identity, reply, frames)

    def _on_match_launch(self, identity: bytes, msg: cm.GetMatchLaunchMsg, arrays: list[memoryview]) -> None:
        """get_match, then launch at once into the last frame's slots (when something matched), then reply:
        the copy starts before the client has its mask."""
        if not arrays:
            raise ProtocolError("GetMatchLaunchMsg: expected a slot_mapping frame after the match's frames")
        key, reply, frames = self._matched_reply(identity, msg, arrays[:-1])
        if frames or reply.mask_end > reply.mask_begin:  # (a frame: a mask of several runs)
            try:
                slots = frame_array(arrays[-1], np.int64, "slot_mapping")
            except ProtocolError as e:
                self._fail_unstarted(key, str(e))
            else:
                self._launch_together([(key, slots)], msg.layerwise)
        self._reply(identity, reply, frames)

    def _matched_reply(self, identity: bytes, msg: cm.GetMatchMsg,
                       arrays: list[memoryview]) -> tuple[TaskKey, cm.MatchReplyMsg, list[Any]]:
        """Match ``msg``'s task; its key, the reply and the reply's frames."""
        if hoptrace.ENABLED:
            hoptrace.mark("server_match", msg.task_id)
        key = self._sessions[identity].key(msg.task_id)
        is_get = not isinstance(msg, cm.PutMatchMsg)
        if msg.num_tokens >= 0:  # the client hashed its tokens
            if len(arrays) != 1 + int(msg.has_mask):
                raise ProtocolError(f"{type(msg).__name__}: expected {1 + int(msg.has_mask)} array frames")
            hashes = frame_array(arrays[0], np.uint64, "block_hashes")
            mask = frame_array(arrays[1], np.bool_, "token_mask") if msg.has_mask else None
            self._check_new_key(key, msg.task_id)
            started, task_type = time.monotonic(), TaskType.GET if is_get else TaskType.PUT
            ret = self.control.match_hashes(task_type, key, hashes, msg.num_tokens, mask)
            self.telemetry.on_matched(key, task_type, started, msg.num_tokens, ret)
        else:
            tokens, _, mask, ns = self._task_inputs(msg, arrays, with_slots=False)
            ret = self._match(key, msg.task_id, is_get, tokens, mask, ns)
        self._matched[key] = time.monotonic()
        n, begin, end, frame = mask_to_range(ret)
        reply = cm.MatchReplyMsg(req_id=msg.req_id, task_id=msg.task_id, num_tokens=n, mask_begin=begin, mask_end=end)
        if isinstance(msg, cm.GetMatchInfoMsg):  # plus where the blocks come from and how fast each tier reads
            reply = cm.MatchInfoReplyMsg(req_id=msg.req_id, task_id=msg.task_id, num_tokens=n, mask_begin=begin,
                                         mask_end=end, tier_blocks=list(self.control.tier_split(key)),
                                         read_bps=self.read_rates.as_list())
        return key, reply, [frame] if frame is not None else []

    def _match(self, key: TaskKey, task_id: int, is_get: bool, tokens: Any, mask: Any, ns: bytes) -> np.ndarray:
        self._check_new_key(key, task_id)
        started = time.monotonic()
        match = self.control.get_match if is_get else self.control.put_match
        ret = match(key, tokens, mask, ns)
        self.telemetry.on_matched(key, TaskType.GET if is_get else TaskType.PUT, started, len(tokens), ret)
        return ret

    def _on_async(self, identity: bytes, msg: cm.GetAsyncMsg, arrays: list[memoryview]) -> None:
        session = self._sessions[identity]
        key = session.key(msg.task_id)
        if hoptrace.ENABLED:
            hoptrace.mark("server_request", msg.task_id)
        if self._in_use(key):  # never touch the task that holds the id
            log.warning("session %d: %s for task id %d ignored: already in use", session.session_id,
                        type(msg).__name__, msg.task_id)
            return
        try:
            tokens, slots, mask, ns = self._task_inputs(msg, arrays, with_slots=True)
            self._match(key, msg.task_id, not isinstance(msg, cm.PutAsyncMsg), tokens, mask, ns)
            self._dispatch(self._launch(key, slots))
            self._retire([key])  # a task with nothing to move is already done
        except (FlexKVError, ProtocolError) as e:
            self._fail_unstarted(key, str(e), new=True,
                                 task_type=TaskType.PUT if isinstance(msg, cm.PutAsyncMsg) else TaskType.GET)

    def _on_async_batch(self, identity: bytes, msg: cm.GetAsyncBatchMsg, arrays: list[memoryview]) -> None:
        """get_async_many / put_async_many: match every task, then launch them together (one batched
        op per direction and device worker). A task that cannot be matched or launched fails alone."""
        session = self._sessions[identity]
        is_get = not isinstance(msg, cm.PutAsyncBatchMsg)
        keys = [session.key(tid) for tid in msg.task_ids]  # all in range, or nothing happens
        try:
            frames: list[Any] = batch_frames(msg, arrays)
        except ProtocolError as e:  # frames cannot be told apart: every task of the message fails
            frames = [e] * len(keys)
        launched: list[tuple[TaskKey, Any]] = []
        for i, (key, task_id, task_frames) in enumerate(zip(keys, msg.task_ids, frames, strict=True)):
            if self._in_use(key):  # never touch the task that holds the id (an id twice: the first one)
                log.warning("session %d: %s for task id %d ignored: already in use", session.session_id,
                            type(msg).__name__, task_id)
                continue
            try:
                if isinstance(task_frames, ProtocolError):
                    raise task_frames
                tokens, slots, mask = task_frames
                ns = encode_namespace(msg.namespaces[i] if msg.namespaces else None)
                self._match(key, task_id, is_get, tokens, mask, ns)
                launched.append((key, slots))
            except (FlexKVError, ProtocolError) as e:
                self._fail_unstarted(key, str(e), new=True, task_type=TaskType.GET if is_get else TaskType.PUT)
        self._launch_together(launched)

    def _on_prefetch(self, identity: bytes, msg: cm.PrefetchMsg, arrays: list[memoryview]) -> None:
        session = self._sessions[identity]
        key = session.key(msg.task_id)
        if self._in_use(key):  # never touch the task that holds the id
            log.warning("session %d: PrefetchMsg for task id %d ignored: already in use", session.session_id,
                        msg.task_id)
            return
        try:
            if len(arrays) != 1:
                raise ProtocolError(f"PrefetchMsg: expected 1 array frame, got {len(arrays)}")
            tokens = frame_array(arrays[0], np.int64, "token_ids")
            self._match(key, msg.task_id, True, tokens, None, encode_namespace(msg.namespace))
            ops = self.control.launch_prefetch(key)
            self._launched.add(key)
            self._dispatch(ops)
            self._retire([key])
        except (FlexKVError, ProtocolError) as e:
            self._fail_unstarted(key, str(e), new=True)

    def _on_launch(self, identity: bytes, msg: cm.LaunchMsg, arrays: list[memoryview]) -> None:
        """Launch the tasks together: their ready device ops go out as one batched op per direction."""
        session = self._sessions[identity]
        if hoptrace.ENABLED:
            for tid in msg.task_ids:
                hoptrace.mark("server_launch", tid)
        keys = [session.key(tid) for tid in msg.task_ids]  # all in range, or nothing happens
        batch: list[tuple[TaskKey, Any]] = []
        for i, key in enumerate(keys):
            if key not in self._matched and key not in self._launched:
                # Unknown (never matched, or finished): nothing is recorded, so the id stays free.
                log.info("session %d: launch of task %d ignored: no such matched task", session.session_id,
                         msg.task_ids[i])
            elif len(arrays) != len(keys):
                self._fail_unstarted(key, "launch: one slot_mapping frame per task id expected")
            else:
                try:
                    batch.append((key, frame_array(arrays[i], np.int64, "slot_mapping")))
                except ProtocolError as e:
                    self._fail_unstarted(key, str(e))
        self._launch_together(batch, msg.layerwise)

    def _launch_together(self, batch: list[tuple[TaskKey, Any]], layerwise: bool = False) -> None:
        """Launch each task (one that cannot be launched fails alone), then dispatch all their ready ops
        at once, so each direction's device ops become one batched op; ``layerwise`` GETs copy layer-major."""
        if layerwise:
            self._layer_major.update(key for key, _ in batch)
        ops: list[TransferOp] = []
        for key, slots in batch:
            try:
                ops += self._launch(key, slots)
            except FlexKVError as e:
                self._fail_unstarted(key, str(e))
        self._dispatch(ops)
        if layerwise:
            self._layer_major.intersection_update(self._launched)  # (those that could not be launched)
        self._retire([key for key, _ in batch])  # tasks with nothing to move are already done

    def _launch(self, key: TaskKey, slots: Any) -> list[TransferOp]:
        """Launch one task; returns its ready ops (the caller dispatches them)."""
        ops = self.control.launch(key, slots)
        self._matched.pop(key, None)
        self._launched.add(key)
        self.telemetry.on_launched(key)
        return ops

    def _fail_unstarted(self, key: TaskKey, error: str, new: bool = False,
                        task_type: TaskType | None = None) -> None:
        """A request failed before its task ran: roll back and report FAILED at wait. Only a task this
        request created (``new``) or one matched and not launched is failed; a running one goes on."""
        log.info("task %d of session %d failed: %s", task_of(key), session_of(key), error)
        if key in self._launched:
            return
        if self.control.poll(key).status is TaskStatus.UNREADY:
            self.control.cancel(key)
            self.control.release(key)
        elif not new and key not in self._matched:
            return
        self._matched.pop(key, None)
        failed = KVResponse(TaskStatus.FAILED, key[1], None, error)
        self._remember(key, failed, failed, task_type)

    def _on_cancel(self, identity: bytes, msg: cm.CancelMsg, __: list[memoryview]) -> None:
        session = self._sessions[identity]
        for key, tid in zip([session.key(t) for t in msg.task_ids], msg.task_ids, strict=True):
            if key in self._launched:
                log.info("session %d: cancel of task %d ignored: it is running and ends on its own "
                         "(cancel applies to tasks not yet launched)", session.session_id, tid)
            elif key in self._matched:
                self.control.cancel(key)
                self._matched.pop(key)
                self._launched.add(key)  # cancelled tasks are final; waiting on them must not hang
                self._retire([key])

    def _on_wait(self, identity: bytes, msg: cm.WaitMsg, _: list[memoryview]) -> None:
        t = msg.timeout_s
        if not (math.isfinite(t) and 0 <= t <= cm.MAX_WAIT_S):
            raise _invalid(f"wait: timeout_s must be a finite number of seconds in [0, {cm.MAX_WAIT_S:.0f}], got {t!r}")
        session = self._sessions[identity]
        keys = [session.key(tid) for tid in msg.task_ids]
        self._waits.append(_Wait(session, msg.req_id, list(msg.task_ids), keys, time.monotonic() + t,
                                 msg.completely, msg.landing and not msg.completely))
        self.telemetry.on_wait(keys)
        if hoptrace.ENABLED:
            for tid in msg.task_ids:
                hoptrace.mark("server_wait", tid)

    def _expire_matches(self, now: float) -> None:
        """Release matches never launched within ``match_ttl_s`` (a client that matched and forgot)."""
        ttl = self.cache.match_ttl_s
        while self._matched:
            key, matched_at = next(iter(self._matched.items()))
            if now - matched_at < ttl:
                return
            del self._matched[key]
            if key in self._launched or self.control.poll(key).status is not TaskStatus.UNREADY:
                continue  # not a pending match after all (never the case; keeps the loop finite)
            error = f"matched {now - matched_at:.0f} s ago and never launched: released after match_ttl_s={ttl:g}"
            log.warning("task %d of session %d %s", task_of(key), session_of(key), error)
            self.control.cancel(key)
            self.control.release(key)
            failed = KVResponse(TaskStatus.FAILED, key[1], None, error)
            self._remember(key, failed, failed)

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
        for what, name in (("layer_progress", msg.layer_progress), ("fence", msg.fence)):
            if name is not None and not _is_segment_name(name):
                raise _invalid(f"register: {what} {name!r} is not a flexkv shared-memory name")
        reg["cuda_handles"] = [h.hex() for h in msg.cuda_handles]
        reg["cuda_event"] = msg.cuda_event.hex()
        key = (msg.client_id, msg.tp_rank)
        session = self._sessions[identity]
        owner = self._registrations.get(key)
        if owner is not None and owner.session_id != session.session_id:
            raise _invalid(f"register: dp {key[0]} rank {key[1]} is registered by another live connection "
                           f"(session {owner.session_id}); only that connection may replace it, or anyone "
                           "after it is gone")
        self._registrations[key] = _Registration(session.session_id, msg.host_segment, msg.fence)
        worker_id = device_worker_id(msg.client_id, msg.tp_rank)
        spec = {"kind": "device", "dp_client_id": msg.client_id, "tp_rank": msg.tp_rank, "registration": reg}
        if msg.engine_side:
            self._register_lane(identity, msg.req_id, worker_id, key, spec)
            return
        handle = self.supervisor.spawn(worker_id, spec)

        def ready() -> None:
            self._registered.add(key)
            self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info={"worker": worker_id}))

        handle.on_ready.append(ready)
        handle.on_start_failed.append(
            lambda why: self._reply(identity, cm.ErrorReplyMsg(req_id=msg.req_id, error=f"register: {why}")))

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
        reg = self._registrations.pop((dp, rank), None)  # the rank is free to register again
        self._complete(self.supervisor.remove(worker_id, reason))
        if reg is not None and reg.fence and unlink_if_creator_dead(reg.fence):
            log.info("removed KV fence %s of a dead engine", reg.fence)

    def _on_query(self, identity: bytes, msg: cm.QueryMsg, _: list[memoryview]) -> None:
        info: dict[str, int | float | str | bool]
        if msg.what == "is_ready":
            info = {"ready": self.is_ready()}
        elif msg.what == "stats":
            info = {**self.control.stats(), **self._session_stats(), **self.read_rates.stats(),
                    "in_flight_ops": self.supervisor.num_in_flight,
                    "num_workers": len(self.supervisor.workers), "server_pid": os.getpid()}
            for worker_id, handle in self.supervisor.workers.items():
                info[f"pid:{worker_id}"] = handle.proc.pid if handle.proc is not None else handle.pid
            for worker_id, reason in self.supervisor.down().items():
                info[f"down:{worker_id}"] = reason
            for worker_id, num_ops in self.telemetry.worker_ops.items():  # a batched op counts once
                info[f"ops:{worker_id}"] = num_ops
            info["worker_msgs_refused"] = self.supervisor.num_refused
            if self._auth is not None:
                info["clients_refused"] = self._auth.num_refused
        elif msg.what == "snapshot":
            info = {"json": json.dumps(self.snapshot())}
        elif msg.what == "check":
            self.control.check_invariants()
            self._check_sessions()
            info = {"ok": True}
        elif msg.what == "reset":
            dropped = self.control.reset()
            if self.cache.enable_ssd and self.cache.ssd_persist_index:  # a restart must not undo the reset
                _write_reset_generation(self.cache.ssd_cache_dir[0], self.control.reset_generation)
            for key in dropped:  # not launched: final as CANCELLED for any later wait
                self._matched.pop(key, None)
                cancelled = KVResponse(TaskStatus.CANCELLED, key[1], None)
                self._remember(key, cancelled, cancelled)
            log.info("reset: every tier's index dropped; %d unlaunched task(s) cancelled", len(dropped))
            info = {"cancelled": len(dropped)}
        elif msg.what == "shutdown":
            self._running = False
            info = {"ok": True}
        else:
            raise _invalid(f"unknown query {msg.what!r}; allowed: is_ready, stats, snapshot, check, reset, "
                           "shutdown")
        self._reply(identity, cm.OkReplyMsg(req_id=msg.req_id, info=info))

    def _session_stats(self) -> dict[str, int]:
        return {"num_sessions": len(self._sessions), "num_results": len(self._results),
                "result_cache_bytes": self._results.nbytes, "num_waits": len(self._waits),
                "num_unlaunched_matches": len(self._matched)}

    def _check_sessions(self) -> None:
        """Every task, wait, result and registration belongs to a live session (raises AssertionError)."""
        live = {s.session_id: s for s in self._sessions.values()}

        def owned(key: TaskKey) -> bool:
            s = live.get(session_of(key))
            return s is not None and s.owns(key)

        tasks = self.control.task_keys()
        assert all(owned(k) for k in tasks), "a task belongs to no live session"
        assert all(owned(k) for k in self._results.keys()), "a result belongs to no live session"
        assert set(self._matched) | self._launched <= set(tasks), "a matched or launched key left the control plane"
        assert not set(self._matched) & self._launched, "a task is both unlaunched and launched"
        assert self._landing <= self._launched, "a landing task that is not running"
        assert self._layer_major <= self._launched, "a layer-wise task that is not running"
        assert all(live.get(w.session.session_id) is w.session for w in self._waits), "a wait of a gone session"
        assert all(r.session_id in live for r in self._registrations.values()), "a registration of a gone session"
        self._results.check_invariants()

    def is_ready(self) -> bool:
        want = {(d, r) for d in range(self.model.dp_size) for r in range(self.model.tp_size)}
        workers_ready = all(h.ready and not h.down_reason for h in self.supervisor.workers.values())
        return want <= self._registered and workers_ready

    # -- tasks and waits ------------------------------------------------------------------------
    def _status(self, key: TaskKey, completely: bool) -> TaskStatus:
        cached = self._results.get(key)
        if cached is not None:
            return cached[1 if completely else 0].status
        return self.control.poll(key, completely).status

    def _result(self, key: TaskKey, completely: bool) -> TaskResult:
        cached = self._results.get(key)
        if cached is not None:
            return cached[1 if completely else 0]
        return TaskResult.of(self.control.poll(key, completely))

    def _is_final(self, key: TaskKey, status: TaskStatus) -> bool:
        """Final for a wait: done, or matched but never launched (waiting cannot help)."""
        return status in _FINAL or (status is TaskStatus.UNREADY and key not in self._launched)

    def _check_waits(self) -> None:
        if not self._waits:
            return
        now = time.monotonic()
        keep: list[_Wait] = []
        for w in self._waits:
            final = [self._is_final(k, self._status(k, w.completely)) for k in w.keys]
            landing = [not f and w.landing and k in self._landing for k, f in zip(w.keys, final, strict=True)]
            done = all(f or la for f, la in zip(final, landing, strict=True))
            if not done and now < w.deadline:
                keep.append(w)
                continue
            results = [self._result(k, w.completely) for k in w.keys]
            statuses = [r.status if f else TaskStatus.UNREADY if la else TaskStatus.TIMEOUT
                        for r, f, la in zip(results, final, landing, strict=True)]
            reply = cm.WaitReplyMsg(req_id=w.req_id, task_ids=w.task_ids, statuses=[int(s) for s in statuses],
                                    errors=[r.error if r.status is TaskStatus.FAILED else "" for r in results],
                                    num_tokens=[r.num_tokens for r in results],
                                    mask_begins=[r.begin for r in results], mask_ends=[r.end for r in results],
                                    landing=landing if any(landing) else [])
            if hoptrace.ENABLED:
                for tid in w.task_ids:
                    hoptrace.mark("server_replied", tid)
            self._reply(w.session.identity, reply, [r.mask for r in results if r.mask is not None])
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

    def _remember(self, key: TaskKey, engine: KVResponse, full: KVResponse, task_type: TaskType | None = None) -> None:
        self._landing.discard(key)
        self._layer_major.discard(key)
        self._results.put(key, engine, full)
        self.telemetry.on_final(key, engine, full, task_type)

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
        if worker_id is None and isinstance(msg, WorkerByeMsg):
            # A worker the server already stopped (its session ended) says goodbye as it exits: expected,
            # and a bye can complete nothing, so it is neither refused nor counted.
            log.debug("bye from %r after its worker was removed", msg.worker_id)
        elif worker_id is None or msg.worker_id != worker_id:
            self.supervisor.refuse(routing_id, f"{type(msg).__name__} as {msg.worker_id!r} from a connection "
                                               f"that is not that worker's: dropped")
        elif isinstance(msg, OpsDoneMsg) and len(msg.op_ids) != len(msg.errors):
            log.warning("OpsDoneMsg from %s with %d op ids and %d errors ignored", worker_id, len(msg.op_ids),
                        len(msg.errors))
        elif isinstance(msg, OpsDoneMsg):
            if len(msg.corrupt_at) == len(msg.op_ids):  # only ops in flight on this worker count
                in_flight = self.supervisor.workers[worker_id].in_flight if worker_id in self.supervisor.workers \
                    else set()
                self._corrupt_at.update((op_id, at) for op_id, at in zip(msg.op_ids, msg.corrupt_at, strict=True)
                                        if at >= 0 and op_id in in_flight)
            self.telemetry.on_reported(msg)
            if hoptrace.ENABLED:
                for op_id in msg.op_ids:
                    for key in self._op_keys.get(op_id, ()):
                        hoptrace.mark("server_completed", task_of(key))
            self._complete(self.supervisor.on_done(worker_id, msg.op_ids, msg.errors))
        elif isinstance(msg, WorkerByeMsg) and self.supervisor.on_bye(routing_id) is not None:
            self._lane_gone(worker_id, msg.reason or "closed")

    def _dispatch(self, ops: list[TransferOp]) -> None:
        """Send ops that became ready together; each direction's device ops go as one batched op."""
        pending = self.control.coalesce(ops)
        while pending:
            op = pending.pop()
            self._op_keys[op.op_id] = op.task_keys
            self.telemetry.on_dispatch(op)
            if hoptrace.ENABLED:
                for key in op.task_keys:
                    hoptrace.mark("server_dispatched", task_of(key))
            layer_major = op.op_type is OpType.H2D and not self._layer_major.isdisjoint(op.task_keys)
            failure = self.supervisor.dispatch(op, layer_major)
            if failure is not None:
                pending += self._complete_one(failure)
            elif op.op_type is OpType.H2D and self.supervisor.publishes_landing(op):
                self._landing.update(op.task_keys)

    def _complete(self, results: list[OpResult]) -> None:
        """Apply completions; then start the ops they released (those of one report as one batch: e.g.
        several DISK2H ending together release one H2D), answer the waits they ended (the engine hears
        of its task in this loop turn) and only then move finished tasks out."""
        finished: list[TaskKey] = []
        ops: list[TransferOp] = []
        for result in results:
            ops += self._complete_one(result, finished)
        self._dispatch(ops)
        if finished:
            self._check_waits()
            self._retire(finished)

    def _complete_one(self, result: OpResult, finished: list[TaskKey] | None = None) -> list[TransferOp]:
        """Apply one completion; returns the ops it released. A task with nothing left to run is
        retired, or added to ``finished`` for the caller to retire."""
        op_id, error = result
        if error:
            log.warning("op %d failed: %s", op_id, error)
        keys = self._op_keys.pop(op_id, ())
        corrupt_at = self._corrupt_at.pop(op_id, -1)
        self.telemetry.on_op_done(op_id, error)
        try:
            ops = self.control.complete_op(op_id, not error, error, corrupt_at)
        except FlexKVError as e:  # e.g. an op of a task dropped meanwhile
            log.debug("completion of op %d ignored: %s", op_id, e)
            return []
        if finished is None:
            self._retire(list(keys))  # those with ops still to run stay
        else:
            finished.extend(keys)
        return ops

    # -- sessions ending ------------------------------------------------------------------------
    def _end_session(self, session: Session, reason: str, dead: bool = False) -> None:
        """Drop everything ``session`` owned: tasks (ops already running finish and roll back), waits,
        results and registrations (their device workers stop; a ``dead`` client's host KV segment is
        removed if its creator is gone too)."""
        if self._sessions.get(session.identity) is session:
            del self._sessions[session.identity]
        self.telemetry.on_disconnect()
        keys = [k for k in self.control.task_keys() if session.owns(k)]
        for key in keys:
            self.control.release(key)
            self._launched.discard(key)
            self._matched.pop(key, None)
        num_results = self._results.drop_session(session)
        self._waits = [w for w in self._waits if w.session is not session]
        self._landing = {k for k in self._landing if not session.owns(k)}
        self._layer_major = {k for k in self._layer_major if not session.owns(k)}
        log_fn = log.warning if dead else log.info
        log_fn("session %d (client %d, %s, pid %d) ended: %s; dropped %d tasks and %d results", session.session_id,
               session.client_id, session.role, session.pid, reason, len(keys), num_results)
        stop_reason = f"its TP client's session ended: {reason}"
        for rank_key, reg in list(self._registrations.items()):
            if reg.session_id != session.session_id:
                continue
            del self._registrations[rank_key]
            self._registered.discard(rank_key)
            self._complete(self.supervisor.remove(device_worker_id(*rank_key), stop_reason))
            if dead and reg.host_segment and unlink_if_creator_dead(reg.host_segment):
                log.warning("removed host KV segment %s of dead client pid %d", reg.host_segment, session.pid)
            if dead and reg.fence and unlink_if_creator_dead(reg.fence):
                log.info("removed KV fence %s of dead client pid %d", reg.fence, session.pid)

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop workers, unlink the shared-memory pool, remove socket files. Idempotent; also undoes a
        start that failed half way."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "supervisor"):
            self.supervisor.stop_all()
        if self._auth is not None:
            self._auth.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        trace: TraceWriter | None = getattr(self, "trace", None)
        if trace is not None:
            trace.close()
        self._ctx.destroy(linger=0)
        pool: SharedPool | None = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
            pool.unlink()
        lookup: RemoteLookup | None = getattr(self, "_remote_lookup", None)
        if lookup is not None:
            lookup.close()  # its thread uses the lookup store: stop it first
        if self._lookup_store is not None:
            self._lookup_store.close()
        for claim in self._claims:  # only the paths this server bound: never another server's
            claim.release()
        self._claims = []
        if self._own_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("flexkv server stopped")


def _is_segment_name(name: str) -> bool:
    """A name ``flexkv.shm.make_pool_name`` makes: ``/flexkv-<tag>-<pid>-<hex>``, at most 31 characters."""
    return len(name) <= 31 and re.fullmatch(r"/flexkv-[a-z0-9_]+-[0-9]+-[0-9a-f]+", name) is not None


_REG_FIELDS = ("num_layers", "num_blocks", "tokens_per_block", "num_heads", "head_size", "itemsize",
               "host_segment", "tensor_offsets", "device_id", "layer_progress", "fence")


def _invalid(msg: str) -> FlexKVError:
    from flexkv.types import InvalidRequest

    return InvalidRequest(msg)


_RESET_FILE = "flexkv_reset_generation"


def _read_reset_generation(ssd_dir: str) -> int:
    """Resets recorded beside a durable SSD tier (0: none, or an unreadable file: said in the log)."""
    try:
        with open(os.path.join(ssd_dir, _RESET_FILE), encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        raise ConfigError(f"{os.path.join(ssd_dir, _RESET_FILE)}: unreadable ({e}); remove it together with the "
                          "SSD cache files to start the SSD tier cold") from None


def _write_reset_generation(ssd_dir: str, generation: int) -> None:
    """Durably (temp file, fsync, rename, fsync of the directory) before the reset is acknowledged."""
    path = os.path.join(ssd_dir, _RESET_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{generation}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(ssd_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

