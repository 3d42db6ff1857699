"""KVManager: the engine-facing API of one DP client (DESIGN.md §2).

With no ``server_address`` it runs in library mode: ``start()`` launches the server (and through it
the workers) as a child process and ``shutdown()`` (or interpreter exit) stops it. With an address it
connects to a running server. Task ids are chosen here (unique per session: each ``start()`` opens a
new session, and the server never shows one session another's tasks or results), so ``get_async``,
``put_async``, ``launch`` and ``cancel`` are fire-and-forget; their errors surface at ``wait``.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import xxhash

from flexkv import hoptrace
from flexkv.client import HostKVBuffers, KVTPClient
from flexkv.common.config import CacheConfig, ModelConfig, configs_to_json
from flexkv.layerwise import LayerProgress, check_layer_index, wait_for_layer
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.native.hasher import encode_namespace, hash_blocks
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.codec import range_to_mask
from flexkv.scheduler.main import STARTUP_ERROR_FILE
from flexkv.transport import ServerConnection, ServerUnavailable
from flexkv.types import CACHE_TIERS, FlexKVError, InvalidRequest, KVResponse, MatchInfo, TaskStatus

log = logging.getLogger("flexkv")

IntArrayLike = Any  # numpy array or torch tensor
R = TypeVar("R")


SESSION_TASK_BITS = 32  # a session's task ids: its base, then up to 2**32 ids
_SESSION_BASES = (1 << 16) - 1  # bases 1 .. 65535 << 32: ids stay below 2**48 (flexkv.layerwise.MAX_TASK_ID)


def _session_task_base(session_id: int) -> int:
    """Where the task ids of server session ``session_id`` start: ``session << 32`` (wrapping after 65,535
    sessions of one server). Task ids of different sessions then never coincide, so a rank's layer progress
    table (its KVTPClient may outlive manager sessions: server mode, a manager reconnecting) never reports
    an earlier session's landed task for a new task of the same id (issue 14: that was a GET reported
    landed before its bytes were there)."""
    return ((session_id - 1) % _SESSION_BASES + 1) << SESSION_TASK_BITS


def _int64(name: str, value: IntArrayLike) -> npt.NDArray[np.int64]:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise InvalidRequest(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    if value.ndim != 1:
        raise InvalidRequest(f"{name} must be 1-D, got shape {value.shape}")
    if value.dtype not in (np.int64, np.int32):
        raise InvalidRequest(f"{name} must be int64 (or int32), got {value.dtype}")
    return np.ascontiguousarray(value, dtype=np.int64)


def _slots_digest(slots: npt.NDArray[np.int64]) -> int:
    """What a task was launched with, to tell a repeated launch (a no-op) from a conflicting one."""
    return xxhash.xxh3_64_intdigest(slots.tobytes())


def _mask(value: IntArrayLike | None, num_tokens: int) -> npt.NDArray[np.bool_] | None:
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.dtype != np.bool_ or value.ndim != 1:
        raise InvalidRequest("token_mask must be a 1-D bool array or tensor")
    if value.shape[0] != num_tokens:
        raise InvalidRequest(f"token_mask has {value.shape[0]} entries for {num_tokens} tokens")
    return np.ascontiguousarray(value)


def _check_timeout(timeout: object) -> float:
    """A wait timeout in seconds: >= 0, ``inf`` allowed; InvalidRequest for NaN, negatives, non-numbers."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidRequest(f"wait: timeout must be a number of seconds, got {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidRequest(f"wait: timeout must be >= 0 seconds (inf: until final), got {timeout!r}")
    return float(timeout)


def _namespace(namespace: Sequence[str] | None) -> list[str] | None:
    if namespace is None:
        return None
    if isinstance(namespace, str) or not all(isinstance(p, str) for p in namespace):
        raise InvalidRequest("namespace must be a list of strings (e.g. [lora_name, tenant]), not "
                             f"{type(namespace).__name__}")
    return list(namespace)


_PAGE_KEY_SEED = xxhash.xxh3_64_intdigest(b"flexkv page keys v1")


def hash_page_keys(page_keys: Sequence[str | bytes], namespace: Sequence[str] | None = None) -> npt.NDArray[np.uint64]:
    """flexkv block keys (uint64) for an engine that names its pages itself (SGLang's page hashes).

    Key i is xxh3-64 of page key i seeded with key i - 1 (the first with the namespace), so it names
    the whole chain of page keys up to page i, as flexkv's token hashes name their prefix. Pass the
    chain from the sequence's first page. Pure function, any process; TypeError for a key that is
    neither str nor bytes.
    """
    seed = xxhash.xxh3_64_intdigest(encode_namespace(_namespace(namespace)), seed=_PAGE_KEY_SEED)
    out = np.empty(len(page_keys), dtype=np.uint64)
    for i, key in enumerate(page_keys):
        if isinstance(key, str):
            key = key.encode()
        elif not isinstance(key, bytes):
            raise TypeError(f"page key {i} must be str or bytes, got {type(key).__name__}")
        seed = xxhash.xxh3_64_intdigest(key, seed=seed)
        out[i] = seed
    return out


class KVManager:
    """One DP client of a flexkv server. Thread-safe for concurrent calls."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, server_address: str | None = None,
                 dp_client_id: int = 0, start_timeout_s: float = 120.0, request_timeout_s: float = 60.0,
                 *, first_task_id: int = 1) -> None:
        self.model_config, self.cache_config = model_config, cache_config
        self.dp_client_id = dp_client_id
        self._address = server_address
        self._library_mode = server_address is None
        self._start_timeout_s = start_timeout_s
        self._request_timeout_s = request_timeout_s
        self._conn: ServerConnection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._runtime_dir: str | None = None
        # Task ids are the session's own: ``_task_base`` + ``first_task_id`` + n, the base set from the
        # session id at every start (see _session_task_base), so no two sessions of one server hand out the
        # same id: a rank's layer progress table, which outlives a manager's session, keys its words by id.
        self._first_task_id = first_task_id
        self._task_base = 0
        self._task_ids = itertools.count(first_task_id)
        self._last_task_id = first_task_id - 1  # ids _task_base + first_task_id .. _last_task_id were handed out
        self._launched: dict[int, int] = {}  # task id -> digest of the slot mapping it was launched with
        self._tp_clients: list[KVTPClient] = []
        self._layerwise: set[int] = set()  # tasks launched with layerwise=True, not yet final
        self.num_waits_landed = 0  # GET waits that ended from the ranks' progress tables (see _await_landing)
        self._tokens_per_block = cache_config.tokens_per_block  # the server's, once connected

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def server_address(self) -> str:
        if self._address is None:
            raise FlexKVError("KVManager not started: call start() first")
        return self._address

    @property
    def tokens_per_block(self) -> int:
        """The server's block size in tokens (the config's until connected)."""
        return self._tokens_per_block

    def start(self) -> None:
        """Start the server (library mode) or connect to it. Idempotent."""
        if self._conn is not None:
            return
        self._launched = {}
        if self._library_mode:
            self._spawn_server()
        self._conn = ServerConnection(self.server_address, self.dp_client_id, "manager", self._request_timeout_s,
                                      busy_poll_us=self.cache_config.busy_poll_us)
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            try:
                self._conn.hello(timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
                break
            except ServerUnavailable:
                if self._proc is not None and self._proc.poll() is not None:
                    reason = f"flexkv server exited with code {self._proc.returncode} during start"
                    try:
                        with open(os.path.join(str(self._runtime_dir), STARTUP_ERROR_FILE), encoding="utf-8") as f:
                            reason += f": {f.read()}"
                    except OSError:
                        pass
                    self._conn.close()
                    self._conn = None
                    self._cleanup_library()
                    raise FlexKVError(reason) from None
                if time.monotonic() >= deadline:
                    self.shutdown()
                    raise
        self._tokens_per_block = int(self._conn.server_info["tokens_per_block"])
        self._task_base = _session_task_base(self._conn.session_id)  # a new session: new task ids
        self._task_ids = itertools.count(self._task_base + self._first_task_id)
        self._last_task_id = self._task_base + self._first_task_id - 1
        atexit.register(self.shutdown)

    def _spawn_server(self) -> None:
        self._runtime_dir = tempfile.mkdtemp(prefix="flexkv-")
        self._address = f"ipc://{self._runtime_dir}/server.sock"
        cmd = [sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
               configs_to_json(self.model_config, self.cache_config), "--runtime-dir", self._runtime_dir,
               "--address", self._address, "--parent-pid", str(os.getpid())]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def shutdown(self) -> None:
        """Stop using the server; in library mode stop it too (workers, shared memory, sockets). Idempotent."""
        for tp in self._tp_clients:
            tp.close()
        self._tp_clients = []
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.request(lambda rid: cm.QueryMsg(client_id=self.dp_client_id, req_id=rid, what="shutdown"),
                                   timeout_s=5.0)
            except FlexKVError:
                self._proc.terminate()
        if self._conn is not None:
            self._conn.close(bye=self._proc is None)  # server mode: end the session, the server goes on
            self._conn = None
        self._cleanup_library()
        atexit.unregister(self.shutdown)

    def _cleanup_library(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def __enter__(self) -> KVManager:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()

    @property
    def _c(self) -> ServerConnection:
        if self._conn is None:
            raise FlexKVError("KVManager not started: call start() first")
        return self._conn

    def _query(self, what: str) -> dict[str, Any]:
        reply, _ = self._c.request(lambda rid: cm.QueryMsg(client_id=self.dp_client_id, req_id=rid, what=what))
        assert isinstance(reply, cm.OkReplyMsg)
        return dict(reply.info)

    def is_ready(self) -> bool:
        """True once every TP rank of every DP client registered its KV buffers and all workers run."""
        return bool(self._query("is_ready")["ready"])

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise FlexKVError(f"server not ready after {timeout_s} s (are all TP ranks registered?)")
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        return self._query("stats")

    def check_invariants(self) -> None:
        """Run the server's index/pool/task invariant checks (raises FlexKVError if one fails)."""
        self._query("check")

    def register_kv_buffers(self, kv_tensors: Sequence[Any] | HostKVBuffers, layout: KVCacheLayout | LayoutKind | str,
                            tp_rank: int = 0, device_id: int = 0, *, layerwise: bool = False,
                            engine_side: bool = False) -> KVCacheLayout:
        """Register KV buffers from this process (single-process engines; no separate TP client).
        ``layerwise``: the rank publishes each GET's landing in a progress table: GETs launched with
        ``layerwise=True`` land layer by layer (see :meth:`wait_layer`), and once every rank is registered
        so, :meth:`wait` on a GET ends from the tables instead of the server's reply (docs/layerwise.md).
        ``engine_side``: this rank's device worker runs as a thread of this process (see
        ``KVTPClient.register``)."""
        tp = KVTPClient(self.server_address, self.dp_client_id, tp_rank, device_id)
        self._tp_clients.append(tp)
        return tp.register(kv_tensors, layout, layerwise=layerwise, engine_side=engine_side)

    def seal_kv_buffers(self, timeout_s: float = 10.0) -> None:
        """Seal every rank this manager registered (``KVTPClient.seal``): the copies running now end, and
        from then on no flexkv process reads or writes those KV buffers, whatever the server does later
        (a stalled server that resumes included). For an engine that hands pages of launched tasks back
        to its own allocator after the server stopped answering. Registering again makes a new fence."""
        for tp in self._tp_clients:
            tp.seal(timeout_s)

    # -- tasks ----------------------------------------------------------------------------------
    def _match(self, cls: type[cm.GetMatchMsg], token_ids: IntArrayLike, token_mask: IntArrayLike | None,
               namespace: Sequence[str] | None) -> tuple[int, npt.NDArray[np.bool_]]:
        task_id, mask, _ = self._match_reply(cls, token_ids, token_mask, namespace)
        return task_id, mask

    def _match_reply(self, cls: type[cm.GetMatchMsg], token_ids: IntArrayLike, token_mask: IntArrayLike | None,
                     namespace: Sequence[str] | None, slots: npt.NDArray[np.int64] | None = None,
                     task_id: int | None = None, **fields: Any) -> tuple[int, npt.NDArray[np.bool_], cm.MatchReplyMsg]:
        conn = self._c
        tokens = _int64("token_ids", token_ids)
        mask = _mask(token_mask, tokens.shape[0])
        if slots is not None and slots.shape[0] != tokens.shape[0]:
            raise InvalidRequest(f"slot_mapping has {slots.shape[0]} slots for {tokens.shape[0]} tokens: one per token")
        if task_id is None:
            task_id = self._new_task_id()
        # Hash here (C, ~45 us per 128K tokens): 8 bytes a block cross the socket instead of 8 a token,
        # and the server's one thread does less.
        ns = encode_namespace(_namespace(namespace))
        hashes = hash_blocks(tokens, self._tokens_per_block, ns)
        arrays: list[Any] = [hashes] + ([mask] if mask is not None else []) + ([slots] if slots is not None else [])
        reply, frames = conn.request(lambda rid: cls(client_id=self.dp_client_id, req_id=rid, task_id=task_id,
                                                     has_mask=mask is not None, num_tokens=tokens.shape[0], **fields),
                                        arrays)
        assert isinstance(reply, cm.MatchReplyMsg)
        mask = range_to_mask(reply.num_tokens, reply.mask_begin, reply.mask_end, frames)
        assert mask is not None
        return task_id, mask, reply

    def get_match(self, token_ids: IntArrayLike, token_mask: IntArrayLike | None = None,
                  namespace: Sequence[str] | None = None) -> tuple[int, npt.NDArray[np.bool_]]:
        """Match only and reserve the plan; the mask marks the tokens that will be loaded."""
        return self._match(cm.GetMatchMsg, token_ids, token_mask, namespace)

    def get_match_launch(self, token_ids: IntArrayLike, slot_mapping: IntArrayLike,
                         token_mask: IntArrayLike | None = None, namespace: Sequence[str] | None = None,
                         layerwise: bool = False) -> tuple[int, npt.NDArray[np.bool_]]:
        """``get_match`` and ``launch`` in one round trip: the server launches the GET as soon as it matched,
        into ``slot_mapping`` (one slot per token of ``token_ids``; the loaded tokens' slots are used, as
        launch's full form), and replies once its copies went to the workers. Returns ``(task_id, mask)``
        as get_match; ``wait`` / ``wait_layer`` as after launch. Only a match with no token is not
        launched: cancel it as after get_match. ``layerwise`` as in :meth:`launch`.

        The engine gives slots for tokens it may not get (it learns the match with the reply), so it holds
        pages for the whole of ``token_ids`` until then; the copy starts about one client round trip
        (launch's message and the server's turn for it) sooner than with get_match, then launch."""
        slots = _int64("slot_mapping", slot_mapping)
        if layerwise and self._tp_clients:
            self._layer_tables()  # raises unless every rank registered here has a progress table
        task_id = self._new_task_id()
        _, mask, _ = self._matched_launch(
            task_id, slots, layerwise,
            lambda: self._match_reply(cm.GetMatchLaunchMsg, token_ids, token_mask, namespace, slots, task_id,
                                      layerwise=layerwise),
            lambda reply: bool(reply[1].any()))
        return task_id, mask

    def _matched_launch(self, task_id: int, slots: npt.NDArray[np.int64], layerwise: bool, request: Callable[[], R],
                        launched: Callable[[R], bool]) -> R:
        """Send a match that also launches ``task_id`` into ``slots`` (``request``), remembering the launch
        as :meth:`launch` does (a later launch of the same slots is a no-op; ``wait_layer`` knows a layer-wise
        task) unless the request failed or, by ``launched`` of its result, the server launched nothing."""
        self._launched[task_id] = _slots_digest(slots)
        if layerwise:
            self._layerwise.add(task_id)
        try:
            result = request()
        except BaseException:
            self._forget(task_id)
            raise
        if not launched(result):
            self._forget(task_id)
        return result

    def get_match_info(self, token_ids: IntArrayLike, token_mask: IntArrayLike | None = None,
                       namespace: Sequence[str] | None = None) -> MatchInfo:
        """``get_match`` plus what loading it should cost: how the loaded blocks split over the tiers
        (CPU prefix, then SSD, then remote) and the server's read rate of each tier. Reserves exactly
        what ``get_match`` reserves: launch or cancel ``MatchInfo.task_id``. An engine may cancel it and
        match a shorter prefix (e.g. ``token_ids[:info.num_cpu_tokens]``) if loading costs more than
        recomputing; the cancel is sent first, so the second match sees the first one's locks gone."""
        task_id, mask, reply = self._match_reply(cm.GetMatchInfoMsg, token_ids, token_mask, namespace)
        if not isinstance(reply, cm.MatchInfoReplyMsg) or len(reply.tier_blocks) != 3 or len(reply.read_bps) != 3:
            raise FlexKVError("get_match_info: the server's reply has no tier split (an older server?)")
        cpu, ssd, remote = reply.tier_blocks
        rates = dict(zip(CACHE_TIERS, reply.read_bps, strict=True))
        return MatchInfo(task_id, mask, cpu, ssd, remote, self._block_bytes(), self._tokens_per_block, rates)

    def _block_bytes(self) -> int:
        return int(self._c.server_info["block_bytes"])

    def put_match(self, token_ids: IntArrayLike, token_mask: IntArrayLike | None = None,
                  namespace: Sequence[str] | None = None) -> tuple[int, npt.NDArray[np.bool_]]:
        """Match only; the mask marks the tokens not yet cached, which will be stored."""
        return self._match(cm.PutMatchMsg, token_ids, token_mask, namespace)

    # -- key-based tasks (engines that hash their own pages) ------------------------------------
    def _match_keys(self, cls: type[cm.GetMatchMsg], block_keys: npt.NDArray[np.uint64], first_block: int,
                    slots: npt.NDArray[np.int64] | None = None, task_id: int | None = None) -> tuple[int, int, int]:
        keys = np.ascontiguousarray(block_keys)
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise InvalidRequest(f"block_keys must be a 1-D uint64 array (see hash_page_keys), got {keys.dtype} "
                                 f"of shape {keys.shape}")
        if not 0 <= first_block <= keys.shape[0]:
            raise InvalidRequest(f"first_block {first_block} out of range [0, {keys.shape[0]}]")
        t = self._tokens_per_block
        num_tokens = keys.shape[0] * t
        mask = None
        if first_block:
            mask = np.zeros(num_tokens, dtype=np.bool_)
            mask[first_block * t:] = True
        if slots is not None and slots.shape[0] != num_tokens - first_block * t:
            raise InvalidRequest(f"slot_mapping has {slots.shape[0]} slots; the blocks from first_block {first_block} "
                                 f"on need {num_tokens - first_block * t} (one per token)")
        tid = self._new_task_id() if task_id is None else task_id
        arrays: list[Any] = [keys] + ([mask] if mask is not None else []) + ([slots] if slots is not None else [])
        reply, _ = self._c.request(lambda rid: cls(client_id=self.dp_client_id, req_id=rid, task_id=tid,
                                                   has_mask=mask is not None, num_tokens=num_tokens), arrays)
        assert isinstance(reply, cm.MatchReplyMsg)
        if reply.mask_begin < 0:  # the server's mask is always one run of whole blocks
            raise FlexKVError("key match: the server returned a mask that is not one run of blocks")
        if reply.mask_end <= reply.mask_begin:
            return tid, first_block, first_block
        return tid, reply.mask_begin // t, reply.mask_end // t

    def get_match_keys(self, block_keys: npt.NDArray[np.uint64], first_block: int = 0) -> tuple[int, int, int]:
        """Reserve a GET of the blocks named by ``block_keys`` (:func:`hash_page_keys` of the chain from the
        sequence's first page) from ``first_block`` on; the earlier keys only locate the prefix.

        Returns ``(task_id, begin, end)``: blocks ``[begin, end)`` will be loaded (``begin == end``: none).
        Launch it with a compact slot mapping of the blocks from ``first_block`` on, or cancel it."""
        return self._match_keys(cm.GetMatchMsg, block_keys, first_block)

    def get_match_keys_launch(self, block_keys: npt.NDArray[np.uint64], slot_mapping: IntArrayLike,
                              first_block: int = 0) -> tuple[int, int, int]:
        """:meth:`get_match_keys` and :meth:`launch` in one round trip (as :meth:`get_match_launch`): the
        server launches the GET into ``slot_mapping`` (compact: one slot per token of the blocks from
        ``first_block`` on, the form launch takes after get_match_keys) as soon as it matched. Returns
        ``(task_id, begin, end)``; ``begin == end``: nothing matched and nothing was launched (cancel it)."""
        slots = _int64("slot_mapping", slot_mapping)
        task_id = self._new_task_id()
        return self._matched_launch(task_id, slots, False,
                                    lambda: self._match_keys(cm.GetMatchLaunchMsg, block_keys, first_block, slots,
                                                             task_id),
                                    lambda got: got[2] > got[1])

    def put_match_keys(self, block_keys: npt.NDArray[np.uint64], first_block: int = 0) -> tuple[int, int, int]:
        """Reserve a PUT of the blocks of ``block_keys`` from ``first_block`` on that flexkv lacks; like
        :meth:`get_match_keys`, ``[begin, end)`` are the blocks that will be stored. Blocks before ``begin``
        are cached already (or being written); a put whose prefix is not cached stores nothing."""
        return self._match_keys(cm.PutMatchMsg, block_keys, first_block)

    def count_cached_keys(self, block_keys: npt.NDArray[np.uint64], first_block: int = 0) -> int:
        """How many blocks from ``first_block`` on are cached and ready, as a run (any tier); reserves
        nothing (the match is cancelled at once)."""
        task_id, _, end = self.get_match_keys(block_keys, first_block)
        self.cancel(task_id)
        return end - first_block

    def launch(self, task_ids: int | Sequence[int], slot_mappings: IntArrayLike | Sequence[IntArrayLike],
               layerwise: bool = False) -> None:
        """Bind GPU slots to matched tasks and start their transfers (no reply; errors at wait).

        ``layerwise=True`` (GETs): the engine will wait for each layer with :meth:`wait_layer` (ranks
        registered through this manager) or ``KVTPClient.wait_layer`` (ranks in other processes) before
        computing it: the ranks' workers copy it layer by layer (others copy whole, which is faster). The
        ranks must be registered with ``layerwise=True``; those registered here are checked. A task id this
        session never handed out is InvalidRequest here; a cancelled or expired one is ignored."""
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        if layerwise:
            if self._tp_clients:
                self._layer_tables()  # raises unless every rank registered here has a progress table
            self._layerwise.update(ids)
        maps = [slot_mappings] if isinstance(task_ids, int) else list(slot_mappings)
        if len(ids) != len(maps):
            raise InvalidRequest(f"launch: {len(ids)} task ids but {len(maps)} slot mappings")
        send_ids, send_maps = [], []
        for tid, sm in zip(ids, maps, strict=True):
            slots = _int64("slot_mapping", sm)
            if self._check_relaunch(tid, slots):
                send_ids.append(tid)
                send_maps.append(slots)
        if send_ids:
            self._c.send(cm.LaunchMsg(client_id=self.dp_client_id, task_ids=send_ids, layerwise=layerwise), send_maps)

    def _new_task_id(self) -> int:
        self._last_task_id = next(self._task_ids)
        return self._last_task_id

    def _check_relaunch(self, task_id: int, slots: npt.NDArray[np.int64]) -> bool:
        issued = isinstance(task_id, int) and self._task_base + self._first_task_id <= task_id <= self._last_task_id
        if isinstance(task_id, bool) or not issued:
            raise InvalidRequest(f"launch: task id {task_id!r} was not returned by get_match/put_match of this "
                                 "KVManager session")
        digest = _slots_digest(slots)
        old = self._launched.get(task_id)
        if old is None:
            self._launched[task_id] = digest
            return True
        if old != digest:
            raise InvalidRequest(f"task {task_id} was already launched with a different slot_mapping")
        return False

    def _async(self, cls: type[cm.GetAsyncMsg], token_ids: IntArrayLike, slot_mapping: IntArrayLike,
               token_mask: IntArrayLike | None, namespace: Sequence[str] | None) -> int:
        tokens = _int64("token_ids", token_ids)
        slots = _int64("slot_mapping", slot_mapping)
        mask = _mask(token_mask, tokens.shape[0])
        task_id = self._new_task_id()
        self._launched[task_id] = _slots_digest(slots)
        arrays: list[Any] = [tokens, slots] + ([mask] if mask is not None else [])
        ns = _namespace(namespace)
        if hoptrace.ENABLED:
            hoptrace.mark_kind(cls is cm.PutAsyncMsg, task_id)
            hoptrace.mark("client_send", task_id)
        self._c.send(cls(client_id=self.dp_client_id, task_id=task_id, namespace=ns, has_mask=mask is not None),
                     arrays)
        return task_id

    def get_async(self, token_ids: IntArrayLike, slot_mapping: IntArrayLike, token_mask: IntArrayLike | None = None,
                  namespace: Sequence[str] | None = None) -> int:
        """Match + launch a GET in one message; returns the task id at once."""
        return self._async(cm.GetAsyncMsg, token_ids, slot_mapping, token_mask, namespace)

    def put_async(self, token_ids: IntArrayLike, slot_mapping: IntArrayLike, token_mask: IntArrayLike | None = None,
                  namespace: Sequence[str] | None = None) -> int:
        """Match + launch a PUT in one message; returns the task id at once."""
        return self._async(cm.PutAsyncMsg, token_ids, slot_mapping, token_mask, namespace)

    def _async_many(self, cls: type[cm.GetAsyncBatchMsg], token_ids: Sequence[IntArrayLike],
                    slot_mappings: Sequence[IntArrayLike], token_masks: Sequence[IntArrayLike | None] | None,
                    namespaces: Sequence[Sequence[str] | None] | None) -> list[int]:
        num = len(token_ids)
        masks_in = [None] * num if token_masks is None else list(token_masks)
        ns_in = [None] * num if namespaces is None else list(namespaces)
        if not len(slot_mappings) == len(masks_in) == len(ns_in) == num:
            raise InvalidRequest(f"{num} token_ids need as many slot_mappings ({len(slot_mappings)}), token_masks "
                                 f"({len(masks_in)}) and namespaces ({len(ns_in)})")
        arrays: list[Any] = []
        has_masks, ns_out, digests = [], [], []
        for toks_in, slots_in, mask_in, ns in zip(token_ids, slot_mappings, masks_in, ns_in, strict=True):
            tokens, slots = _int64("token_ids", toks_in), _int64("slot_mapping", slots_in)
            mask = _mask(mask_in, tokens.shape[0])
            arrays += [tokens, slots] + ([mask] if mask is not None else [])
            has_masks.append(mask is not None)
            ns_out.append(_namespace(ns))
            digests.append(_slots_digest(slots))
        task_ids = [self._new_task_id() for _ in range(num)]
        self._launched.update(zip(task_ids, digests, strict=True))
        if task_ids:
            self._c.send(cls(client_id=self.dp_client_id, task_ids=task_ids,
                             has_masks=has_masks if any(has_masks) else [],
                             namespaces=ns_out if any(n is not None for n in ns_out) else []), arrays)
        return task_ids

    def get_async_many(self, token_ids: Sequence[IntArrayLike], slot_mappings: Sequence[IntArrayLike],
                       token_masks: Sequence[IntArrayLike | None] | None = None,
                       namespaces: Sequence[Sequence[str] | None] | None = None) -> list[int]:
        """Match + launch several GETs in one message; returns their task ids (in order) at once.

        Like that many :meth:`get_async` calls, except that the tasks start together: each device
        worker gets one batched op for all of their copies that are ready (one message, one copy call,
        one completion; tasks that need SSD or remote blocks first follow in a batch of their own once
        those landed). Each task keeps its own status and mask at :meth:`wait`; if a batched op fails,
        every task in it is FAILED. ``token_masks`` and ``namespaces``: None, or one entry (or None)
        per prompt. Bad input is InvalidRequest here, before anything is sent."""
        return self._async_many(cm.GetAsyncBatchMsg, token_ids, slot_mappings, token_masks, namespaces)

    def put_async_many(self, token_ids: Sequence[IntArrayLike], slot_mappings: Sequence[IntArrayLike],
                       token_masks: Sequence[IntArrayLike | None] | None = None,
                       namespaces: Sequence[Sequence[str] | None] | None = None) -> list[int]:
        """Match + launch several PUTs in one message (see :meth:`get_async_many`): their D2H copies go to
        each device worker as one batched op; write-through to SSD/remote stays per task."""
        return self._async_many(cm.PutAsyncBatchMsg, token_ids, slot_mappings, token_masks, namespaces)

    def prefetch_async(self, token_ids: IntArrayLike, namespace: Sequence[str] | None = None) -> int:
        """Stage the prompt's SSD/remote hits into the CPU tier, with no engine destination (no slot
        mapping, no registered buffers needed); returns the task id at once. ``wait``/``try_wait``
        report SUCCESS once staged, with the mask of the prefix a GET can then load from CPU."""
        tokens = _int64("token_ids", token_ids)
        task_id = self._new_task_id()
        self._c.send(cm.PrefetchMsg(client_id=self.dp_client_id, task_id=task_id, namespace=_namespace(namespace)),
                     [tokens])
        return task_id

    def reset(self) -> int:
        """Drop every tier's index (e.g. after a weight update): nothing cached before is matched
        again. Tasks matched but not launched are cancelled (returns how many); running ones finish
        safely and their results are still reported, but what they store is never matched."""
        return int(self._query("reset")["cancelled"])

    def _layer_tables(self) -> list[LayerProgress]:
        tables = self._landing_tables()
        if tables is None:
            have = sorted(tp.tp_rank for tp in self._tp_clients if tp.layer_progress is not None)
            raise InvalidRequest("layer-wise GET needs every TP rank registered through this KVManager with "
                                 f"layerwise=True (have ranks {have} of {self.model_config.tp_size}); "
                                 "ranks in other processes wait with KVTPClient.wait_layer")
        return tables

    def wait_layer(self, task_id: int, layer_index: int, timeout: float = 20.0) -> KVResponse:
        """Block until layer ``layer_index`` of GET ``task_id`` (launched with ``layerwise=True``) is in
        every TP rank's KV buffers, while later layers may still move.

        Returns a KVResponse: SUCCESS once the layer landed (or the whole task succeeded), FAILED as
        soon as a rank's copy failed or the task failed before its copy (the error names why; every
        waiter of the task wakes), CANCELLED, or TIMEOUT after ``timeout`` s. Never returns SUCCESS
        before that layer's bytes are in place. Call :meth:`wait` afterwards as usual to end the task.
        """
        if task_id not in self._layerwise:
            raise InvalidRequest(f"wait_layer: task {task_id} was not launched with layerwise=True "
                                 "(or is already final)")
        check_layer_index(layer_index, self.model_config.num_layers)
        tables = self._layer_tables()

        def final_status() -> KVResponse | None:  # (the server's word only: the tables are read here already)
            resp = self._wait(task_id, 0.0, completely=False, forget=False, landing=False)[task_id]
            return None if resp.status in (TaskStatus.UNREADY, TaskStatus.TIMEOUT) else resp

        resp = wait_for_layer(tables, task_id, layer_index, timeout, final_status)
        if resp.status is TaskStatus.FAILED and not resp.error.startswith("layer-wise"):
            return resp
        if resp.status is TaskStatus.FAILED:  # a worker said so; the server has (or soon has) the reason
            final = self._wait(task_id, min(5.0, timeout), completely=False, forget=False, landing=False)[task_id]
            if final.status is TaskStatus.FAILED:
                return final
        return resp

    def cancel(self, task_ids: int | Sequence[int]) -> None:
        """Cancel tasks matched but not launched: their reservations are released and wait reports
        CANCELLED. A launched task is not cancelled (FlexKV's rule): it runs to its end and wait
        reports how it ended, so no final status comes while its copies may still write your KV
        memory. Unknown ids are ignored."""
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        self._c.send(cm.CancelMsg(client_id=self.dp_client_id, task_ids=ids))

    def wait(self, task_ids: int | Sequence[int], timeout: float = 20.0,
             completely: bool = False) -> dict[int, KVResponse]:
        """Block until every task is final or ``timeout`` seconds passed (those report TIMEOUT).

        ``completely=False`` returns once the engine-side part is done (GET: H2D, PUT: D2H);
        ``completely=True`` also waits for write-through to SSD/remote. ``timeout`` may be
        ``float('inf')`` (wait until final); NaN or a negative value is InvalidRequest, raised before
        anything is sent.
        """
        return self._wait(task_ids, timeout, completely, forget=True)

    def _wait(self, task_ids: int | Sequence[int], timeout: float, completely: bool,
              forget: bool, landing: bool = True) -> dict[int, KVResponse]:
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        deadline = time.monotonic() + _check_timeout(timeout)
        out: dict[int, KVResponse] = {}
        pending = ids
        while True:  # one WaitMsg waits at most MAX_WAIT_S; longer waits take several
            step = min(cm.MAX_WAIT_S, max(0.0, deadline - time.monotonic()))
            out.update(self._wait_once(pending, step, completely, forget, landing))
            pending = [tid for tid in pending if out[tid].status is TaskStatus.TIMEOUT]
            if not pending or time.monotonic() >= deadline:
                return {tid: out[tid] for tid in ids}

    def _wait_once(self, ids: list[int], timeout: float, completely: bool, forget: bool,
                   landing: bool = True) -> dict[int, KVResponse]:
        """One WaitMsg. With every rank's progress table here (``register_kv_buffers(..., layerwise=True)``)
        the server answers a GET as soon as its H2D is on its way, and :meth:`_await_landing` watches the
        tables: the worker's report to the server and the server's reply are then off the GET's path."""
        deadline = time.monotonic() + timeout
        tables = self._landing_tables() if landing and not completely else None
        reply, frames = self._c.request(
            lambda rid: cm.WaitMsg(client_id=self.dp_client_id, req_id=rid, task_ids=ids, timeout_s=timeout,
                                   completely=completely, landing=tables is not None),
            timeout_s=timeout + self._request_timeout_s)
        assert isinstance(reply, cm.WaitReplyMsg)
        if hoptrace.ENABLED:
            for tid in reply.task_ids:
                hoptrace.mark("client_replied", tid)
        out: dict[int, KVResponse] = {}
        watch: dict[int, npt.NDArray[np.bool_] | None] = {}
        for i, tid in enumerate(reply.task_ids):
            st, error = TaskStatus(reply.statuses[i]), reply.errors[i]
            mask = range_to_mask(reply.num_tokens[i], reply.mask_begins[i], reply.mask_ends[i], frames)
            if tables is not None and i < len(reply.landing) and reply.landing[i]:
                watch[tid] = mask
                continue
            out[tid] = KVResponse(st, tid, mask, error)
            if forget and st not in (TaskStatus.UNREADY, TaskStatus.TIMEOUT):
                self._forget(tid)
        if watch:
            assert tables is not None
            out.update(self._await_landing(tables, watch, deadline, forget))
        return out

    def _forget(self, tid: int) -> None:
        self._launched.pop(tid, None)
        self._layerwise.discard(tid)

    def _landing_tables(self) -> list[LayerProgress] | None:
        """Every TP rank's progress table, when all ranks registered through this manager with one."""
        tables = {tp.tp_rank: tp.layer_progress for tp in self._tp_clients if tp.layer_progress is not None}
        return list(tables.values()) if sorted(tables) == list(range(self.model_config.tp_size)) else None

    def _await_landing(self, tables: list[LayerProgress], watch: dict[int, npt.NDArray[np.bool_] | None],
                       deadline: float, forget: bool) -> dict[int, KVResponse]:
        """SUCCESS for each GET of ``watch`` (task id -> its final mask, from the server) once every rank's
        table says its last layer landed (:func:`wait_for_layer`: the worker stores that only after the bytes
        are in the engine's memory). A rank's word saying "failed" (other ranks may still copy), the server's
        final status (polled: a worker that died writes nothing) and ``deadline`` end it with the server's
        own answer. The tasks land in parallel, so waiting for them one after the other costs nothing."""
        last = self.model_config.num_layers - 1
        out: dict[int, KVResponse] = {}
        for tid, mask in watch.items():
            def final_status(tid: int = tid) -> KVResponse | None:
                resp = self._wait_once([tid], 0.0, False, forget, landing=False)[tid]
                return None if resp.status in (TaskStatus.UNREADY, TaskStatus.TIMEOUT) else resp

            resp = wait_for_layer(tables, tid, last, max(0.0, deadline - time.monotonic()), final_status)
            if resp.status is TaskStatus.SUCCESS and resp.return_mask is None:  # (not the server's SUCCESS)
                resp = resp._replace(return_mask=mask)
                self.num_waits_landed += 1
                if hoptrace.ENABLED:
                    hoptrace.mark("client_landed", tid)
                if forget:
                    self._forget(tid)
            elif resp.status in (TaskStatus.FAILED, TaskStatus.TIMEOUT) and resp.return_mask is None:
                # a rank's word said failed, or the deadline passed: the server's answer stands
                resp = self._wait_once([tid], max(0.0, deadline - time.monotonic()), False, forget, landing=False)[tid]
            out[tid] = resp
        return out

    def try_wait(self, task_ids: int | Sequence[int], completely: bool = False) -> dict[int, KVResponse]:
        """Like wait() but never blocks: unfinished tasks report UNREADY."""
        out = self.wait(task_ids, timeout=0.0, completely=completely)
        return {tid: (r._replace(status=TaskStatus.UNREADY) if r.status is TaskStatus.TIMEOUT else r)
                for tid, r in out.items()}
