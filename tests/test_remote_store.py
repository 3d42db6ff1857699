"""Remote tier stores against a real redis-server on loopback and real files: no mocks.

Each scenario narrates what a node does (put blocks from its CPU pool, look up a prefix, load
blocks back) and checks the bytes that land in the pool, what the store holds, and what is raised.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from redis.crc import key_slot

from flexkv.common.config import RemoteConfig
from flexkv.remote import FilesystemStore, RedisStore, RemoteStore, RemoteUnavailable, open_remote_store
from flexkv.types import InvalidRequest
from tests.redis_server import RedisCluster, RedisServer, free_port

BLOCK_BYTES = 64 * 1024
POOL_BLOCK_BYTES = BLOCK_BYTES + 4096  # slots padded, as an aligned CPU pool may be


class Pool:
    """A stand-in for the shared-memory CPU pool: slot i at ``addr + i * POOL_BLOCK_BYTES``."""

    def __init__(self, num_blocks: int, seed: int | None = None, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self.slot_bytes = block_bytes + 4096
        self.buf = np.zeros(num_blocks * self.slot_bytes, dtype=np.uint8)
        if seed is not None:  # a pool holding data; without a seed, an empty pool to load into
            self.buf[:] = np.random.default_rng(seed).integers(0, 256, self.buf.size, dtype=np.uint8)

    @property
    def addr(self) -> int:
        return int(self.buf.ctypes.data)

    def block(self, slot: int) -> np.ndarray:
        return self.buf[slot * self.slot_bytes: slot * self.slot_bytes + self.block_bytes]

    def padding(self, slot: int) -> np.ndarray:
        return self.buf[slot * self.slot_bytes + self.block_bytes: (slot + 1) * self.slot_bytes]

    def put(self, store: RemoteStore, hashes: np.ndarray, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        return store.put_blocks(hashes, self.addr, self.slot_bytes, np.asarray(slots), self.block_bytes)

    def get(self, store: RemoteStore, hashes: np.ndarray, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        return store.get_blocks(hashes, self.addr, self.slot_bytes, np.asarray(slots), self.block_bytes)


def chain(num_blocks: int, salt: int = 0) -> np.ndarray:
    """Distinct uint64 'chained hashes' for one prompt."""
    rng = np.random.default_rng(1000 + salt)
    return rng.integers(1, 2**63, num_blocks, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    with RedisStore(RemoteConfig(port=server.port)) as s:
        yield s


# -- Redis: bytes ------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_lands_only_in_the_named_slots(store: RedisStore) -> None:
    src, dst = Pool(8, seed=1), Pool(8)
    hashes = chain(8)
    assert src.put(store, hashes, range(8)).all()
    # load them back in reverse into another pool: every block lands in its slot, padding untouched
    assert dst.get(store, hashes, np.arange(8)[::-1]).all()
    for i in range(8):
        assert np.array_equal(dst.block(7 - i), src.block(i))
        assert not dst.padding(7 - i).any()


@pytest.mark.parametrize("max_inflight", [1, 3, 16])
def test_pipelined_batch_mixing_hits_misses_and_bad_values_stays_in_sync(server: RedisServer,
                                                                        max_inflight: int) -> None:
    src, dst = Pool(12, seed=2), Pool(12)
    hashes = chain(12)
    with RedisStore(RemoteConfig(port=server.port), max_inflight=max_inflight) as store:
        assert src.put(store, hashes[:10], range(10)).all()
        client = server.client()
        client.delete(store.key(int(hashes[2])))  # a miss
        client.set(store.key(int(hashes[4])), b"x" * 100)  # wrong size
        client.delete(store.key(int(hashes[6])))
        client.lpush(store.key(int(hashes[6])), b"x")  # WRONGTYPE error reply
        ok = dst.get(store, hashes, range(12))
        assert ok.tolist() == [True, True, False, True, False, True, False, True, True, True, False, False]
        for i in np.flatnonzero(ok):
            assert np.array_equal(dst.block(int(i)), src.block(int(i)))
        # the connection is still in step: the next call on it works
        assert store.count_prefix(hashes) == 2
        store.ping()


def test_two_nodes_on_one_redis_see_each_others_blocks(server: RedisServer) -> None:
    node_a = open_remote_store(RemoteConfig(port=server.port))
    node_b = open_remote_store(RemoteConfig(port=server.port))
    pool_a, pool_b = Pool(6, seed=3), Pool(6)
    hashes = chain(6)
    assert pool_a.put(node_a, hashes[:4], range(4)).all()
    # node B finds the 4-block prefix A stored and loads it
    assert node_b.count_prefix(hashes) == 4
    assert pool_b.get(node_b, hashes[:4], range(4)).all()
    assert all(np.array_equal(pool_b.block(i), pool_a.block(i)) for i in range(4))
    # B extends the prefix; A now sees 6
    assert Pool(6, seed=4).put(node_b, hashes[4:], [0, 1]).all()
    assert node_a.count_prefix(hashes) == 6
    node_a.close()
    node_b.close()


def test_count_prefix_is_the_leading_run_even_with_holes(store: RedisStore, server: RedisServer) -> None:
    assert store.count_prefix(np.zeros(0, dtype=np.uint64)) == 0
    pool = Pool(10, seed=5, block_bytes=1024)
    hashes = chain(700)
    # 700 tiny blocks (crosses the 256-key first chunk), then punch holes at 400 and 650
    for start in range(0, 700, 10):
        assert pool.put(store, hashes[start:start + 10], range(10)).all()
    assert store.count_prefix(hashes) == 700
    server.client().delete(store.key(int(hashes[650])), store.key(int(hashes[400])))
    assert store.count_prefix(hashes) == 400
    assert store.count_prefix(hashes[401:]) == 249
    server.client().delete(store.key(int(hashes[0])))
    assert store.count_prefix(hashes) == 0


def test_evicted_blocks_are_misses_and_refused_writes_fail_only_those_blocks() -> None:
    # allkeys-lru with room for ~4 blocks of 1 MiB: writing 12 evicts the oldest
    one_mib = 1 << 20
    with RedisServer(extra_args=("--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru")) as srv:
        store = RedisStore(RemoteConfig(port=srv.port))
        src, dst = Pool(12, seed=6, block_bytes=one_mib), Pool(12, block_bytes=one_mib)
        hashes = chain(12)
        assert src.put(store, hashes, range(12)).all()
        present = np.array([srv.client().exists(store.key(int(h))) for h in hashes], dtype=bool)
        assert 0 < present.sum() < 12
        # (GET replies use memory too and may evict more, so hits are a subset of what was present)
        ok = dst.get(store, hashes, range(12))
        assert ok.any() and not (ok & ~present).any()
        assert all(np.array_equal(dst.block(int(i)), src.block(int(i))) for i in np.flatnonzero(ok))
        store.close()
    # noeviction: once full, SETs are refused with OOM -> False per block, no exception
    with RedisServer(extra_args=("--maxmemory", "6mb", "--maxmemory-policy", "noeviction")) as srv:
        store = RedisStore(RemoteConfig(port=srv.port))
        ok = Pool(12, seed=7, block_bytes=one_mib).put(store, chain(12), range(12))
        assert ok[0] and not ok[-1]
        assert store.count_prefix(chain(12)) == int(ok.sum())
        store.close()


def test_corrupt_values_are_misses_never_data(store: RedisStore, server: RedisServer) -> None:
    src, dst = Pool(5, seed=8), Pool(5)
    hashes = chain(5)
    assert src.put(store, hashes, range(5)).all()
    client = server.client()
    keys = [store.key(int(h)) for h in hashes]
    client.setrange(keys[0], 1000, b"\xff\x00")  # bit rot inside the payload
    client.set(keys[1], os.urandom(BLOCK_BYTES + 16))  # right size, garbage
    client.setrange(keys[2], BLOCK_BYTES + 12, b"XXXX")  # trailer magic damaged
    valid = client.get(keys[4])
    assert isinstance(valid, bytes)
    client.set(keys[3], valid)  # a valid value under the wrong key
    ok = dst.get(store, hashes, range(5))
    assert ok.tolist() == [False, False, False, False, True]
    assert np.array_equal(dst.block(4), src.block(4))
    # a block of another layout (different block_bytes) under the same hash is a miss too
    assert not Pool(1, block_bytes=BLOCK_BYTES // 2).get(store, hashes[4:], [0]).any()


def test_keys_and_prefixes_never_collide(server: RedisServer) -> None:
    hashes = chain(4)
    deploy_a = RedisStore(RemoteConfig(port=server.port, key_prefix="fleetA"))
    deploy_b = RedisStore(RemoteConfig(port=server.port, key_prefix="fleetB"))
    model_x = RedisStore(RemoteConfig(port=server.port, key_prefix="fleetA"), namespace_tag="llama-8b-bf16")
    assert Pool(4, seed=9).put(deploy_a, hashes, range(4)).all()
    # key naming: prefix, then the hash as a cluster hash tag, so the slot depends on the hash only
    key = deploy_a.key(int(hashes[0]))
    assert key == b"fleetA:{%016x}" % int(hashes[0])
    assert key_slot(key) == key_slot(b"%016x" % int(hashes[0])) == key_slot(deploy_b.key(int(hashes[0])))
    assert model_x.key(int(hashes[0])).startswith(b"fleetA:llama-8b-bf16:{")
    # another deployment or model tag sees none of it; different hashes are different keys
    assert deploy_b.count_prefix(hashes) == 0 and model_x.count_prefix(hashes) == 0
    assert not Pool(4).get(deploy_b, hashes, range(4)).any()
    assert len({deploy_a.key(int(h)) for h in chain(1000, salt=1)}) == 1000
    assert server.client().dbsize() == 4
    with pytest.raises(ValueError, match="braces"):
        RedisStore(RemoteConfig(port=server.port), namespace_tag="{x}")


def test_ttl_is_set_when_configured_and_refreshed_by_reads(server: RedisServer) -> None:
    hashes = chain(2)
    client = server.client()
    with RedisStore(RemoteConfig(port=server.port, key_prefix="ttl", ttl_s=60)) as store:
        assert Pool(2, seed=10).put(store, hashes, [0, 1]).all()
        key = store.key(int(hashes[0]))
        assert 0 < client.ttl(key) <= 60
        client.expire(key, 5)
        assert Pool(2).get(store, hashes[:1], [0]).all()
        assert client.ttl(key) > 5  # GETEX slid the expiry
    with RedisStore(RemoteConfig(port=server.port, key_prefix="forever")) as store:
        assert Pool(2, seed=10).put(store, hashes, [0, 1]).all()
        assert client.ttl(store.key(int(hashes[0]))) == -1


# -- Redis: failures -------------------------------------------------------------------------------


def test_store_going_away_raises_quickly_and_recovers_after_restart(server: RedisServer) -> None:
    store = open_remote_store(RemoteConfig(port=server.port))
    pool, hashes = Pool(4, seed=11), chain(4)
    assert pool.put(store, hashes, range(4)).all()
    server.stop()
    for call in (lambda: pool.put(store, hashes, range(4)), lambda: pool.get(store, hashes, range(4)),
                 lambda: store.count_prefix(hashes), store.ping):
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable, match=f"127.0.0.1:{server.port}"):
            call()
        assert time.monotonic() - t0 < 2.0
    server.start()  # same port, empty (no persistence): the same store object reconnects
    assert store.count_prefix(hashes) == 0
    assert pool.put(store, hashes, range(4)).all()
    assert Pool(4).get(store, hashes, range(4)).all()
    store.close()


def test_hung_store_times_out_instead_of_blocking(server: RedisServer) -> None:
    store = RedisStore(RemoteConfig(port=server.port), op_timeout_s=0.5)
    pool, hashes = Pool(2, seed=12), chain(2)
    assert pool.put(store, hashes, [0, 1]).all()
    server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable, match=r"127\.0\.0\.1"):
            pool.get(store, hashes, [0, 1])
        assert time.monotonic() - t0 < 2.0
    finally:
        server.resume()
    assert pool.get(store, hashes, [0, 1]).all()
    store.close()


def test_unreachable_or_refusing_store_at_open_is_a_clear_error() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=f"127.0.0.1:{port}"):
        open_remote_store(RemoteConfig(port=port))
    assert time.monotonic() - t0 < 2.0
    with RedisServer(password="s3cret") as srv:
        with pytest.raises(RemoteUnavailable, match=f"127.0.0.1:{srv.port}"):
            open_remote_store(RemoteConfig(port=srv.port, password="wrong"))
        with open_remote_store(RemoteConfig(port=srv.port, password="s3cret", db=3)) as store:
            assert Pool(1, seed=13).put(store, chain(1), [0]).all()
        with srv.client(db=3) as client:
            assert client.dbsize() == 1


def test_malformed_arguments_are_invalid_requests(store: RedisStore) -> None:
    pool, hashes = Pool(2), chain(2)
    cases = [
        ((hashes.astype(np.int64), pool.addr, pool.slot_bytes, np.arange(2), BLOCK_BYTES), "uint64"),
        ((hashes, pool.addr, pool.slot_bytes, np.arange(3), BLOCK_BYTES), "3 entries for 2"),
        ((hashes, pool.addr, pool.slot_bytes, np.array([0, -1]), BLOCK_BYTES), ">= 0"),
        ((hashes, pool.addr, BLOCK_BYTES - 1, np.arange(2), BLOCK_BYTES), "pool_block_bytes"),
        ((hashes, 0, pool.slot_bytes, np.arange(2), BLOCK_BYTES), "pool_addr"),
        ((hashes, pool.addr, pool.slot_bytes, np.arange(2.0), BLOCK_BYTES), "integer"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            store.put_blocks(*args)
        with pytest.raises(InvalidRequest, match=message):
            store.get_blocks(*args)
    assert store.count_prefix(hashes) == 0  # nothing was written


def test_cluster_spreads_blocks_over_every_shard() -> None:
    with RedisCluster(3) as cluster:
        store = open_remote_store(RemoteConfig(port=cluster.ports[1]))
        assert isinstance(store, RedisStore) and store.is_cluster
        src, dst = Pool(24, seed=14), Pool(24)
        hashes = chain(24)
        assert src.put(store, hashes, range(24)).all()
        per_node = [srv.client().dbsize() for srv in cluster.servers]
        assert sum(per_node) == 24 and min(per_node) > 0
        other_node = open_remote_store(RemoteConfig(port=cluster.ports[2]))
        assert other_node.count_prefix(hashes) == 24
        assert dst.get(other_node, hashes, range(24)).all()
        assert np.array_equal(dst.buf, src.buf * (np.arange(src.buf.size) % src.slot_bytes < BLOCK_BYTES))
        store.close()
        other_node.close()


# -- shared filesystem -----------------------------------------------------------------------------


def fs_config(path: str, **kw: object) -> RemoteConfig:
    return RemoteConfig(backend="filesystem", path=path, **kw)  # type: ignore[arg-type]


def test_filesystem_round_trip_two_nodes_and_layout(tmp_path: os.PathLike[str]) -> None:
    node_a = open_remote_store(fs_config(str(tmp_path)))
    node_b = open_remote_store(fs_config(str(tmp_path)), namespace_tag="")
    src, dst = Pool(6, seed=15), Pool(6)
    hashes = chain(6)
    assert src.put(node_a, hashes[:5], range(5)).all()
    name = f"{int(hashes[0]):016x}"
    assert isinstance(node_a, FilesystemStore)
    assert node_a.block_path(int(hashes[0])) == os.path.join(str(tmp_path), "flexkv", name[:2], name)
    assert os.path.getsize(node_a.block_path(int(hashes[0]))) == BLOCK_BYTES + 16
    # node B finds and loads what A wrote; a hole stops the prefix count
    assert node_b.count_prefix(hashes) == 5
    assert dst.get(node_b, hashes, np.arange(6)[::-1]).tolist() == [True] * 5 + [False]
    assert all(np.array_equal(dst.block(5 - i), src.block(i)) for i in range(5))
    os.unlink(node_a.block_path(int(hashes[2])))
    assert node_b.count_prefix(hashes) == 2
    # another key prefix is another directory: nothing shared
    assert open_remote_store(fs_config(str(tmp_path), key_prefix="other")).count_prefix(hashes) == 0
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert leftovers == []
    node_a.close()
    node_b.close()


def test_filesystem_corrupt_or_short_files_are_misses(tmp_path: os.PathLike[str]) -> None:
    store = FilesystemStore(fs_config(str(tmp_path)))
    src, dst = Pool(4, seed=16), Pool(4)
    hashes = chain(4)
    assert src.put(store, hashes, range(4)).all()
    paths = [store.block_path(int(h)) for h in hashes]
    with open(paths[0], "r+b") as f:  # flip a payload byte
        f.seek(777)
        byte = f.read(1)
        f.seek(777)
        f.write(bytes([byte[0] ^ 0x01]))
    os.truncate(paths[1], BLOCK_BYTES)  # torn: trailer missing
    with open(paths[2], "wb") as f:
        f.write(os.urandom(BLOCK_BYTES + 16))
    assert dst.get(store, hashes, range(4)).tolist() == [False, False, False, True]
    assert np.array_equal(dst.block(3), src.block(3))
    # rewriting heals a corrupt block
    assert src.put(store, hashes[:1], [0]).all() and dst.get(store, hashes[:1], [0]).all()
    store.close()


def _write_same_block_repeatedly(path: str, pattern: int, rounds: int) -> None:
    with FilesystemStore(fs_config(path)) as store:
        pool = Pool(1)
        pool.block(0)[:] = pattern
        for _ in range(rounds):
            assert pool.put(store, chain(1), [0]).all()


def test_filesystem_concurrent_writers_of_one_block_leave_a_valid_file(tmp_path: os.PathLike[str]) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run threads
    writers = [ctx.Process(target=_write_same_block_repeatedly, args=(str(tmp_path), p, 150)) for p in (0xAA, 0x55)]
    for w in writers:
        w.start()
    store, reader = FilesystemStore(fs_config(str(tmp_path))), Pool(1)
    num_hits = 0
    while any(w.is_alive() for w in writers):
        # every read is a miss or one writer's complete block, never a mix
        if reader.get(store, chain(1), [0]).all():
            num_hits += 1
            assert np.unique(reader.block(0)).tolist() in ([0xAA], [0x55])
    for w in writers:
        w.join(10)
        assert w.exitcode == 0
    assert reader.get(store, chain(1), [0]).all()
    assert np.unique(reader.block(0)).tolist() in ([0xAA], [0x55])
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == [f"{int(chain(1)[0]):016x}"]
    assert num_hits > 0


def test_filesystem_missing_directory_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(str(tmp_path), "not-mounted")
    with pytest.raises(RemoteUnavailable, match="not-mounted"):
        open_remote_store(fs_config(missing))
    store = FilesystemStore(fs_config(str(tmp_path)))
    os.rename(store.root, store.root + ".gone")
    with pytest.raises(RemoteUnavailable, match="flexkv"):
        store.ping()


def test_cluster_slot_migration_mid_flight_keeps_every_block_readable_and_writable() -> None:
    """ASK (slot half migrated) and MOVED (migration done) are followed; nothing becomes a miss."""
    with RedisCluster(3) as cluster:
        store = open_remote_store(RemoteConfig(port=cluster.ports[0]))
        assert isinstance(store, RedisStore)
        src, dst = Pool(16, seed=20), Pool(16)
        hashes = chain(16, salt=20)
        assert src.put(store, hashes[:12], range(12)).all()
        slot = key_slot(store.key(int(hashes[0])))
        same_slot = [i for i in range(16) if key_slot(store.key(int(hashes[i]))) == slot]
        owner = cluster.owner_of(slot)
        target = (owner + 1) % 3
        # block 0 moves now; the slot stays MIGRATING, so its owner answers ASK for block 0
        cluster.begin_migration(slot, owner, target, [store.key(int(hashes[0]))])
        assert store.count_prefix(hashes[:12]) == 12
        assert dst.get(store, hashes[:12], range(12)).all()
        for i in range(12):
            assert np.array_equal(dst.block(i), src.block(i))
        # a new key of the migrating slot is written where the migration sends it (ASK on a miss)
        new_key_hash = next(h for h in range(1 << 40, (1 << 40) + 10**6) if key_slot(store.key(h)) == slot)
        assert Pool(1, seed=22).put(store, np.array([new_key_hash], dtype=np.uint64), [0]).all()
        cluster.finish_migration(slot, owner, target)  # the old owner now answers MOVED
        other = Pool(16)
        assert other.get(store, hashes[:12], range(12)).all(), "MOVED followed, slot map refreshed"
        assert store.count_prefix(hashes[:12]) == 12
        assert Pool(1).get(store, np.array([new_key_hash], dtype=np.uint64), [0]).all()
        with cluster.servers[target].client() as client:
            assert client.exists(store.key(int(hashes[0]))) == 1 and same_slot[0] == 0
        assert src.put(store, hashes[12:], range(12, 16)).all() and store.count_prefix(hashes) == 16
        store.close()


def test_cluster_primary_killed_makes_its_blocks_misses_while_the_rest_serve() -> None:
    with RedisCluster(3) as cluster:
        store = open_remote_store(RemoteConfig(port=cluster.ports[0]), op_timeout_s=1.0)
        src, dst = Pool(24, seed=23), Pool(24)
        hashes = chain(24, salt=23)
        assert src.put(store, hashes, range(24)).all()
        assert isinstance(store, RedisStore)
        owners = [cluster.owner_of(key_slot(store.key(int(h)))) for h in hashes]
        victim = owners[3]
        # a primary restarted (same port, its data gone): the dead connection is replaced at once,
        # its blocks are written again and no shard is skipped afterwards
        cluster.servers[victim].stop()
        cluster.servers[victim].start()
        deadline = time.monotonic() + 10
        while not cluster._state_ok(cluster.servers[victim]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert src.put(store, hashes, range(24)).all()
        assert Pool(24).get(store, hashes, range(24)).all()
        cluster.kill(victim)
        t0 = time.monotonic()
        ok = dst.get(store, hashes, range(24))
        assert ok.tolist() == [o != victim for o in owners], "exactly the dead shard's blocks miss"
        for i in np.flatnonzero(ok):
            assert np.array_equal(dst.block(int(i)), src.block(int(i)))
        assert store.count_prefix(hashes) == owners.index(victim)
        assert time.monotonic() - t0 < 5.0
        wrote = Pool(24, seed=24).put(store, chain(24, salt=24), range(24))
        assert wrote.any() and not wrote.all(), "writes to live shards succeed, the dead shard's fail"
        store.close()


# -- AUTH and TLS (issue 13 §4) -------------------------------------------------------------------


def test_password_and_acl_user_right_ones_work_wrong_ones_are_clear_errors() -> None:
    with RedisServer(password="admin-pw") as srv:
        with srv.client() as admin:
            admin.execute_command("ACL", "SETUSER", "kv", "on", ">kv-pw", "~flexkv:*", "+@all")
            admin.execute_command("ACL", "SETUSER", "other", "on", ">other-pw", "~elsewhere:*", "+@all")
        hashes = chain(3, salt=30)
        with open_remote_store(RemoteConfig(port=srv.port, username="kv", password="kv-pw")) as store:
            src, dst = Pool(3, seed=30), Pool(3)
            assert src.put(store, hashes, range(3)).all() and dst.get(store, hashes, range(3)).all()
            assert all(np.array_equal(dst.block(i), src.block(i)) for i in range(3))
        for bad in (RemoteConfig(port=srv.port, username="kv", password="nope"),
                    RemoteConfig(port=srv.port, username="nobody", password="kv-pw"),
                    RemoteConfig(port=srv.port, password="nope"),
                    RemoteConfig(port=srv.port)):
            with pytest.raises(RemoteUnavailable, match=r"authentication failed.*username / remote\.password"):
                open_remote_store(bad)
        # a user whose ACL does not cover flexkv's keys: each block is refused (a miss), no crash
        with open_remote_store(RemoteConfig(port=srv.port, username="other", password="other-pw")) as store:
            assert not Pool(3, seed=31).put(store, hashes, range(3)).any()
            assert not Pool(3).get(store, hashes, range(3)).any()


def test_tls_with_client_certificates(tmp_path: os.PathLike[str]) -> None:
    from tests.redis_server import TlsFiles

    (tmp_path / "good").mkdir()  # type: ignore[operator]
    (tmp_path / "rogue").mkdir()  # type: ignore[operator]
    tls, rogue = TlsFiles.make(str(tmp_path / "good")), TlsFiles.make(str(tmp_path / "rogue"))  # type: ignore[operator]
    with RedisServer(tls=tls, password="pw") as srv:
        good = RemoteConfig(port=srv.port, password="pw", tls=True, tls_ca_file=tls.ca, tls_cert_file=tls.client_cert,
                            tls_key_file=tls.client_key)
        hashes = chain(4, salt=32)
        with open_remote_store(good) as store:
            src, dst = Pool(4, seed=32), Pool(4)
            assert src.put(store, hashes, range(4)).all() and dst.get(store, hashes, range(4)).all()
            assert all(np.array_equal(dst.block(i), src.block(i)) for i in range(4))
            assert store.count_prefix(hashes) == 4
        cases = [
            (dataclasses.replace(good, tls_ca_file=rogue.ca), "certificate verify failed"),  # server not trusted
            (dataclasses.replace(good, tls_cert_file=rogue.client_cert, tls_key_file=rogue.client_key), ""),
            (dataclasses.replace(good, tls_cert_file="", tls_key_file=""), ""),  # server wants a client cert
            (dataclasses.replace(good, tls=False), ""),  # plain text to a TLS port
            (dataclasses.replace(good, password="wrong"), "authentication failed"),
        ]
        for config, message in cases:
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable, match=rf"127\.0\.0\.1:{srv.port}.*{message}"):
                open_remote_store(config)
            assert time.monotonic() - t0 < 3.0
