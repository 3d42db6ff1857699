"""Narrated scenarios: several flexkv nodes share one remote store, which is the remote tier's index.

Two (or three) ControlPlanes play the nodes; one ``FakeStore`` (a dict hash -> "bytes") is the
store they share. Ops are "executed" in order: H2REMOTE puts keys into the store, REMOTE2H
succeeds only if every key it reads is still there (as the real worker reports), every other op
succeeds unless the test says otherwise. A fake clock drives the lookup cache's TTL and the outage
retry delay. check_invariants() runs after every step.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import encode_namespace, hash_blocks
from flexkv.remote import RemoteUnavailable
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.graph import TransferOp
from flexkv.scheduler.remote_lookup import RemoteLookup, RemoteTier
from flexkv.types import InvalidRequest, OpType, TaskStatus

T = 4
MODEL = ModelConfig(num_layers=2, num_kv_heads=2, head_size=4, dtype="float16")
TTL_S, RETRY_S = 2.0, 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """The shared store: keys -> value (the block's hash stands for its bytes)."""

    def __init__(self) -> None:
        self.keys: dict[int, int] = {}
        self.down = False
        self.queries: list[list[int]] = []  # every count_prefix call's hashes

    def count_prefix(self, hashes: np.ndarray) -> int:
        self.queries.append(hashes.tolist())
        if self.down:
            raise RemoteUnavailable("127.0.0.1:6379: connection refused")
        count = 0
        for h in hashes.tolist():
            if h not in self.keys:
                break
            count += 1
        return count

    def run(self, op: TransferOp) -> bool:
        """What the remote worker would report for ``op``."""
        assert op.block_hashes is not None and op.block_hashes.size == op.dst_block_ids.size
        if self.down:
            return False
        hashes = op.block_hashes.tolist()
        if op.op_type is OpType.H2REMOTE:
            assert op.dst_block_ids.tolist() == [-1] * len(hashes), "the store has no block ids"
            self.keys.update((h, h) for h in hashes)
            return True
        assert op.src_block_ids.tolist() == [-1] * len(hashes)
        return all(h in self.keys for h in hashes)

    def evict(self, hashes: np.ndarray) -> None:
        for h in hashes.tolist():
            self.keys.pop(h, None)


def make_node(store: FakeStore, clock: FakeClock, cpu: int = 16, ssd: int = 0) -> ControlPlane:
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=cpu, enable_ssd=ssd > 0, num_ssd_blocks=ssd,
                        ssd_cache_dir=("/tmp/unused",) if ssd else (), enable_remote=True, num_remote_blocks=8)
    lookup = RemoteLookup(store.count_prefix, ttl_s=TTL_S, retry_after_s=RETRY_S, clock=clock)
    return ControlPlane(MODEL, cache, remote_lookup=lookup)


def toks(num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.arange(num_tokens, dtype=np.int64) + seed * 100_000


def slots(num_tokens: int, first_gpu_block: int = 0) -> np.ndarray:
    return np.arange(num_tokens, dtype=np.int64) + first_gpu_block * T


def drain(cp: ControlPlane, store: FakeStore, ops: list[TransferOp], fail: tuple[OpType, ...] = ()) -> list[TransferOp]:
    """Complete ops (and those they unlock) in order; remote ops as the store decides."""
    seen, pending = [], list(ops)
    while pending:
        op = pending.pop(0)
        seen.append(op)
        remote = op.op_type in (OpType.REMOTE2H, OpType.H2REMOTE)
        ok = store.run(op) if remote else op.op_type not in fail
        pending += cp.complete_op(op.op_id, ok, "" if ok else "fake failure")
        cp.check_invariants()
    return seen


def put(cp: ControlPlane, store: FakeStore, key: tuple[int, int], tokens: np.ndarray,
        **kw: object) -> list[TransferOp]:
    cp.put_match(key, tokens, **kw)
    ops = drain(cp, store, cp.launch(key, slots(tokens.size)))
    assert cp.poll(key, completely=True).status is TaskStatus.SUCCESS
    cp.release(key)
    cp.check_invariants()
    return ops


def get(cp: ControlPlane, store: FakeStore, key: tuple[int, int], tokens: np.ndarray,
        **kw: object) -> tuple[np.ndarray, list[TransferOp]]:
    """A GET run to the end; returns (the mask actually loaded, the ops)."""
    cp.get_match(key, tokens, **kw)
    ops = drain(cp, store, cp.launch(key, slots(tokens.size)))
    resp = cp.poll(key)
    assert resp.status is TaskStatus.SUCCESS and resp.return_mask is not None
    cp.release(key)
    cp.check_invariants()
    return resp.return_mask, ops


def of_type(ops: list[TransferOp], op_type: OpType) -> list[TransferOp]:
    return [op for op in ops if op.op_type is op_type]


@pytest.fixture
def shared() -> tuple[FakeStore, FakeClock]:
    return FakeStore(), FakeClock()


def test_what_node_a_put_node_b_finds_and_promotes_into_its_cpu(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    tokens = toks(26)  # 6 whole blocks
    hashes = hash_blocks(tokens, T)

    # node A stores the prompt: D2H, then write-through of all 6 blocks the store lacks
    ops = put(node_a, store, (1, 1), tokens)
    assert [op.op_type for op in ops] == [OpType.D2H, OpType.H2REMOTE]
    d2h, h2remote = ops
    assert h2remote.src_block_ids.tolist() == d2h.dst_block_ids.tolist()
    assert h2remote.block_hashes is not None and h2remote.block_hashes.tolist() == hashes.tolist()
    assert set(store.keys) == set(hashes.tolist())

    # node B never saw the prompt, yet its match reports all 6 blocks and plans REMOTE2H -> H2D
    mask = node_b.get_match((2, 1), tokens)
    assert mask.tolist() == [True] * 24 + [False] * 2
    assert store.queries[-1] == hashes.tolist(), "one batched existence check of the blocks B lacks"
    node_b.check_invariants()
    [remote2h] = node_b.launch((2, 1), slots(26, first_gpu_block=30))
    assert remote2h.op_type is OpType.REMOTE2H
    assert remote2h.block_hashes is not None and remote2h.block_hashes.tolist() == hashes.tolist()
    promoted = remote2h.dst_block_ids
    assert node_b.stats()["cpu_used_blocks"] == 6 and node_b.get_match((2, 9), tokens).sum() == 0, (
        "promoted blocks are reserved in B's CPU tier but not visible before they land")
    node_b.release((2, 9))
    [h2d] = node_b.complete_op(remote2h.op_id, store.run(remote2h))
    node_b.check_invariants()
    assert h2d.op_type is OpType.H2D and h2d.src_block_ids.tolist() == promoted.tolist()
    assert h2d.dst_block_ids.tolist() == list(range(30, 36))
    drain(node_b, store, [h2d])
    assert node_b.poll((2, 1)).return_mask is mask
    node_b.release((2, 1))

    # now B serves the prompt from its own CPU tier, without asking the store
    num_queries = len(store.queries)
    loaded, ops = get(node_b, store, (2, 2), tokens)
    assert loaded.sum() == 24 and [op.op_type for op in ops] == [OpType.H2D]
    assert len(store.queries) == num_queries


def test_node_b_asks_the_store_only_for_blocks_beyond_its_own_prefix(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    tokens = toks(24)
    hashes = hash_blocks(tokens, T)
    put(node_a, store, (1, 1), tokens)
    put(node_b, store, (2, 1), tokens[:8])  # B holds blocks 0-1 itself (and finds them in the store)
    assert store.queries[-1] == hashes[:2].tolist()
    loaded, ops = get(node_b, store, (2, 2), tokens)
    assert loaded.sum() == 24
    assert store.queries[-1] == hashes[2:].tolist()
    [remote2h] = of_type(ops, OpType.REMOTE2H)
    assert remote2h.block_hashes is not None and remote2h.block_hashes.tolist() == hashes[2:].tolist()
    [h2d] = of_type(ops, OpType.H2D)
    assert h2d.src_block_ids[2:].tolist() == remote2h.dst_block_ids.tolist()


def test_positives_are_cached_for_the_ttl_then_asked_again(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock, cpu=4)
    prompt, other = toks(16), toks(16, 1)
    put(node_a, store, (1, 1), prompt)
    put(node_a, store, (1, 2), other)
    assert get(node_b, store, (2, 1), prompt)[0].sum() == 16
    num_queries = len(store.queries)

    # B's CPU (4 blocks) is refilled by another prompt, so the next GET needs the store again ...
    assert get(node_b, store, (2, 2), other)[0].sum() == 16
    assert len(store.queries) == num_queries + 1
    # ... but within the TTL the answer comes from B's cache of positives: no round trip
    clock.now += TTL_S / 2
    assert get(node_b, store, (2, 3), prompt)[0].sum() == 16
    assert len(store.queries) == num_queries + 1
    assert node_b.stats()["remote_cache_hit_blocks"] == 4

    # once the TTL has passed the store is asked again (and an evicted prompt is no longer found)
    clock.now += TTL_S
    store.evict(hash_blocks(other, T))
    assert get(node_b, store, (2, 4), other)[0].sum() == 0
    assert len(store.queries) == num_queries + 2


def test_own_writes_in_flight_are_neither_hits_nor_written_twice(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node = make_node(store, clock)
    tokens = toks(24)
    hashes = hash_blocks(tokens, T)
    node.put_match((1, 1), tokens[:16])
    [d2h] = node.launch((1, 1), slots(16))
    [h2remote] = node.complete_op(d2h.op_id, True)
    store.keys.update((h, h) for h in hashes[:4].tolist())  # the worker's writes landed, the op not done yet
    node.check_invariants()
    assert node.stats()["remote_writing_blocks"] == 4

    # a second PUT of a longer prompt writes only the 2 new blocks, not the 4 in flight
    node.put_match((1, 2), tokens)
    ops = drain(node, store, node.launch((1, 2), slots(24)))
    [h2remote_2] = of_type(ops, OpType.H2REMOTE)
    assert h2remote_2.block_hashes is not None and h2remote_2.block_hashes.tolist() == hashes[4:].tolist()

    # the store lookup itself never reports a key this server is still writing
    tier = node.tiers.remote_store
    assert tier is not None
    assert tier.lookup.known_prefix(hashes) == 6
    assert tier.readable_prefix(hashes) == 0 and tier.readable_prefix(hashes[4:]) == 2
    drain(node, store, [h2remote])
    assert tier.readable_prefix(hashes) == 6 and node.stats()["remote_writing_blocks"] == 0
    node.release((1, 1))
    node.release((1, 2))
    node.check_invariants()


def test_an_outage_reads_as_empty_warns_once_and_retries_after_the_delay(
        shared: tuple[FakeStore, FakeClock], caplog: pytest.LogCaptureFixture) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    prompt = toks(16)
    put(node_a, store, (1, 1), prompt)
    caplog.set_level(logging.INFO, logger="flexkv.remote")

    store.down = True
    assert get(node_b, store, (2, 1), prompt)[0].sum() == 0, "the tier reads as empty"
    warnings = [r for r in caplog.records if r.name == "flexkv.remote"]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    num_queries = len(store.queries)

    # within the retry delay: no store call, no new warning; a PUT plans no write-through
    clock.now += RETRY_S / 2
    assert get(node_b, store, (2, 2), prompt)[0].sum() == 0
    node_b.put_match((2, 3), toks(16, 5))
    ops = drain(node_b, store, node_b.launch((2, 3), slots(16)))
    assert [op.op_type for op in ops] == [OpType.D2H], "no H2REMOTE while the store is known down"
    assert node_b.poll((2, 3)).status is TaskStatus.SUCCESS, "the engine part is done: blocks are in CPU"
    resp = node_b.poll((2, 3), completely=True)
    assert resp.status is TaskStatus.FAILED and "4 blocks not written through" in resp.error, (
        "completely=True shows the skipped write-through")
    assert node_b.stats()["remote_skipped_write_blocks"] == 4
    node_b.release((2, 3))
    assert len(store.queries) == num_queries
    assert node_b.stats()["remote_unavailable"] == 1 and node_b.stats()["remote_outages"] == 1

    # after the delay it is asked once more; still down: still one warning in all
    clock.now += RETRY_S
    assert get(node_b, store, (2, 4), prompt)[0].sum() == 0
    assert len(store.queries) == num_queries + 1
    assert len([r for r in caplog.records if r.name == "flexkv.remote"]) == 1

    # the store is back: the next call after the delay finds the prefix, recovery is logged once
    store.down = False
    clock.now += RETRY_S
    assert get(node_b, store, (2, 5), prompt)[0].sum() == 16
    assert get(node_b, store, (2, 6), toks(16, 5))[0].sum() == 16  # B's own, from its CPU
    messages = [r.getMessage() for r in caplog.records if r.name == "flexkv.remote"]
    assert len(messages) == 2 and "back" in messages[1]
    assert node_b.stats()["remote_unavailable"] == 0


def test_remote2h_failure_still_delivers_the_local_prefix(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    tokens = toks(24)
    hashes = hash_blocks(tokens, T)
    put(node_a, store, (1, 1), tokens)
    put(node_b, store, (2, 1), tokens[:8])  # B holds blocks 0-1
    used = node_b.stats()["cpu_used_blocks"]

    # B matches all 6 blocks; then the store evicts block 3 before B's REMOTE2H reads it
    match_mask = node_b.get_match((2, 2), tokens)
    assert match_mask.sum() == 24
    store.evict(hashes[3:4])
    [remote2h] = node_b.launch((2, 2), slots(24, first_gpu_block=10))
    [h2d] = node_b.complete_op(remote2h.op_id, store.run(remote2h))
    node_b.check_invariants()
    assert h2d.src_block_ids.size == 2 and h2d.dst_block_ids.tolist() == [10, 11], "H2D cut to B's own blocks"
    assert node_b.stats()["cpu_used_blocks"] == used, "the 4 promoted CPU blocks rolled back"
    drain(node_b, store, [h2d])
    resp = node_b.poll((2, 2), completely=True)
    assert resp.status is TaskStatus.SUCCESS and resp.error == ""
    assert resp.return_mask is not None and resp.return_mask.tolist() == [True] * 8 + [False] * 16
    assert match_mask.sum() == 24, "the mask the match returned is not rewritten"
    assert node_b.stats()["get_lost_blocks"] == 4
    node_b.release((2, 2))

    # the miss dropped B's cached positives: the store is asked again and the hole ends the prefix
    num_queries = len(store.queries)
    loaded, ops = get(node_b, store, (2, 3), tokens)
    assert len(store.queries) == num_queries + 1 and store.queries[-1] == hashes[2:].tolist()
    assert loaded.sum() == 12
    [remote2h] = of_type(ops, OpType.REMOTE2H)
    assert remote2h.block_hashes is not None and remote2h.block_hashes.tolist() == hashes[2:3].tolist()


def test_remote2h_failure_with_nothing_local_succeeds_with_an_empty_mask(
        shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    put(node_a, store, (1, 1), toks(16))
    assert node_b.get_match((2, 1), toks(16)).sum() == 16
    store.down = True  # gone between match and read
    ops = drain(node_b, store, node_b.launch((2, 1), slots(16)))
    assert [op.op_type for op in ops] == [OpType.REMOTE2H], "nothing left for an H2D to move"
    resp = node_b.poll((2, 1), completely=True)
    assert resp.status is TaskStatus.SUCCESS and resp.return_mask is not None and not resp.return_mask.any()
    assert node_b.stats()["cpu_used_blocks"] == 0


def test_remote2h_failure_waits_for_disk2h_then_loads_cpu_and_ssd_part(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock, cpu=4, ssd=6)
    tokens = toks(16)
    hashes = hash_blocks(tokens, T)
    put(node_a, store, (1, 1), tokens)
    put(node_b, store, (2, 1), tokens[:8])  # blocks 0-1 in B's CPU and SSD
    put(node_b, store, (2, 2), toks(16, 7))  # pushes them out of B's 4-block CPU
    node_b.get_match((2, 3), tokens)
    ops = node_b.launch((2, 3), slots(16))
    assert sorted(op.op_type.name for op in ops) == ["DISK2H", "REMOTE2H"]
    [disk2h], [remote2h] = of_type(ops, OpType.DISK2H), of_type(ops, OpType.REMOTE2H)
    assert remote2h.block_hashes is not None and remote2h.block_hashes.tolist() == hashes[2:].tolist()
    store.evict(hashes[2:])
    assert node_b.complete_op(remote2h.op_id, store.run(remote2h)) == [], "H2D still waits for the SSD part"
    node_b.check_invariants()
    [h2d] = node_b.complete_op(disk2h.op_id, True)
    node_b.check_invariants()
    assert h2d.src_block_ids.tolist() == disk2h.dst_block_ids.tolist() and h2d.dst_block_ids.tolist() == [0, 1]
    drain(node_b, store, [h2d])
    resp = node_b.poll((2, 3))
    assert resp.status is TaskStatus.SUCCESS and resp.return_mask is not None and resp.return_mask.sum() == 8


def test_put_whose_h2remote_fails_completes_locally_and_keeps_its_ssd_copy(
        shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node = make_node(store, clock, ssd=8)
    tokens = toks(16)
    node.put_match((1, 1), tokens)
    [d2h] = node.launch((1, 1), slots(16))
    later = node.complete_op(d2h.op_id, True)
    assert sorted(op.op_type.name for op in later) == ["H2DISK", "H2REMOTE"]
    store.down = True  # the store vanished after the match
    [h2remote], [h2disk] = of_type(later, OpType.H2REMOTE), of_type(later, OpType.H2DISK)
    assert node.complete_op(h2remote.op_id, store.run(h2remote), "remote store unavailable") == []
    node.check_invariants()
    assert node.poll((1, 1)).status is TaskStatus.SUCCESS
    assert node.poll((1, 1), completely=True).status is TaskStatus.UNREADY, "H2DISK still in flight"
    node.complete_op(h2disk.op_id, True)
    node.check_invariants()
    resp = node.poll((1, 1), completely=True)
    assert resp.status is TaskStatus.FAILED and "H2REMOTE" in resp.error
    assert node.stats()["ssd_used_blocks"] == 4, "the sibling write-through still committed"
    assert node.stats()["remote_cached_hashes"] == 0 and not store.keys


def test_namespaces_never_collide_in_the_shared_store(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b = make_node(store, clock), make_node(store, clock)
    lora_a, lora_b = encode_namespace(["lora-a"]), encode_namespace(["lora-b"])
    put(node_a, store, (1, 1), toks(16), namespace=lora_a)
    assert get(node_b, store, (2, 1), toks(16), namespace=lora_b)[0].sum() == 0
    assert get(node_b, store, (2, 2), toks(16))[0].sum() == 0
    assert not set(store.queries[-1]) & set(store.keys), "other namespaces ask for other keys"
    loaded, ops = get(node_b, store, (2, 3), toks(16), namespace=lora_a)
    assert loaded.sum() == 16
    [remote2h] = of_type(ops, OpType.REMOTE2H)
    assert remote2h.block_hashes is not None
    assert remote2h.block_hashes.tolist() == hash_blocks(toks(16), T, lora_a).tolist()


def test_a_hole_ends_the_prefix_and_the_next_put_fills_it(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    node_a, node_b, node_c = (make_node(store, clock) for _ in range(3))
    tokens = toks(24)
    hashes = hash_blocks(tokens, T)
    put(node_a, store, (1, 1), tokens)
    store.evict(hashes[2:3])  # the store evicted a middle key
    loaded, ops = get(node_b, store, (2, 1), tokens)
    assert loaded.sum() == 8, "the prefix stops at the hole"
    [remote2h] = of_type(ops, OpType.REMOTE2H)
    assert remote2h.block_hashes is not None and remote2h.block_hashes.tolist() == hashes[:2].tolist()

    # B computes and stores the whole prompt: it writes from the hole on, and C then finds all of it
    ops = put(node_b, store, (2, 2), tokens)
    [h2remote] = of_type(ops, OpType.H2REMOTE)
    assert h2remote.block_hashes is not None and h2remote.block_hashes.tolist() == hashes[2:].tolist()
    assert get(node_c, store, (3, 1), tokens)[0].sum() == 24


def test_lookup_unit_contract() -> None:
    clock, calls = FakeClock(), []

    def count_prefix(hashes: np.ndarray) -> int:
        calls.append(hashes.size)
        present = [h in (1, 2, 3) for h in hashes.tolist()]
        return present.index(False) if False in present else len(present)

    lookup = RemoteLookup(count_prefix, ttl_s=1.0, retry_after_s=1.0, clock=clock, max_cached_hashes=4)
    hashes = np.arange(1, 7, dtype=np.uint64)
    assert lookup.known_prefix(hashes) == 3 and calls == [6]
    assert lookup.known_prefix(hashes) == 3 and calls == [6, 3], "only the uncached tail is asked"
    assert lookup.known_prefix(hashes[:3]) == 3 and calls == [6, 3], "fully cached: no call"
    assert lookup.known_prefix(hashes[:0]) == 0 and len(calls) == 2
    lookup.note_stored(np.arange(10, 20, dtype=np.uint64))
    assert lookup.stats()["remote_cached_hashes"] == 4, "the cache is bounded"
    lookup.check_invariants()
    lookup.note_missing(np.arange(10, 20, dtype=np.uint64))
    assert lookup.stats()["remote_cached_hashes"] == 0
    with pytest.raises(InvalidRequest, match="uint64"):
        lookup.known_prefix(np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="ttl_s"):
        RemoteLookup(count_prefix, ttl_s=-1)

    def buggy(hashes: np.ndarray) -> int:
        raise InvalidRequest("a bug, not an outage")

    with pytest.raises(InvalidRequest):
        RemoteLookup(buggy).known_prefix(hashes)

    tier = RemoteTier(lookup)
    tier.begin_write(hashes[1:2])
    assert tier.unwritten(hashes, 0).tolist() == [0, 2, 3, 4, 5]
    tier.end_write(hashes[1:2], stored=False)
    assert tier.writing_counts() == {}


def test_without_lookup_or_without_remote_the_local_index_rules(shared: tuple[FakeStore, FakeClock]) -> None:
    store, clock = shared
    lookup = RemoteLookup(store.count_prefix, clock=clock)
    off = ControlPlane(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=8), remote_lookup=lookup)
    assert off.tiers.remote is None and off.tiers.remote_store is None
    local = ControlPlane(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_remote=True))
    assert local.tiers.remote is not None and local.tiers.remote_store is None


# ---- property: random interleavings over two nodes and a store that evicts on its own --------

_TRUNK = np.arange(20, dtype=np.int64)
PROMPTS = [_TRUNK[:8], _TRUNK, np.concatenate([_TRUNK[:8], np.arange(700, 712)]), np.arange(900, 916)]
HASHES = [hash_blocks(p, T) for p in PROMPTS]
GARBAGE = -1

step = st.tuples(st.sampled_from(["get", "get", "put", "put", "ok", "ok", "ok", "fail", "evict", "tick", "drain"]),
                 st.integers(0, 1), st.integers(0, len(PROMPTS) - 1), st.integers(0, 7))


class Cluster:
    """Two nodes, one store of values; CPU tiers hold 'bytes' (the block hash written there)."""

    def __init__(self) -> None:
        self.store, self.clock = FakeStore(), FakeClock()
        self.nodes = [make_node(self.store, self.clock, cpu=6) for _ in range(2)]
        self.cpu: list[dict[int, int]] = [{}, {}]
        self.in_flight: list[tuple[int, TransferOp]] = []
        self.prompt_of: dict[tuple[int, tuple[int, int]], int] = {}
        self.next_id = 0

    def match(self, kind: str, node: int, prompt: int) -> None:
        self.next_id += 1
        key = (node, self.next_id)
        cp = self.nodes[node]
        num_queries = len(self.store.queries)
        (cp.get_match if kind == "get" else cp.put_match)(key, PROMPTS[prompt])
        assert len(self.store.queries) <= num_queries + 1, "a match makes at most one store call"
        self.prompt_of[node, key] = prompt
        self.in_flight += [(node, op) for op in cp.launch(key, np.arange(PROMPTS[prompt].size, dtype=np.int64))]

    def complete(self, index: int, ok: bool) -> None:
        node, op = self.in_flight.pop(index % len(self.in_flight))
        hashes, cpu = HASHES[self.prompt_of[node, op.task_key]], self.cpu[node]
        ok = self.move(op, hashes, cpu, ok)
        self.in_flight += [(node, o) for o in self.nodes[node].complete_op(op.op_id, ok)]
        resp = self.nodes[node].poll(op.task_key)
        if resp.status is TaskStatus.SUCCESS:
            self.nodes[node].release(op.task_key)

    def move(self, op: TransferOp, hashes: np.ndarray, cpu: dict[int, int], ok: bool) -> bool:
        src, dst = op.src_block_ids.tolist(), op.dst_block_ids.tolist()
        keys = op.block_hashes.tolist() if op.block_hashes is not None else []
        if op.op_type is OpType.D2H:
            cpu.update((d, int(hashes[s]) if ok else GARBAGE) for s, d in zip(src, dst, strict=True))
        elif op.op_type is OpType.H2D:
            assert not ok or [cpu.get(s) for s in src] == hashes[dst].tolist(), "H2D read wrong bytes"
        elif op.op_type is OpType.H2REMOTE and ok:
            self.store.keys.update((k, cpu[s]) for k, s in zip(keys, src, strict=True))
        elif op.op_type is OpType.REMOTE2H:
            ok = ok and all(k in self.store.keys for k in keys)
            cpu.update((d, self.store.keys[k] if ok else GARBAGE) for k, d in zip(keys, dst, strict=True))
        return ok


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=20, max_size=60))
def test_random_interleavings_keep_invariants_and_deliver_right_bytes(
        steps: list[tuple[str, int, int, int]]) -> None:
    c = Cluster()
    for action, node, prompt, n in steps:
        if action in ("get", "put"):
            c.match(action, node, prompt)
        elif action in ("ok", "fail", "drain") and c.in_flight:
            for _ in range(len(c.in_flight) if action == "drain" else 1):
                c.complete(n, action != "fail")
        elif action == "evict" and c.store.keys:
            c.store.evict(np.array(sorted(c.store.keys)[n % len(c.store.keys):][:1], dtype=np.uint64))
        elif action == "tick":
            c.clock.now += n * TTL_S / 4
        for cp in c.nodes:
            cp.check_invariants()
    assert all(v == k for k, v in c.store.keys.items()), "the store only ever holds right bytes"
    while c.in_flight:
        c.complete(0, True)
    for cp in c.nodes:
        for key in [k for (nd, k) in c.prompt_of if cp is c.nodes[nd]]:
            if cp.poll(key).status is not TaskStatus.NOTFOUND:
                cp.release(key)
        cp.check_invariants()
        assert cp.stats()["remote_writing_blocks"] == 0 and cp.stats()["num_ops_in_flight"] == 0
        assert not cp.tiers.cpu.lock_count.any()


def test_a_hung_store_holds_the_helper_thread_never_the_caller() -> None:
    """wait_s mode: a call that outlives wait_s is a miss; later lookups do not queue behind it;
    its answer, when it lands, is cached and serves the next lookup; an outage it reports counts."""
    import threading
    import time

    release, calls = threading.Event(), []

    def hung_count_prefix(hashes: np.ndarray) -> int:
        calls.append(hashes.size)
        if not release.wait(10):
            raise RemoteUnavailable("still hung")
        return int(hashes.size)

    lookup = RemoteLookup(hung_count_prefix, ttl_s=60, wait_s=0.005)
    hashes = np.arange(1, 9, dtype=np.uint64)
    try:
        t0 = time.monotonic()
        assert lookup.known_prefix(hashes) == 0, "late: a miss"
        assert lookup.known_prefix(hashes) == 0, "busy: answered from the cache at once"
        assert time.monotonic() - t0 < 0.5 and calls == [8], "one store call, none queued"
        stats = lookup.stats()
        assert stats["remote_late_lookups"] == 1 and stats["remote_busy_lookups"] == 1
        release.set()
        deadline = time.monotonic() + 5
        while lookup.known_prefix(hashes) != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lookup.known_prefix(hashes) == 8 and calls == [8], "the late answer was cached"
        lookup.check_invariants()
    finally:
        release.set()
        lookup.close()

    def down(hashes: np.ndarray) -> int:
        raise RemoteUnavailable("127.0.0.1:1: connection refused")

    failing = RemoteLookup(down, wait_s=1.0)
    assert failing.known_prefix(hashes) == 0 and not failing.available
    assert failing.stats()["remote_outages"] == 1
    failing.close()
