"""MooncakeStore against a real Mooncake Store on loopback (mooncake_master + a segment holder).

Skipped only when the mooncake package is not installed (build.sh installs it where a wheel exists).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexkv.common.config import RemoteConfig
from flexkv.remote import RemoteUnavailable, open_remote_store
from tests.mooncake_server import MooncakeStoreProcesses, available
from tests.redis_server import free_port
from tests.test_remote_store import BLOCK_BYTES, Pool, chain

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not available(), reason="mooncake package not installed (see build.sh)")]


def mooncake_config(port: int, **kw: object) -> RemoteConfig:
    return RemoteConfig(backend="mooncake", host="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cluster() -> Iterator[MooncakeStoreProcesses]:
    with MooncakeStoreProcesses(segment_mb=64) as procs:
        yield procs


def test_zero_copy_round_trip_is_exact_and_two_nodes_share(cluster: MooncakeStoreProcesses) -> None:
    from flexkv.remote.mooncake_store import MooncakeStore

    node_a = open_remote_store(mooncake_config(cluster.port))
    node_b = open_remote_store(mooncake_config(cluster.port))
    try:
        assert isinstance(node_a, MooncakeStore)
        src, dst = Pool(10, seed=40), Pool(10)
        node_a.register_pool(src.addr, src.buf.nbytes)
        node_b.register_pool(dst.addr, dst.buf.nbytes)
        hashes = chain(10, salt=40)
        assert src.put(node_a, hashes[:8], range(8)).all()
        assert node_b.count_prefix(hashes) == 8, "B finds what A stored"
        assert dst.get(node_b, hashes, np.arange(10)[::-1]).tolist() == [True] * 8 + [False] * 2
        for i in range(8):
            assert np.array_equal(dst.block(9 - i), src.block(i))
            assert not dst.padding(9 - i).any(), "only the block's bytes land in the pool"
        # a pool that was never registered works too (registered on first use)
        late = Pool(8)
        assert late.get(node_b, hashes[:8], range(8)).all() and np.array_equal(late.block(3), src.block(3))
        # a hole (key removed) ends the prefix; other prefixes see nothing
        node_a._store.remove(node_a.key(int(hashes[3])), True)
        assert node_b.count_prefix(hashes) == 3
        other = open_remote_store(mooncake_config(cluster.port, key_prefix="other"))
        assert other.count_prefix(hashes) == 0
        other.close()
    finally:
        node_a.close()
        node_b.close()


def test_corrupt_or_foreign_values_are_misses_never_data(cluster: MooncakeStoreProcesses) -> None:
    store = open_remote_store(mooncake_config(cluster.port))
    try:
        src, dst = Pool(4, seed=41), Pool(4)
        hashes = chain(4, salt=41)
        assert src.put(store, hashes, range(4)).all()
        raw = store._store  # type: ignore[attr-defined]
        key = store.key  # type: ignore[attr-defined]
        raw.remove(key(int(hashes[0])), True)
        garbage = bytes(BLOCK_BYTES + 16)
        assert raw.put(key(int(hashes[0])), garbage) == 0  # right size, wrong bytes
        valid = raw.get(key(int(hashes[3])))
        raw.remove(key(int(hashes[1])), True)
        assert raw.put(key(int(hashes[1])), valid) == 0  # a valid value under the wrong key
        raw.remove(key(int(hashes[2])), True)
        assert raw.put(key(int(hashes[2])), b"short") == 0  # wrong size
        assert dst.get(store, hashes, range(4)).tolist() == [False, False, False, True]
        assert np.array_equal(dst.block(3), src.block(3))
        assert not Pool(1, block_bytes=BLOCK_BYTES // 2).get(store, hashes[3:], [0]).any(), "another layout"
    finally:
        store.close()


def test_no_master_is_a_fast_clear_error_and_a_dead_master_raises() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=f"mooncake master at 127.0.0.1:{port}"):
        open_remote_store(mooncake_config(port))
    assert time.monotonic() - t0 < 3.0, "setup() is not called without a master (it would block ~90 s)"
    with MooncakeStoreProcesses(segment_mb=32) as procs:
        store = open_remote_store(mooncake_config(procs.port))
        hashes = chain(2, salt=42)
        assert Pool(2, seed=42).put(store, hashes, range(2)).all()
        procs.stop_master()
        with pytest.raises(RemoteUnavailable, match="unavailable"):
            store.count_prefix(hashes)
        with pytest.raises(RemoteUnavailable):
            store.ping()
        store.close()


def test_a_dead_segment_holder_loses_its_keys_as_misses(cluster: MooncakeStoreProcesses) -> None:
    store = open_remote_store(mooncake_config(cluster.port))
    try:
        src, dst = Pool(3, seed=43), Pool(3)
        hashes = chain(3, salt=43)
        assert src.put(store, hashes, range(3)).all()
        cluster.stop_holder()  # the only segment: every block lived there
        deadline = time.monotonic() + 30
        while store.count_prefix(hashes) and time.monotonic() < deadline:
            time.sleep(0.5)  # the master drops them after client_ttl
        assert not dst.get(store, hashes, range(3)).any(), "misses, not errors and never stale bytes"
        assert not dst.buf.any()
    finally:
        store.close()
