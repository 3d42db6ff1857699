"""The remote tier end to end on a real redis-server (and a shared directory): write-through,
promotion, two nodes sharing prefixes, the store going away and coming back, evicted keys."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexkv.client import HostKVBuffers
from flexkv.common.config import CacheConfig, ModelConfig, RemoteConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import FlexKVError, TaskStatus
from tests.mooncake_server import MooncakeStoreProcesses
from tests.mooncake_server import available as mooncake_available
from tests.redis_server import RedisCluster, RedisServer, free_port
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, tokens

pytestmark = pytest.mark.timeout(120)
MODEL = ModelConfig(num_layers=2, num_kv_heads=2, head_size=16, dtype="float16")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    with RedisServer(str(tmp_path / "redis"), port=free_port()) as server:
        yield server


def remote_cache(remote: RemoteConfig, num_cpu_blocks: int = 16) -> CacheConfig:
    """A node config. Tests that assert remote hits wait up to 1 s for a lookup (a loaded machine may
    take longer than the default 5 ms; a late lookup is a miss); the hung-store test uses the default."""
    remote = dataclasses.replace(remote, lookup_timeout_ms=1000)
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=num_cpu_blocks, enable_remote=True, remote=remote)


class Node:
    """One flexkv server ("node") with its own CPU pool and one engine's host KV buffers."""

    def __init__(self, cache: CacheConfig, seed: int) -> None:
        self.kvm = KVManager(MODEL, cache)
        self.kvm.start()
        self.bufs: HostKVBuffers = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=seed)
        self.kvm.register_kv_buffers(self.bufs, self.bufs.layout)

    def put(self, toks: object, blocks: list[int], completely: bool = True) -> TaskStatus:
        tid = self.kvm.put_async(toks, slots_for(blocks, len(toks)))  # type: ignore[arg-type]
        return self.kvm.wait(tid, timeout=30, completely=completely)[tid].status

    def get(self, toks: object, blocks: list[int]) -> tuple[TaskStatus, int]:
        poison(self.bufs, blocks)
        tid = self.kvm.get_async(toks, slots_for(blocks, len(toks)))  # type: ignore[arg-type]
        res = self.kvm.wait(tid, timeout=30)[tid]
        loaded = int(res.return_mask.sum()) if res.return_mask is not None else 0
        return res.status, loaded

    def close(self) -> None:
        self.kvm.shutdown()
        self.bufs.close()


def _redis_config(server: RedisServer, **kw: object) -> RemoteConfig:
    return RemoteConfig(host="127.0.0.1", port=server.port, **kw)  # type: ignore[arg-type]


def _push_out_of_cpu(node: Node, seeds: range) -> None:
    for s in seeds:
        assert node.put(tokens(8 * T, seed=s), list(range(8, 16))) is TaskStatus.SUCCESS


def test_blocks_evicted_from_cpu_come_back_from_redis_byte_exact(redis_server: RedisServer) -> None:
    node = Node(remote_cache(_redis_config(redis_server)), seed=1)
    try:
        prompt = tokens(8 * T, seed=100)
        assert node.put(prompt, list(range(8))) is TaskStatus.SUCCESS
        assert len(redis_server.client().keys("*")) == 8, "write-through stored every block in redis"
        _push_out_of_cpu(node, range(101, 103))
        status, loaded = node.get(prompt, list(range(20, 28)))
        assert status is TaskStatus.SUCCESS and loaded == 8 * T
        for s, d in zip(range(8), range(20, 28), strict=True):
            assert block_bytes(node.bufs, d) == block_bytes(node.bufs, s)
        node.kvm.check_invariants()
    finally:
        node.close()


def test_two_nodes_share_prefixes_through_one_store(redis_server: RedisServer) -> None:
    a = Node(remote_cache(_redis_config(redis_server)), seed=2)
    b = Node(remote_cache(_redis_config(redis_server)), seed=3)
    try:
        prompt = tokens(6 * T, seed=200)
        assert a.put(prompt, list(range(6))) is TaskStatus.SUCCESS
        tid, mask = b.kvm.get_match(prompt)
        assert mask.all(), "node B finds what node A stored"
        poison(b.bufs, list(range(30, 36)))
        b.kvm.launch(tid, slots_for(list(range(30, 36)), len(prompt)))
        assert b.kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS
        for s, d in zip(range(6), range(30, 36), strict=True):
            assert block_bytes(b.bufs, d) == block_bytes(a.bufs, s), "B restored A's bytes"
        tid, mask = b.kvm.get_match(prompt, namespace=["tenant-x"])
        assert not mask.any(), "another namespace never matches"
        b.kvm.cancel(tid)
        a.kvm.check_invariants()
        b.kvm.check_invariants()
    finally:
        a.close()
        b.close()


def test_the_store_going_away_falls_back_to_local_and_recovers(redis_server: RedisServer) -> None:
    node = Node(remote_cache(_redis_config(redis_server)), seed=4)
    try:
        only_remote = tokens(8 * T, seed=300)
        assert node.put(only_remote, list(range(8))) is TaskStatus.SUCCESS
        _push_out_of_cpu(node, range(301, 303))
        redis_server.stop()
        local = tokens(4 * T, seed=304)
        assert node.put(local, list(range(16, 20)), completely=False) is TaskStatus.SUCCESS, "a put completes locally"
        status, loaded = node.get(only_remote, list(range(20, 28)))
        assert status is TaskStatus.SUCCESS and loaded == 0, "the store is gone: a miss, not an error"
        status, loaded = node.get(local, list(range(28, 32)))
        assert status is TaskStatus.SUCCESS and loaded == 4 * T, "local tiers still serve"
        node.kvm.check_invariants()

        redis_server.start()  # same port, empty (no persistence): recovery, then new data flows again
        deadline = time.monotonic() + 15
        again = tokens(4 * T, seed=305)
        while time.monotonic() < deadline:
            node.put(again, list(range(36, 40)))
            if len(redis_server.client().keys("*")) >= 4:
                break
            again = tokens(4 * T, seed=int(time.monotonic() * 1000) % 100000 + 1000)
            time.sleep(0.3)
        assert len(redis_server.client().keys("*")) >= 4, "write-through resumed after the store came back"
        node.kvm.check_invariants()
    finally:
        node.close()


def test_keys_evicted_by_the_store_are_misses_never_corrupt(redis_server: RedisServer) -> None:
    node = Node(remote_cache(_redis_config(redis_server)), seed=5)
    try:
        prompt = tokens(8 * T, seed=400)
        assert node.put(prompt, list(range(8))) is TaskStatus.SUCCESS
        _push_out_of_cpu(node, range(401, 403))
        client = redis_server.client()
        keys = sorted(client.keys("*"))
        client.flushall()
        status, loaded = node.get(prompt, list(range(20, 28)))
        assert status is TaskStatus.SUCCESS and loaded == 0
        assert all(set(block_bytes(node.bufs, d)) == {0xAB} for d in range(20, 28)), "nothing was written"
        assert keys, "there were keys to evict"
        node.kvm.check_invariants()
    finally:
        node.close()


def test_an_unreachable_store_at_start(tmp_path: Path) -> None:
    dead = RemoteConfig(host="127.0.0.1", port=free_port())
    kvm = KVManager(MODEL, remote_cache(dead), start_timeout_s=30)
    with pytest.raises(FlexKVError, match="unreachable"):
        kvm.start()
    kvm.shutdown()
    optional = dataclasses.replace(dead, required=False)
    with KVManager(MODEL, remote_cache(optional)) as kvm:
        tid, mask = kvm.put_match(tokens(4 * T, seed=6))  # works, without the remote tier
        assert mask.all()
        kvm.cancel(tid)


def test_two_nodes_share_prefixes_through_a_shared_directory(tmp_path: Path) -> None:
    shared = RemoteConfig(backend="filesystem", path=str(tmp_path / "shared-fs"))
    (tmp_path / "shared-fs").mkdir()
    a = Node(remote_cache(shared), seed=7)
    b = Node(remote_cache(shared), seed=8)
    try:
        prompt = tokens(5 * T, seed=500)
        assert a.put(prompt, list(range(5))) is TaskStatus.SUCCESS
        status, loaded = b.get(prompt, list(range(30, 35)))
        assert status is TaskStatus.SUCCESS and loaded == 5 * T
        for s, d in zip(range(5), range(30, 35), strict=True):
            assert block_bytes(b.bufs, d) == block_bytes(a.bufs, s)
    finally:
        a.close()
        b.close()


# -- a hung or restarted store (issue 12.7) ----------------------------------------------------------

MODEL_DP2 = dataclasses.replace(MODEL, dp_size=2)


def _timed_match(kvm: KVManager, toks: object) -> tuple[float, bool]:
    t0 = time.monotonic()
    tid, mask = kvm.get_match(toks)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    kvm.cancel(tid)
    return elapsed, bool(mask.any())


def _match_until_hit(kvm: KVManager, toks: object, timeout_s: float = 15) -> bool:
    """A lookup later than lookup_timeout_ms is a miss whose answer is cached: retry until it hits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _timed_match(kvm, toks)[1]:
            return True
        time.sleep(0.05)
    return False


def test_a_hung_store_never_holds_the_server_loop(redis_server: RedisServer) -> None:
    """redis-server SIGSTOPped: get_match answers at once (a miss), and another client's requests
    are not delayed; after SIGCONT remote hits come back byte-exact. Default lookup_timeout_ms.
    (Before lookups had a deadline every get_match took the lookup store's 1 s op timeout and every
    other client waited behind it; the bound asserted is half that, for a loaded machine.)"""
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=16, enable_remote=True, remote=_redis_config(redis_server))
    node = Node.__new__(Node)
    node.kvm = KVManager(MODEL_DP2, cache)
    node.kvm.start()
    node.bufs = host_buffers(MODEL_DP2, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=9)
    node.kvm.register_kv_buffers(node.bufs, node.bufs.layout)
    other = KVManager(MODEL_DP2, cache, server_address=node.kvm.server_address, dp_client_id=1)
    try:
        other.start()
        remote_only = tokens(8 * T, seed=600)
        assert node.put(remote_only, list(range(8))) is TaskStatus.SUCCESS
        _push_out_of_cpu(node, range(601, 603))
        local = tokens(4 * T, seed=604)
        assert node.put(local, list(range(16, 20))) is TaskStatus.SUCCESS
        assert _match_until_hit(node.kvm, remote_only), "a healthy store answers within the deadline"

        redis_server.pause()
        latencies: list[float] = []
        hits: list[bool] = []

        def other_client() -> None:  # a client whose prompt is all in CPU: it needs no lookup at all
            for _ in range(40):
                elapsed, hit = _timed_match(other, local)
                latencies.append(elapsed)
                hits.append(hit)

        thread = threading.Thread(target=other_client)
        thread.start()
        mine = [_timed_match(node.kvm, tokens(8 * T, seed=610 + i)) for i in range(25)]
        thread.join(60)
        redis_server.resume()
        assert all(not hit for _, hit in mine), "unknown prompts on a hung store are misses"
        assert max(e for e, _ in mine) < 0.5, f"get_match held by the hung store: {sorted(mine)[-3:]}"
        assert all(hits) and max(latencies) < 0.5, f"another client was delayed: max {max(latencies):.3f} s"
        stats = node.kvm.stats()
        assert stats["remote_late_lookups"] + stats["remote_busy_lookups"] >= 1
        node.kvm.check_invariants()

        assert _match_until_hit(node.kvm, remote_only), "after SIGCONT the store's blocks are found again"
        status, loaded = node.get(remote_only, list(range(20, 28)))
        if loaded:  # (the positive may expire between the two matches on a loaded machine)
            assert status is TaskStatus.SUCCESS and loaded == 8 * T
            assert all(block_bytes(node.bufs, d) == block_bytes(node.bufs, s)
                       for s, d in zip(range(8), range(20, 28), strict=True))
        node.kvm.check_invariants()
    finally:
        other.shutdown()
        node.close()


def test_write_through_after_a_restart_or_during_an_outage_reports_what_it_wrote(
        redis_server: RedisServer) -> None:
    node = Node(remote_cache(_redis_config(redis_server), num_cpu_blocks=40), seed=10)
    try:
        assert node.put(tokens(16 * T, seed=700), list(range(16))) is TaskStatus.SUCCESS
        assert len(redis_server.client().keys("*")) == 16
        redis_server.stop()
        redis_server.start()  # same port, empty: every connection flexkv held is dead now
        status = node.put(tokens(16 * T, seed=701), list(range(16, 32)))
        num_keys = len(redis_server.client().keys("*"))
        assert (status, num_keys) == (TaskStatus.SUCCESS, 16), "dead connections are replaced, the blocks written"

        redis_server.stop()  # a real outage: completely=True must not say SUCCESS
        tid = node.kvm.put_async(tokens(8 * T, seed=702), slots_for(list(range(32, 40)), 8 * T))
        engine = node.kvm.wait(tid, timeout=30)[tid]
        full = node.kvm.wait(tid, timeout=30, completely=True)[tid]
        assert engine.status is TaskStatus.SUCCESS, "the blocks are in CPU"
        assert full.status is TaskStatus.FAILED and "remote" in full.error.lower(), full
        stats = node.kvm.stats()
        assert stats["remote_skipped_write_blocks"] + stats["num_failed_ops"] >= 1, stats
        node.kvm.check_invariants()
    finally:
        node.close()


# -- Redis Cluster (issue 13 §4) ---------------------------------------------------------------------


def _shard_of_each_block(cluster: RedisCluster, toks: object) -> list[int]:
    """Which cluster server holds each block of ``toks`` (keys as the remote workers name them)."""
    from redis.crc import key_slot

    from flexkv.common.config import kv_fingerprint
    from flexkv.native.hasher import hash_blocks
    from flexkv.remote import RedisStore

    with RedisStore(RemoteConfig(port=cluster.ports[0]), kv_fingerprint(MODEL, T)) as store:
        keys = [store.key(int(h)) for h in hash_blocks(toks, T)]  # type: ignore[arg-type]
    return [cluster.owner_of(key_slot(k)) for k in keys]


def _migrate_while_reading(cluster: RedisCluster, a: Node, b: Node) -> None:
    """A slot of a stored prompt is migrated: half way (ASK) node B reads the prompt, after it
    (MOVED) node A, its own CPU copy pushed out, reads it back; both byte-exact, nothing lost."""
    from redis.crc import key_slot

    from flexkv.common.config import kv_fingerprint
    from flexkv.native.hasher import hash_blocks
    from flexkv.remote import RedisStore

    third = tokens(12 * T, seed=803)
    assert a.put(third, list(range(24, 36))) is TaskStatus.SUCCESS
    with RedisStore(RemoteConfig(port=cluster.ports[0]), kv_fingerprint(MODEL, T)) as store:
        key = store.key(int(hash_blocks(third, T)[2]))
    slot = key_slot(key)
    owner = cluster.owner_of(slot)
    target = (owner + 1) % len(cluster.servers)
    cluster.begin_migration(slot, owner, target, [key])
    status, loaded = b.get(third, list(range(0, 12)))
    assert status is TaskStatus.SUCCESS and loaded == 12 * T, "ASK followed by lookup and worker"
    assert all(block_bytes(b.bufs, i) == block_bytes(a.bufs, 24 + i) for i in range(12))
    cluster.finish_migration(slot, owner, target)
    for s in range(804, 807):  # push the prompt out of A's CPU tier
        assert a.put(tokens(12 * T, seed=s), list(range(36, 48))) is TaskStatus.SUCCESS
    status, loaded = a.get(third, list(range(0, 12)))
    assert status is TaskStatus.SUCCESS and loaded == 12 * T, "MOVED followed, the slot map refreshed"
    assert all(block_bytes(a.bufs, i) == block_bytes(a.bufs, 24 + i) for i in range(12))


def test_two_nodes_share_prefixes_through_a_cluster_and_survive_a_dead_primary() -> None:
    with RedisCluster(3) as cluster:
        a = Node(remote_cache(RemoteConfig(port=cluster.ports[0]), num_cpu_blocks=32), seed=11)
        b = Node(remote_cache(RemoteConfig(port=cluster.ports[2]), num_cpu_blocks=32), seed=12)
        try:
            first, second = tokens(12 * T, seed=800), tokens(12 * T, seed=801)
            assert a.put(first, list(range(12))) is TaskStatus.SUCCESS
            assert a.put(second, list(range(12, 24))) is TaskStatus.SUCCESS
            per_shard = [s.client().dbsize() for s in cluster.servers]
            assert sum(per_shard) == 24 and min(per_shard) > 0, f"one prompt's blocks spread: {per_shard}"
            status, loaded = b.get(first, list(range(24, 36)))
            assert status is TaskStatus.SUCCESS and loaded == 12 * T, "B finds what A stored"
            assert all(block_bytes(b.bufs, d) == block_bytes(a.bufs, s) for s, d in zip(range(12), range(24, 36),
                                                                                          strict=True))
            _migrate_while_reading(cluster, a, b)
            owners = _shard_of_each_block(cluster, second)
            victim = next(o for o in owners if o != owners[0])
            num_before_victim = owners.index(victim)
            cluster.kill(victim)
            status, loaded = b.get(second, list(range(36, 48)))
            assert status is TaskStatus.SUCCESS and loaded == num_before_victim * T, (
                "the dead primary's first block ends the prefix; the live shards served the rest")
            assert all(block_bytes(b.bufs, 36 + i) == block_bytes(a.bufs, 12 + i) for i in range(num_before_victim))
            assert all(set(block_bytes(b.bufs, 36 + i)) == {0xAB} for i in range(num_before_victim, 12)), (
                "nothing was written past the loaded prefix")
            tid = b.kvm.put_async(tokens(8 * T, seed=802), slots_for(list(range(0, 8)), 8 * T))
            assert b.kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS, "local tiers keep working"
            b.kvm.wait(tid, timeout=30, completely=True)  # FAILED if a block fell on the dead shard
            a.kvm.check_invariants()
            b.kvm.check_invariants()
        finally:
            a.close()
            b.close()


def test_wrong_credentials_at_start_are_one_clear_error_or_local_tiers_only(tmp_path: Path) -> None:
    with RedisServer(str(tmp_path), password="right") as srv:
        wrong = RemoteConfig(port=srv.port, password="wrong")
        kvm = KVManager(MODEL, remote_cache(wrong), start_timeout_s=30)
        with pytest.raises(FlexKVError, match="authentication failed"):
            kvm.start()
        kvm.shutdown()
        with KVManager(MODEL, remote_cache(dataclasses.replace(wrong, required=False))) as kvm:
            tid, mask = kvm.put_match(tokens(4 * T, seed=900))  # works, without the remote tier
            assert mask.all() and "remote_lookups" not in kvm.stats()
            kvm.cancel(tid)
        node = Node(remote_cache(dataclasses.replace(wrong, password="right")), seed=13)
        try:
            assert node.put(tokens(4 * T, seed=901), list(range(4))) is TaskStatus.SUCCESS
            assert srv.client().dbsize() == 4, "the right password reaches the store"
        finally:
            node.close()


# -- Mooncake Store (issue 13 §5) --------------------------------------------------------------------


@pytest.mark.skipif(not mooncake_available(), reason="mooncake package not installed (see build.sh)")
def test_two_nodes_share_prefixes_through_mooncake_byte_exact() -> None:
    with MooncakeStoreProcesses(segment_mb=64) as procs:
        config = RemoteConfig(backend="mooncake", port=procs.port)
        a = Node(remote_cache(config), seed=14)
        b = Node(remote_cache(config), seed=15)
        try:
            prompt = tokens(8 * T, seed=1000)
            assert a.put(prompt, list(range(8))) is TaskStatus.SUCCESS
            status, loaded = b.get(prompt, list(range(30, 38)))
            assert status is TaskStatus.SUCCESS and loaded == 8 * T, "B restores what A stored"
            for s, d in zip(range(8), range(30, 38), strict=True):
                assert block_bytes(b.bufs, d) == block_bytes(a.bufs, s)
            _push_out_of_cpu(a, range(1001, 1003))  # A's own CPU copy is gone: it reads the store too
            status, loaded = a.get(prompt, list(range(20, 28)))
            assert status is TaskStatus.SUCCESS and loaded == 8 * T
            assert all(block_bytes(a.bufs, 20 + i) == block_bytes(a.bufs, i) for i in range(8))
            procs.stop_master()  # a master restart loses every key: misses, and local tiers still serve
            status, loaded = b.get(tokens(8 * T, seed=1001), list(range(40, 48)))
            assert status is TaskStatus.SUCCESS and loaded == 0
            a.kvm.check_invariants()
            b.kvm.check_invariants()
        finally:
            a.close()
            b.close()
