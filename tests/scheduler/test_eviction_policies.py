"""Eviction policies, narrated: which prompt each policy gives up first, per-tier policies from the
config, and proactive eviction. Every scenario checks the index's invariants after each step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import hash_blocks
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.eviction import EvictionParams, HazardClass, HazardEvictor, SLRUEvictor, _gittins, make_evictor
from flexkv.scheduler.index import RadixIndex
from flexkv.scheduler.pool import BlockPool
from flexkv.types import EvictionPolicy, Medium

pytestmark = pytest.mark.timeout(60)

T = 4


def _prompt(n: int) -> np.ndarray:
    """Two blocks, no prefix shared with another n."""
    return np.arange(1000 * n, 1000 * n + 2 * T, dtype=np.int64)


class Tier:
    """A 6-block index (three 2-block prompts) with a clock the scenario sets."""

    def __init__(self, policy: EvictionPolicy, **params: float) -> None:
        evictor = make_evictor(policy, EvictionParams(**params))  # type: ignore[arg-type]
        self.index = RadixIndex(Medium.CPU, BlockPool(6), evictor)

    def store(self, n: int, now: float) -> None:
        hashes = hash_blocks(_prompt(n), T)
        match = self.index.match(hashes)
        ids = self.index.allocate(hashes.size - match.num_blocks, match)
        self.index.insert(match, hashes[match.num_blocks:], ids, now)
        self.index.publish(ids)
        self.index.check_invariants()

    def hit(self, n: int, now: float) -> None:
        match = self.index.match(hash_blocks(_prompt(n), T))
        self.index.touch(match, match.num_blocks, now)
        self.index.check_invariants()

    def cached(self) -> list[int]:
        return [n for n in range(10) if self.index.match(hash_blocks(_prompt(n), T)).num_blocks == 2]


def _scenario(policy: EvictionPolicy, **params: float) -> list[int]:
    """Store 0, 1, 2 (full); hit 0 twice and 1 once, then 2 most recently of all; store 3: who is gone?"""
    tier = Tier(policy, **params)
    for n in range(3):
        tier.store(n, now=float(n))
    tier.hit(0, now=3.0)
    tier.hit(0, now=4.0)
    tier.hit(1, now=5.0)
    tier.hit(2, now=6.0)
    tier.store(3, now=7.0)
    tier.index.check_invariants()
    return tier.cached()


def test_lru_evicts_the_least_recently_used_prompt() -> None:
    assert _scenario(EvictionPolicy.LRU) == [1, 2, 3]


def test_fifo_evicts_the_oldest_insertion_whatever_its_hits() -> None:
    assert _scenario(EvictionPolicy.FIFO) == [1, 2, 3]  # 0 was inserted first, hits do not refresh it
    tier = Tier(EvictionPolicy.FIFO)
    for n in range(3):
        tier.store(n, now=float(n))
    tier.hit(0, now=10.0)
    tier.store(3, now=11.0)
    assert tier.cached() == [1, 2, 3]


def test_lfu_evicts_the_fewest_hits_first() -> None:
    assert _scenario(EvictionPolicy.LFU) == [0, 2, 3]  # 1 and 2 have one hit each: the less recent, 1, goes
    tier = Tier(EvictionPolicy.LFU)
    for n in range(3):
        tier.store(n, now=float(n))
    tier.hit(0, now=3.0)
    tier.hit(2, now=4.0)
    tier.store(3, now=5.0)
    assert tier.cached() == [0, 2, 3], "1 has no hit: it goes first although 0 is older"


def test_frequency_lru_hits_buy_grace_time() -> None:
    # reward 10 s: 0 (2 hits, last 4 s) ranks 24, 1 (1 hit, 5 s) 15, 2 (1 hit, 6 s) 16: 1 goes
    assert _scenario(EvictionPolicy.FLRU, hit_reward_s=10.0) == [0, 2, 3]
    # reward 0.1 s: plain recency again
    assert _scenario(EvictionPolicy.FLRU, hit_reward_s=0.1) == [1, 2, 3]


def test_slru_protects_prompts_hit_enough_times_within_its_share() -> None:
    # promote at 2 hits: only 0 is protected; 1 is the least recent probation prompt
    assert _scenario(EvictionPolicy.SLRU, promote_hits=2, protected_ratio=0.8) == [0, 2, 3]
    # promote at 1 hit: all three protected (6 of 6 queued blocks > 50%): the protected LRU goes
    assert _scenario(EvictionPolicy.SLRU, promote_hits=1, protected_ratio=0.5) == [1, 2, 3]


def test_slru_counts_segment_blocks_through_splits_extensions_and_cuts() -> None:
    index = RadixIndex(Medium.CPU, BlockPool(16), SLRUEvictor(promote_hits=1, protected_ratio=0.5))
    trunk = np.arange(4 * T, dtype=np.int64)
    for now, tokens in enumerate([trunk, np.concatenate([trunk, np.arange(500, 500 + 2 * T)]),
                                  np.concatenate([trunk[:2 * T], np.arange(900, 900 + 3 * T)])]):
        hashes = hash_blocks(tokens, T)
        match = index.match(hashes)
        index.touch(match, match.num_blocks, float(now))
        match = index.match(hashes)
        ids = index.allocate(hashes.size - match.num_blocks, match)
        index.insert(match, hashes[match.num_blocks:], ids, float(now))
        index.publish(ids)
        index.check_invariants()
    assert index.evict(3) == 3
    index.check_invariants()
    left = index.pool.num_used_blocks
    assert left > 0 and index.evict(100) == left
    index.check_invariants()
    assert index.pool.num_used_blocks == 0, "everything unlocked is evictable in the end"


MODEL = ModelConfig(num_layers=2, num_kv_heads=2, head_size=4, dtype="float16")


def test_each_tier_uses_its_own_policy() -> None:
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=8,
                        ssd_cache_dir=("/tmp/unused",), eviction_policy="slru", eviction_policy_ssd="fifo")
    cp = ControlPlane(MODEL, cache)
    assert type(cp.tiers.cpu.evictor).__name__ == "SLRUEvictor"
    assert cp.tiers.ssd is not None and type(cp.tiers.ssd.evictor).__name__ == "FIFOEvictor"


def test_proactive_eviction_frees_a_ratio_once_above_the_threshold() -> None:
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=20, evict_start_threshold=0.5, evict_ratio=0.2)
    cp = ControlPlane(MODEL, cache)
    slots = np.arange(64, dtype=np.int64)
    for i in range(4):  # 4 prompts x 3 blocks = 12 of 20 blocks: above 50%
        key = (0, i)
        cp.put_match(key, np.arange(100 * i, 100 * i + 3 * T, dtype=np.int64))
        ops = cp.launch(key, slots[:3 * T])
        while ops:
            ops += cp.complete_op(ops.pop().op_id, True)
        cp.release(key)
        cp.check_invariants()
    assert cp.tiers.cpu.pool.num_used_blocks == 12
    assert cp.evict_proactively() == 4 and cp.tiers.cpu.pool.num_used_blocks == 8
    assert cp.evict_proactively() == 0, "at 40% the tier is below the threshold: nothing more goes"
    assert cp.stats()["proactive_evicted_blocks"] == 4
    cp.check_invariants()


def test_proactive_eviction_is_off_by_default() -> None:
    cp = ControlPlane(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=4))
    assert cp.evict_proactively() == 0


# ---- hazard: the online-learned reuse index ----------------------------------------------------

def _hazard_index(num_blocks: int, tokens_per_block: int = 1, **params: float) -> RadixIndex:
    evictor = HazardEvictor(refit_s=1.0, prior_lives=1.0, **params)  # type: ignore[arg-type]
    return RadixIndex(Medium.CPU, BlockPool(num_blocks), evictor)


def _store(index: RadixIndex, tokens: np.ndarray, now: float, tokens_per_block: int = 1) -> None:
    """A request as the planner runs it: the get's hit refreshes the path, then the put inserts the rest."""
    hashes = hash_blocks(tokens, tokens_per_block)
    match = index.match(hashes)
    index.touch(match, match.num_blocks, now)
    match = index.match(hashes)
    ids = index.allocate(hashes.size - match.num_blocks, match)
    index.insert(match, hashes[match.num_blocks:], ids, now)
    index.publish(ids)
    index.check_invariants()


def _cached_blocks(index: RadixIndex, tokens: np.ndarray, tokens_per_block: int = 1) -> int:
    return index.match(hash_blocks(tokens, tokens_per_block)).num_blocks


def test_hazard_with_nothing_learned_is_frequency_lru() -> None:
    assert _scenario(EvictionPolicy.HAZARD, hit_reward_s=10.0) == [0, 2, 3]  # as FLRU: 1 ranks lowest
    assert _scenario(EvictionPolicy.HAZARD, hit_reward_s=0.0) == [1, 2, 3]  # no reward: LRU


def test_hazard_gittins_index_of_known_curves() -> None:
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    cdf = np.array([[0.0, 0.5, 0.5, 1.0],  # half reused within 1 s, the rest at 3 s
                    [0.0, 0.0, 0.0, 0.0]])  # never reused
    table = _gittins(cdf, edges)
    # at age 0: best horizon 1 s: 0.5 reused per 1 s held (to 3 s: 1.0 per 1 + 0.5 + 0.5 = 2 s, also 0.5)
    # at age 1: to 3 s: 0.5 per (0.5 + 0.5) = 0.5; at age 2: 0.5 per 0.5 = 1.0; at the last edge 0
    assert np.allclose(table[0], [0.5, 0.5, 1.0, 0.0])
    assert np.allclose(table[1], 0.0)


def test_hazard_learns_to_keep_the_class_that_gets_reused_over_a_newer_one_that_does_not() -> None:
    """Short fresh prompts are always hit again 5 s later; long ones (>= 128 blocks) never are. Once
    learned, a long prompt goes before an older short one (LRU would evict the short one)."""
    index = _hazard_index(400)
    evictor = index.evictor
    assert isinstance(evictor, HazardEvictor)
    for k in range(12):
        t = 20.0 * k
        short = np.arange(10_000 * (k + 1), 10_000 * (k + 1) + 4, dtype=np.int64)
        long = np.arange(10_000 * (k + 1) + 1000, 10_000 * (k + 1) + 1000 + 130, dtype=np.int64)
        _store(index, short, t)
        _store(index, long, t + 1.0)
        _store(index, short, t + 5.0)  # the reuse
    evictor.refit()
    # (the long class is not exactly 0: its estimate is shrunk toward all lives pooled)
    assert evictor.value(HazardClass.FRESH_SHORT, 1.0) > 5 * evictor.value(HazardClass.FRESH_MEDIUM, 1.0)
    index.evict(index.pool.num_used_blocks)
    index.check_invariants()
    short = np.arange(500_000, 500_004, dtype=np.int64)
    long = np.arange(600_000, 600_130, dtype=np.int64)
    _store(index, short, 300.0)
    _store(index, long, 301.0)
    assert index.evict(4) == 4
    index.check_invariants()
    assert _cached_blocks(index, short) == 4, "the older short prompt (a reused class) stays"
    assert _cached_blocks(index, long) == 126, "the newer long prompt (never reused) gave up its tail"


def test_hazard_ghost_list_sees_a_continuation_of_an_evicted_prompt() -> None:
    """A prompt evicted whole, then continued: the put re-inserting its blocks resolves its life
    (reused after 7 s) and the new run is classed as a continuation, not a fresh prompt."""
    index = _hazard_index(64)
    evictor = index.evictor
    assert isinstance(evictor, HazardEvictor)
    first = np.arange(100, 110, dtype=np.int64)
    _store(index, first, 0.0)
    assert index.evict(64) == 10
    index.check_invariants()
    _store(index, np.concatenate([first, np.arange(200, 205)]), 7.0)
    [node] = [n for n in index.iter_nodes() if not n.children]
    assert evictor.class_of(node) == (HazardClass.CONTINUED, 1)
    assert [life.gap for life in evictor.lives()] == [7.0, pytest.approx(float("nan"), nan_ok=True)]


def test_hazard_remainder_of_a_split_is_its_own_class() -> None:
    """A continuation that diverges inside the last node (a prompt's partial last chunk) leaves that
    chunk behind as a REMAINDER leaf, while the new run continues the conversation."""
    index = _hazard_index(64)
    evictor = index.evictor
    assert isinstance(evictor, HazardEvictor)
    base = np.arange(100, 112, dtype=np.int64)
    _store(index, base, 0.0)
    _store(index, np.concatenate([base[:9], np.arange(300, 306)]), 30.0)
    classes = sorted(evictor.class_of(n) or (-1, -1) for n in index.iter_nodes() if not n.children)
    assert classes == [(HazardClass.REMAINDER, 0), (HazardClass.CONTINUED, 1)]


_HAZARD_PROMPTS = [np.arange(24, dtype=np.int64)[:n] for n in (6, 12, 24)] + [
    np.concatenate([np.arange(10, dtype=np.int64), np.arange(500, 500 + n)]) for n in (3, 9)] + [
    np.arange(1000, 1000 + n, dtype=np.int64) for n in (5, 17)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["store", "store", "hit", "evict", "refit"]),
                                st.integers(0, len(_HAZARD_PROMPTS) - 1), st.floats(0.0, 40.0)),
                      min_size=5, max_size=60))
def test_hazard_random_sequences_keep_its_state_consistent(steps: list[tuple[str, int, float]]) -> None:
    """Stores (get + put), hits, evictions and refits in any order, the clock moving by up to 40 s:
    the index's and the policy's invariants hold after every step, and everything is evictable in the end."""
    index = _hazard_index(40, tokens_per_block=2, window_s=60.0, ghost_entries=8)
    evictor = index.evictor
    assert isinstance(evictor, HazardEvictor)
    now = 0.0
    for action, prompt, dt in steps:
        now += dt
        tokens = _HAZARD_PROMPTS[prompt]
        if action == "store":
            _store(index, tokens, now, tokens_per_block=2)
        elif action == "hit":
            match = index.match(hash_blocks(tokens, 2))
            index.touch(match, match.num_blocks, now)
        elif action == "evict":
            index.evict(prompt + 1)
        else:
            evictor.refit()
        index.check_invariants()
    used = index.pool.num_used_blocks
    assert index.evict(used + 1) == used
    index.check_invariants()
