"""BlockPool and RadixIndex on their own: allocation, double frees, growth, splits, tail eviction."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.native.hasher import hash_blocks
from flexkv.scheduler.eviction import LRUEvictor
from flexkv.scheduler.index import RadixIndex
from flexkv.scheduler.pool import BlockPool
from flexkv.types import CapacityError, Medium


def test_pool_allocates_frees_and_refuses_double_frees() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(3)
    assert sorted(ids.tolist()) == [0, 1, 2] and pool.num_free_blocks == 1
    assert not pool.can_allocate(2)
    with pytest.raises(CapacityError):
        pool.allocate(2)
    pool.free(ids[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(ids[:2])
    pool.check_invariants()
    assert pool.num_free_blocks == 2, "a refused free changes nothing"


def test_growable_pool_doubles() -> None:
    pool = BlockPool(2, growable=True)
    ids = pool.allocate(5)
    assert np.unique(ids).size == 5 and pool.num_blocks >= 5
    pool.free(ids)
    pool.check_invariants()
    assert pool.num_used_blocks == 0


def _stored(index: RadixIndex, tokens: np.ndarray, now: int) -> np.ndarray:
    hashes = hash_blocks(tokens, 4)
    match = index.match(hashes)
    ids = index.allocate(hashes.size - match.num_blocks, match)
    index.insert(match, hashes[match.num_blocks:match.num_blocks + ids.size], ids, now)
    index.publish(ids)
    index.check_invariants()
    return hashes


def test_index_splits_on_divergence_and_evicts_leaf_tails_oldest_first() -> None:
    index = RadixIndex(Medium.CPU, BlockPool(12), LRUEvictor())
    trunk = np.arange(16, dtype=np.int64)
    a = _stored(index, np.concatenate([trunk, np.arange(100, 116)]), now=1)  # 8 blocks, one node
    b = _stored(index, np.concatenate([trunk, np.arange(200, 208)]), now=2)  # splits after block 4
    assert index.num_nodes == 3 and index.match(a).num_blocks == 8 and index.match(b).num_blocks == 6
    index.lock(index.match(b).block_ids()[-1:])  # b's leaf is locked: a's leaf goes first, tail first
    assert index.evict(3) == 3
    index.check_invariants()
    assert index.match(a).num_blocks == 5 and index.match(b).num_blocks == 6
    assert index.evict(10) == 1, "only a's last block is left to evict: the trunk is internal, b is locked"
    assert index.match(a).num_blocks == 4 and index.num_nodes == 2
    index.unlock(index.match(b).block_ids()[-1:])
    assert index.evict(10) == 6 and index.num_nodes == 0
    index.check_invariants()
