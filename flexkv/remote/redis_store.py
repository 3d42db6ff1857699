"""Redis / Valkey backend of the remote tier, standalone or cluster.

Key of a block: ``{key_prefix}[:{namespace_tag}]:{<16 hex digits of the block hash>}``. The braces
are a Redis Cluster hash tag around the hash, so the cluster slot depends only on the hash: blocks
(even consecutive blocks of one prompt) spread evenly over every shard, while the prefix stays
a readable, SCAN-able namespace. Value: ``block bytes || 16-byte trailer`` (see ``base``).

Data moves with no copy in Python: SET sends the pool slice itself, GET receives straight into the
pool slot (``resp.RespSocket``). Commands are pipelined ``max_inflight`` deep per node: 1 (no
pipelining) measured fastest on loopback, where a second multi-MiB reply in flight only thrashes
caches; raise it where the round trip is comparable to one block's transfer time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from flexkv.common.config import RemoteConfig

from .base import (
    TRAILER_BYTES,
    BlockBatch,
    RemoteStore,
    RemoteUnavailable,
    as_hash_list,
    check_trailer,
    make_trailer,
)
from .resp import CRLF, ProtocolError, RespError, RespSocket, pack_command, pack_set_header

log = logging.getLogger(__name__)

NUM_SLOTS = 16384
NODE_RETRY_S = 1.0  # a cluster shard that failed is not asked again for this long (its blocks miss)
_EXISTS_FIRST_CHUNK = 256


class _StaleConnection(RemoteUnavailable):
    """A connection that had been idle was found dead (e.g. the server restarted): retry once."""


class _Node:
    """One Redis server (a standalone server or a cluster primary) and its one connection."""

    def __init__(self, host: str, port: int, conn_kwargs: dict[str, Any], tls: bool) -> None:
        self.name = f"{host}:{port}"
        self.down_until = 0.0  # cluster mode: a shard that failed is skipped (its blocks miss) until then
        conn_class = redis.SSLConnection if tls else redis.Connection
        self._conn: redis.Connection = conn_class(host=host, port=port, **conn_kwargs)

    @contextlib.contextmanager
    def session(self) -> Iterator[RespSocket]:
        """Yield the connected socket; any transport failure drops it and raises RemoteUnavailable
        (``_StaleConnection`` when a connection reused from an earlier call broke without a timeout)."""
        reused = self._conn._sock is not None
        try:
            io = RespSocket(self._socket())
            yield io
            if io.num_buffered:
                raise ProtocolError(f"{io.num_buffered} unexpected bytes after the last reply")
        except (OSError, ProtocolError, redis.RedisError) as e:
            self._conn.disconnect()
            raise self._failure(e, reused) from e
        except BaseException:  # replies may still be in flight: the stream is out of step
            self._conn.disconnect()
            raise

    def _failure(self, error: BaseException, reused: bool) -> RemoteUnavailable:
        if isinstance(error, redis.AuthenticationError) or "WRONGPASS" in str(error) or "NOAUTH" in str(error):
            return RemoteUnavailable(f"redis at {self.name}: authentication failed ({error}); "
                                     "check remote.username / remote.password")
        timed_out = isinstance(error, (TimeoutError, redis.TimeoutError))
        cls = _StaleConnection if reused and not timed_out else RemoteUnavailable
        return cls(f"redis at {self.name}: {error}")

    def _socket(self) -> socket.socket:
        """The connection's socket, connecting first if needed (redis-py keeps it in ``_sock``)."""
        if self._conn._sock is None:
            self._conn.connect()
        sock: socket.socket | None = self._conn._sock
        if sock is None:
            raise redis.ConnectionError("connect() left no socket")
        return sock

    def command(self, *args: bytes) -> Any:
        """One control command through redis-py's parser (nested replies); RemoteUnavailable on
        failure. A reused connection found dead is replaced once."""
        for attempt in range(2):
            reused = self._conn._sock is not None
            try:
                self._conn.send_command(*args)
                return self._conn.read_response()
            except (OSError, redis.ConnectionError, redis.TimeoutError) as e:
                self._conn.disconnect()
                failure = self._failure(e, reused)
                if attempt or not isinstance(failure, _StaleConnection):
                    raise failure from e
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.disconnect()


class _Topology:
    """Which node serves which key: one node, or a cluster's slot map (refreshed after MOVED)."""

    def __init__(self, config: RemoteConfig, conn_kwargs: dict[str, Any]) -> None:
        self._seed_host = config.host
        self._tls = config.tls
        self._conn_kwargs = conn_kwargs
        seed = _Node(config.host, config.port, conn_kwargs, config.tls)
        self.nodes: dict[str, _Node] = {seed.name: seed}
        self.is_cluster = False
        self.stale = False
        self._slot_node: list[_Node] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-read CLUSTER SLOTS from the first node that answers (a standalone server refuses it)."""
        seed, ranges = self._cluster_slots()
        if ranges is None:
            self.is_cluster = False
            return
        slot_node: list[_Node | None] = [None] * NUM_SLOTS
        for start, end, primary, *_replicas in ranges:
            host = primary[0].decode() if primary[0] not in (b"", b"?") else self._seed_host
            node = self._node(host, int(primary[1]))
            slot_node[int(start):int(end) + 1] = [node] * (int(end) - int(start) + 1)
        missing = [i for i, n in enumerate(slot_node) if n is None]
        if missing:
            raise RemoteUnavailable(f"redis cluster at {seed.name}: {len(missing)} slots unserved (slot {missing[0]})")
        self._slot_node = [n for n in slot_node if n is not None]
        self.is_cluster, self.stale = True, False

    def _cluster_slots(self) -> tuple[_Node, list[Any] | None]:
        failure: RemoteUnavailable | None = None
        now = time.monotonic()
        nodes = sorted(self.nodes.values(), key=lambda n: n.down_until > now)  # live shards first
        for node in nodes:
            try:
                return node, node.command(b"CLUSTER", b"SLOTS")
            except redis.ResponseError:
                return node, None
            except RemoteUnavailable as e:
                failure = failure or e
        assert failure is not None
        raise failure

    def node(self, host: str, port: int) -> _Node:
        """The node at ``host:port`` (a redirect's target), creating its connection on first use."""
        return self._node(host, port)

    def _node(self, host: str, port: int) -> _Node:
        name = f"{host}:{port}"
        if name not in self.nodes:
            self.nodes[name] = _Node(host, port, self._conn_kwargs, self._tls)
        return self.nodes[name]

    def serving_nodes(self) -> list[_Node]:
        """The standalone server, or every primary that serves slots."""
        if not self.is_cluster:
            return [next(iter(self.nodes.values()))]
        return list(dict.fromkeys(self._slot_node))

    @contextlib.contextmanager
    def session(self, node: _Node) -> Iterator[RespSocket]:
        """``node.session()``; a cluster node that fails makes the slot map stale (failover may follow)."""
        try:
            with node.session() as io:
                yield io
        except RemoteUnavailable:
            if self.is_cluster:
                self.stale = True
                node.down_until = time.monotonic() + NODE_RETRY_S
            raise

    def group(self, keys: list[bytes], indices: range | list[int]) -> dict[_Node, list[int]]:
        """``indices`` grouped by the node that serves ``keys[i]``, each group in ascending order."""
        if self.stale:
            self.refresh()
        if not self.is_cluster:
            return {next(iter(self.nodes.values())): list(indices)}
        groups: dict[_Node, list[int]] = collections.defaultdict(list)
        for i in indices:
            groups[self._slot_node[key_slot(keys[i])]].append(i)
        return groups


class RedisStore(RemoteStore):
    """Blocks in a Redis/Valkey server or cluster; see the module docstring for keys and values.

    AUTH with ``config.username`` (an ACL user) and ``config.password``; TLS with ``config.tls``
    verifying the server against ``config.tls_ca_file`` (or the system CAs), presenting
    ``tls_cert_file``/``tls_key_file`` to servers that check clients. In a cluster a shard that
    fails makes its blocks misses for ``NODE_RETRY_S`` while the others serve; MOVED/ASK replies
    are followed once.

    ``ttl_s > 0`` sets an expiry on write and slides it on every read (GETEX), so hot blocks stay.
    Connect and per-socket-op timeouts make a vanished or hung store raise RemoteUnavailable
    instead of blocking the worker; the next call reconnects.
    """

    def __init__(self, config: RemoteConfig, namespace_tag: str = "", *, max_inflight: int = 1,
                 connect_timeout_s: float = 1.0, op_timeout_s: float = 5.0) -> None:
        if "{" in namespace_tag or "}" in namespace_tag:
            raise ValueError(f"namespace_tag must not contain braces, got {namespace_tag!r}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.key_prefix = ":".join(p for p in (config.key_prefix, namespace_tag) if p).encode()
        self.ttl_s = config.ttl_s
        self._max_inflight = max_inflight
        conn_kwargs: dict[str, Any] = {
            "db": config.db, "password": config.password, "protocol": 2, "client_name": "flexkv",
            "socket_timeout": op_timeout_s, "socket_connect_timeout": connect_timeout_s,
            "socket_keepalive": True, "retry": Retry(NoBackoff(), 0)}
        if config.username:
            conn_kwargs["username"] = config.username
        if config.tls:  # the server's certificate is verified (chain and host name), always
            conn_kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                               ssl_ca_certs=config.tls_ca_file or None, ssl_certfile=config.tls_cert_file or None,
                               ssl_keyfile=config.tls_key_file or None)
        self._topology = _Topology(config, conn_kwargs)

    @property
    def is_cluster(self) -> bool:
        return self._topology.is_cluster

    def key(self, block_hash: int) -> bytes:
        """The Redis key of ``block_hash`` (cluster hash tag around the hash)."""
        return b"%s:{%016x}" % (self.key_prefix, block_hash)

    def put_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        return self._per_node(batch, self._put_on)

    def get_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        return self._per_node(batch, self._get_on)

    def _per_node(self, batch: BlockBatch, run: Callable[..., None]) -> npt.NDArray[np.bool_]:
        """Run ``run(node, indices, keys, batch, ok, redirects)`` for the blocks each node (shard)
        owns, then once more for blocks a shard redirected (MOVED/ASK) to the node it named."""
        keys = [self.key(h) for h in batch.hashes]
        ok = np.zeros(len(keys), dtype=np.bool_)
        redirects: dict[int, _Redirect] = {}
        self._on_shards(self._topology.group(keys, range(len(keys))),
                        lambda node, indices: run(node, indices, keys, batch, ok, redirects, False), ok)
        self._follow(redirects, lambda node, indices, asking: run(node, indices, keys, batch, ok, {}, asking), ok)
        return ok

    def _on_shards(self, groups: dict[_Node, list[int]], run: Callable[[_Node, list[int]], None],
                   ok: npt.NDArray[np.bool_] | None) -> None:
        """``run(node, indices)`` per shard. A reused connection found dead is retried once on a new
        one. In a cluster a failed shard's blocks stay False (misses) while the others serve; only
        when every shard failed is RemoteUnavailable raised. Standalone: any failure raises."""
        failure: RemoteUnavailable | None = None
        now = time.monotonic()
        for node, indices in groups.items():
            if self.is_cluster and node.down_until > now:
                failure = failure or RemoteUnavailable(f"redis at {node.name}: shard down (retrying every "
                                                       f"{NODE_RETRY_S:.0f} s)")
                continue
            try:
                try:
                    run(node, indices)
                except _StaleConnection:
                    if ok is not None:
                        ok[indices] = False  # the first attempt may have set some
                    run(node, indices)
                node.down_until = 0.0  # (a stale connection replaced on the retry is no outage)
            except RemoteUnavailable as e:
                if not self.is_cluster:
                    raise
                log.warning("remote shard %s failed: %s (its blocks are misses)", node.name, e)
                failure = failure or e
        if failure is not None and len(groups) > 0 and all(n.down_until > now for n in groups):
            raise failure

    def _follow(self, redirects: dict[int, _Redirect], run: Callable[[_Node, list[int], bool], None],
                ok: npt.NDArray[np.bool_] | None) -> None:
        """Retry redirected blocks once at the node the redirect named (ASK: behind ASKING)."""
        if not redirects:
            return
        if any(not r.asking for r in redirects.values()):
            self._topology.stale = True  # MOVED: the slot map changed; re-read it before the next call
        by_target: dict[tuple[str, int, bool], list[int]] = collections.defaultdict(list)
        for i, r in sorted(redirects.items()):
            by_target[(r.host, r.port, r.asking)].append(i)
        for (host, port, asking), indices in by_target.items():
            node = self._topology.node(host, port)
            with contextlib.suppress(RemoteUnavailable):  # those blocks stay misses
                self._on_shards({node: indices}, functools.partial(_call_asking, run, asking), ok)

    def count_prefix(self, hashes: np.ndarray) -> int:
        """Exact leading run: pipelined EXISTS over chunks of 256, 512, ... keys, stopping at a miss.
        In a cluster, keys of a shard that is down count as missing."""
        keys = [self.key(h) for h in as_hash_list(hashes)]
        start, chunk = 0, _EXISTS_FIRST_CHUNK
        while start < len(keys):
            indices = range(start, min(start + chunk, len(keys)))
            exists = self._exists(keys, indices)
            if not all(exists.get(i, False) for i in indices):
                return next(i for i in indices if not exists.get(i, False))
            start, chunk = indices.stop, chunk * 2
        return len(keys)

    def ping(self) -> None:
        if self._topology.stale:
            self._topology.refresh()
        for node in self._topology.serving_nodes():
            with self._topology.session(node) as io:
                io.send(pack_command(b"PING"))
                reply = io.read_simple()
            if reply != b"PONG":
                raise RemoteUnavailable(f"redis at {node.name}: PING answered {reply!r}")

    def close(self) -> None:
        for node in self._topology.nodes.values():
            node.close()

    # -- pipelining -------------------------------------------------------------------------------

    def _put_on(self, node: _Node, indices: list[int], keys: list[bytes], batch: BlockBatch,
                ok: npt.NDArray[np.bool_], redirects: dict[int, _Redirect], asking: bool) -> None:
        with self._topology.session(node) as io:
            self._pipeline(indices, lambda i: self._send_set(io, keys[i], batch, i, asking),
                           lambda i: self._finish_set(io, keys[i], ok, i, redirects, asking))

    def _get_on(self, node: _Node, indices: list[int], keys: list[bytes], batch: BlockBatch,
                ok: npt.NDArray[np.bool_], redirects: dict[int, _Redirect], asking: bool) -> None:
        ttl = b"%d" % self.ttl_s
        with self._topology.session(node) as io:
            self._pipeline(indices,
                           lambda i: io.send((_ASKING if asking else b"") + (
                               pack_command(b"GETEX", keys[i], b"EX", ttl) if self.ttl_s > 0
                               else pack_command(b"GET", keys[i]))),
                           lambda i: self._finish_get(io, keys[i], batch, ok, i, redirects, asking))

    def _pipeline(self, indices: list[int], send: Callable[[int], None], finish: Callable[[int], None]) -> None:
        """send(i) for each index, keeping at most max_inflight replies outstanding; finish(i) in order."""
        pending: collections.deque[int] = collections.deque()
        for i in indices:
            send(i)
            pending.append(i)
            if len(pending) >= self._max_inflight:
                finish(pending.popleft())
        while pending:
            finish(pending.popleft())

    def _send_set(self, io: RespSocket, key: bytes, batch: BlockBatch, i: int, asking: bool) -> None:
        view = batch.views[i]
        prefix, suffix = pack_set_header(key, view.nbytes + TRAILER_BYTES, self.ttl_s)
        io.send((_ASKING if asking else b"") + prefix, view, make_trailer(view, batch.hashes[i]) + suffix)

    def _finish_set(self, io: RespSocket, key: bytes, ok: npt.NDArray[np.bool_], i: int,
                    redirects: dict[int, _Redirect], asking: bool) -> None:
        try:
            if asking:
                io.read_simple()
            ok[i] = io.read_simple() == b"OK"
        except RespError as e:
            self._refused(key, "SET", e, i, redirects)

    def _finish_get(self, io: RespSocket, key: bytes, batch: BlockBatch, ok: npt.NDArray[np.bool_],
                    i: int, redirects: dict[int, _Redirect], asking: bool) -> None:
        try:
            if asking:
                io.read_simple()
            num_bytes = io.read_bulk_header()
        except RespError as e:
            self._refused(key, "GET", e, i, redirects)
            return
        view = batch.views[i]
        if num_bytes < 0:
            return  # nil: not stored, expired or evicted
        if num_bytes != view.nbytes + TRAILER_BYTES:
            io.skip(num_bytes + 2)
            log.warning("remote block %s has %d bytes, expected %d: treated as a miss",
                        key.decode(), num_bytes, view.nbytes + TRAILER_BYTES)
            return
        io.read_into(view)
        trailer = bytearray(TRAILER_BYTES + 2)
        io.read_into(memoryview(trailer))
        if trailer[TRAILER_BYTES:] != CRLF:
            raise ProtocolError("bulk reply not terminated by CRLF")
        reason = check_trailer(view, trailer[:TRAILER_BYTES], batch.hashes[i])
        if reason is not None:
            log.warning("remote block %s failed verification (%s): treated as a miss", key.decode(), reason)
        ok[i] = reason is None

    def _exists(self, keys: list[bytes], indices: range) -> dict[int, bool]:
        """EXISTS for each of ``keys[indices]``, one pipelined round trip per node (a shard that is
        down leaves its keys out: missing)."""
        exists: dict[int, bool] = {}
        redirects: dict[int, _Redirect] = {}

        def run(node: _Node, group: list[int], asking: bool = False) -> None:
            with self._topology.session(node) as io:
                io.send(b"".join((_ASKING if asking else b"") + pack_command(b"EXISTS", keys[i]) for i in group))
                for i in group:
                    try:
                        if asking:
                            io.read_simple()
                        exists[i] = io.read_simple() == 1
                    except RespError as e:
                        self._refused(keys[i], "EXISTS", e, i, redirects)
                        exists[i] = False

        self._on_shards(self._topology.group(keys, indices), run, None)
        followed = dict(redirects)
        redirects.clear()
        self._follow(followed, run, None)
        return exists

    def _refused(self, key: bytes, command: str, error: RespError, i: int, redirects: dict[int, _Redirect]) -> None:
        """A per-key error reply: that block fails, unless it is a MOVED/ASK redirect, which
        ``_follow`` retries once at the node it names."""
        message = str(error)
        redirect = _Redirect.parse(message)
        if redirect is not None:
            redirects[i] = redirect
            return
        log.warning("remote %s %s refused: %s", command, key.decode(), message)


_ASKING = pack_command(b"ASKING")


def _call_asking(run: Callable[[_Node, list[int], bool], None], asking: bool, node: _Node, indices: list[int]) -> None:
    run(node, indices, asking)


@dataclasses.dataclass(frozen=True)
class _Redirect:
    """A cluster redirect: ``MOVED <slot> <host>:<port>`` (slot moved for good) or ``ASK ...``
    (this key only, during a migration; the next command there must follow ASKING)."""

    asking: bool
    host: str
    port: int

    @classmethod
    def parse(cls, message: str) -> _Redirect | None:
        parts = message.split()
        if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
            return None
        host, _, port = parts[2].rpartition(":")
        if not port.isdigit():
            return None
        return cls(parts[0] == "ASK", host or "127.0.0.1", int(port))
