"""Mooncake Store backend of the remote tier (Kimi's distributed KV store: a master plus clients
that contribute DRAM segments, reached over TCP or RDMA).

Key of a block: ``{key_prefix}[:{namespace_tag}]:{<16 hex digits of the block hash>}``; value:
``block bytes || 16-byte trailer`` as in every backend (``base``), verified on every read.

Data moves with no copy in Python: the CPU pool is registered with the transfer engine once
(``register_buffer``) and every put/get is one ``batch_put_from_multi_buffers`` /
``batch_get_into_multi_buffers`` call whose two buffers per key are the pool slot and the key's
trailer slot in a small registered array. Plain ``put``/``get`` go through Python bytes and are slow.

Facts of ``mooncake-transfer-engine-non-cuda==0.3.13.post1`` this code relies on (measured):

* ``setup()`` with no master blocks ~90 s, so the master's port is probed with a plain TCP
  connect first (``connect_timeout_s``).
* ``health_check()`` returns 0 with the master dead; ``batch_is_exist`` answers -900 then, so
  ``ping`` and ``count_prefix`` use it.
* Result codes: -704 (not found), -800 (transfer failed), -600 (buffer too small: another layout)
  are misses; -200 a refused put (no space); -900 the store is unavailable. Every other negative
  code fails that block and is logged.
* A holder's death loses its keys after the master's ``client_ttl`` (reads fail: misses); a master
  restart loses every key.
* Every client opens two TCP listeners on all addresses (0.0.0.0 and [::]) with no flag to
  restrict them; see docs/remote.md, "Security".
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.common.config import RemoteConfig

from .base import TRAILER_BYTES, BlockBatch, RemoteStore, RemoteUnavailable, as_hash_list, check_trailer, make_trailer

log = logging.getLogger(__name__)

UNAVAILABLE = -900
MISSES = frozenset({-704, -800, -600})
REFUSED = -200
_LOCAL_BUFFER_BYTES = 16 << 20  # the client's own staging buffer (used only by non-zero-copy calls)
INSTALL_HINT = "pip install mooncake-transfer-engine-non-cuda==0.3.13.post1 (or the CUDA build on GPU hosts)"


def _import_store_class() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise RemoteUnavailable(f"remote.backend=mooncake needs the mooncake package: {e}; {INSTALL_HINT}") from e
    return MooncakeDistributedStore


def probe_port(host: str, port: int, timeout_s: float) -> None:
    """Raise RemoteUnavailable unless something accepts TCP connections at ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise RemoteUnavailable(f"mooncake master at {host}:{port}: {e}") from e


class _Registered:
    """A span of memory registered with the transfer engine, grown (re-registered) on demand."""

    def __init__(self, store: Any, what: str) -> None:
        self._store = store
        self._what = what
        self.addr = 0
        self.nbytes = 0

    def cover(self, addr: int, nbytes: int) -> None:
        if self.addr == addr and nbytes <= self.nbytes:
            return
        self.release()
        code = self._store.register_buffer(addr, nbytes)
        if code != 0:
            raise RemoteUnavailable(f"mooncake: register_buffer of the {self._what} ({nbytes} bytes) failed: {code}")
        self.addr, self.nbytes = addr, nbytes

    def release(self) -> None:
        if self.nbytes:
            self._store.unregister_buffer(self.addr)
            self.addr = self.nbytes = 0


class MooncakeStore(RemoteStore):
    """Blocks in a Mooncake Store; see the module docstring. ``host:port`` is the master.

    This client contributes ``config.mooncake_segment_mb`` MiB of DRAM to the store (0: none; the
    blocks then live in the segments of other clients, e.g. dedicated holders). Call
    :meth:`register_pool` once with the whole CPU pool before the first put/get; a batch in a pool
    never registered registers the span it needs (one registration per pool and growth).
    """

    def __init__(self, config: RemoteConfig, namespace_tag: str = "", *, connect_timeout_s: float = 1.0) -> None:
        if "/" in namespace_tag:
            raise ValueError(f"namespace_tag must not contain '/', got {namespace_tag!r}")
        self.name = f"{config.host}:{config.port}"
        self.key_prefix = ":".join(p for p in (config.key_prefix, namespace_tag) if p)
        store_class = _import_store_class()
        probe_port(config.host, config.port, connect_timeout_s)  # setup() would block ~90 s without a master
        self._store = store_class()
        code = self._store.setup(config.mooncake_local_hostname, "P2PHANDSHAKE", config.mooncake_segment_mb << 20,
                                 _LOCAL_BUFFER_BYTES, config.mooncake_protocol, config.mooncake_device, self.name)
        if code != 0:
            self._store.close()
            raise RemoteUnavailable(f"mooncake master at {self.name}: setup failed with code {code}")
        self._pools: dict[int, _Registered] = {}  # pool address -> its registered span
        self._trailer_span = _Registered(self._store, "trailer buffer")
        self._trailers = np.zeros(0, dtype=np.uint8)
        self._closed = False

    def key(self, block_hash: int) -> str:
        return f"{self.key_prefix}:{block_hash:016x}"

    def register_pool(self, pool_addr: int, pool_nbytes: int) -> None:
        """Register the whole CPU pool once, so every later put/get is zero-copy from/into it."""
        self._pools.setdefault(pool_addr, _Registered(self._store, "CPU pool")).cover(pool_addr, pool_nbytes)

    def put_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        if not batch.hashes:
            return np.zeros(0, dtype=np.bool_)
        trailers = self._trailer_slots(len(batch.hashes), pool_addr, pool_block_bytes, cpu_ids)
        for i, (view, block_hash) in enumerate(zip(batch.views, batch.hashes, strict=True)):
            trailers[i] = np.frombuffer(make_trailer(view, block_hash), dtype=np.uint8)
        codes = self._store.batch_put_from_multi_buffers(*self._buffers(batch, pool_addr, pool_block_bytes, cpu_ids))
        return self._outcome(batch, codes, "put", lambda code: code == 0)

    def get_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        if not batch.hashes:
            return np.zeros(0, dtype=np.bool_)
        trailers = self._trailer_slots(len(batch.hashes), pool_addr, pool_block_bytes, cpu_ids)
        codes = self._store.batch_get_into_multi_buffers(*self._buffers(batch, pool_addr, pool_block_bytes, cpu_ids))
        ok = self._outcome(batch, codes, "get", lambda code: code == block_bytes + TRAILER_BYTES)
        for i in np.flatnonzero(ok).tolist():
            reason = check_trailer(batch.views[i], trailers[i].data, batch.hashes[i])
            if reason is not None:
                log.warning("remote block %s failed verification (%s): treated as a miss",
                            self.key(batch.hashes[i]), reason)
                ok[i] = False
        return ok

    def count_prefix(self, hashes: np.ndarray) -> int:
        """Leading run of ``batch_is_exist`` == 1 (one master round trip for the whole request)."""
        keys = [self.key(h) for h in as_hash_list(hashes)]
        if not keys:
            return 0
        codes = self._store.batch_is_exist(keys)
        if any(c == UNAVAILABLE for c in codes):
            raise RemoteUnavailable(f"mooncake master at {self.name}: unavailable ({UNAVAILABLE})")
        return next((i for i, c in enumerate(codes) if c != 1), len(keys))

    def ping(self) -> None:
        codes = self._store.batch_is_exist([f"{self.key_prefix}:ping"])  # health_check() lies; this does not
        if not codes or codes[0] < 0:
            raise RemoteUnavailable(f"mooncake master at {self.name}: not answering ({codes})")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pool in self._pools.values():
            pool.release()
        self._trailer_span.release()
        self._store.close()

    # -- internals --------------------------------------------------------------------------------

    def _trailer_slots(self, num_blocks: int, pool_addr: int, pool_block_bytes: int,
                       cpu_ids: np.ndarray) -> npt.NDArray[np.uint8]:
        """Registered (num_blocks, 16) trailer slots; also makes sure the pool span is registered."""
        span = (int(np.max(cpu_ids)) + 1) * pool_block_bytes
        pool = self._pools.get(pool_addr)
        if pool is None or span > pool.nbytes:  # register_pool was not called (or with less)
            self.register_pool(pool_addr, span)
        if self._trailers.size < num_blocks * TRAILER_BYTES:
            self._trailer_span.release()
            self._trailers = np.zeros(max(num_blocks, 256) * TRAILER_BYTES, dtype=np.uint8)
            self._trailer_span.cover(int(self._trailers.ctypes.data), self._trailers.nbytes)
        return self._trailers[:num_blocks * TRAILER_BYTES].reshape(num_blocks, TRAILER_BYTES)

    def _buffers(self, batch: BlockBatch, pool_addr: int, pool_block_bytes: int,
                 cpu_ids: np.ndarray) -> tuple[list[str], list[list[int]], list[list[int]]]:
        trailer_base = int(self._trailers.ctypes.data)
        slots = (pool_addr + np.asarray(cpu_ids, dtype=np.int64) * pool_block_bytes).tolist()
        block_bytes = batch.views[0].nbytes
        keys = [self.key(h) for h in batch.hashes]
        ptrs = [[slot, trailer_base + i * TRAILER_BYTES] for i, slot in enumerate(slots)]
        return keys, ptrs, [[block_bytes, TRAILER_BYTES]] * len(keys)

    def _outcome(self, batch: BlockBatch, codes: list[int], what: str, is_ok: Any) -> npt.NDArray[np.bool_]:
        """ok per block from Mooncake's result codes; RemoteUnavailable if the store is gone."""
        if codes and all(c == UNAVAILABLE for c in codes):
            raise RemoteUnavailable(f"mooncake master at {self.name}: unavailable ({UNAVAILABLE})")
        ok = np.array([is_ok(c) for c in codes], dtype=np.bool_)
        for i in np.flatnonzero(~ok).tolist():
            code = codes[i]
            if code in MISSES and what == "get":
                continue
            log.warning("remote %s %s refused: mooncake code %d%s", what, self.key(batch.hashes[i]), code,
                        " (no space)" if code == REFUSED else "")
        return ok
