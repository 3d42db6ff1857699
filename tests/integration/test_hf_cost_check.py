"""The HF engine's cost check on a real server with a real SSD tier (O_DIRECT files in a tmp dir).

A tier forced slow (``measure_read_rates=False`` and a tiny ``ssd_read_gbps``) makes the engine restore
only the CPU-resident prefix, or nothing when none of it is in CPU, and the output stays token-identical
to the same forwards without flexkv; the first reservation never leaks; a fast tier, or the check off,
restores everything as before. The engine's compute cost is a fixed model here, so every choice is
deterministic on a loaded machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the HF engine needs transformers (build.sh installs it)")

from transformers import DynamicCache

from flexkv.cli.stats import fetch_snapshot
from flexkv.common.config import CacheConfig
from flexkv.integration.hf import HFPagedEngine, PagedKVPool, flexkv_model_config, random_model, tiny_llama_config
from flexkv.integration.hf.cost import CostCheck, PrefillCostModel, RestoreChoice
from flexkv.integration.hf.engine import layer_kv
from flexkv.integration.hf.models import kv_shape
from flexkv.kvmanager import KVManager
from flexkv.shm import list_flexkv_segments
from tests.runtime.kvtest import needs_ssd_tier

pytestmark = pytest.mark.timeout(120)

T = 4
NUM_PAGES = 64
CPU_BLOCKS = 16
COMPUTE = PrefillCostModel.fixed(1e-3, 1e-4)  # 1 ms + 0.1 ms a token: what the engine believes


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = set(list_flexkv_segments())
    yield
    leaked = {s for s in set(list_flexkv_segments()) - before if f"-{os.getpid()}-" in s}
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"


class Stack:
    """A library-mode server with an SSD tier, the engine's pool registered, and a reference pool."""

    def __init__(self, tmp_path: Path, ssd_read_gbps: float) -> None:
        needs_ssd_tier()
        d = tmp_path / "nvme0"
        d.mkdir(parents=True, exist_ok=True)
        self.cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=CPU_BLOCKS, enable_ssd=True, num_ssd_blocks=256,
                                 ssd_cache_dir=(str(d),), cpu_read_gbps=100.0, ssd_read_gbps=ssd_read_gbps,
                                 measure_read_rates=False)
        self.config = tiny_llama_config("sdpa")
        self.model = random_model(self.config, torch.float32, seed=0)
        layers, heads, head_dim = kv_shape(self.config)
        self.pool = PagedKVPool(layers, heads, head_dim, NUM_PAGES, T, torch.float32, "cpu")
        self.ref_pool = PagedKVPool(layers, heads, head_dim, NUM_PAGES, T, torch.float32, "cpu")
        self.kvm = KVManager(flexkv_model_config(self.config, torch.float32), self.cache)
        self.kvm.start()
        self.kvm.register_kv_buffers(self.pool.register_with(), self.pool.layout)
        self.engines: list[HFPagedEngine] = []

    def engine(self, cost_check: bool | CostCheck = True) -> HFPagedEngine:
        check = CostCheck(COMPUTE, explore_every=0) if cost_check is True else cost_check
        eng = HFPagedEngine(self.model, self.pool, self.kvm, put_completely=True, cost_check=check)
        self.engines.append(eng)
        return eng

    def reference(self) -> HFPagedEngine:
        eng = HFPagedEngine(self.model, self.ref_pool, None)
        self.engines.append(eng)
        return eng

    def close(self) -> None:
        for eng in self.engines:
            eng.close()
        self.kvm.shutdown()
        self.pool.close()
        self.ref_pool.close()


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for s in made:
        s.close()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def same_forwards(ref: HFPagedEngine, earlier: torch.Tensor, tokens: torch.Tensor, restored: int,
                  new_tokens: int) -> list[int]:
    """The reference of a flexkv turn that restored ``restored`` tokens: this engine computes
    ``earlier`` (the prompt whose forward computed that prefix) and reuses its first ``restored``."""
    _, cache, _, _ = ref.prefill(earlier)
    logits, cache, _, _ = ref.prefill(tokens, (cache, restored) if restored else None)
    return ref.decode(logits, cache, tokens.numel(), new_tokens)


def evict_tail(eng: HFPagedEngine, a: torch.Tensor, other_blocks: int) -> None:
    """Store ``a`` (in CPU and, written through, on SSD), then a prompt of ``other_blocks`` blocks that
    pushes ``a``'s last blocks (the LRU leaves) out of the 16-block CPU tier."""
    eng.generate(a, 1)
    eng.generate(prompt(other_blocks * T + 1, seed=99), 1)


def check_clean(s: Stack) -> None:
    s.kvm.check_invariants()
    stats = s.kvm.stats()
    assert stats["num_unlaunched_matches"] == 0 and stats["num_tasks"] == 0, stats
    assert s.pool.num_free_pages == NUM_PAGES, "every page came back"


def test_a_slow_ssd_tier_restores_only_the_cpu_prefix_and_the_output_is_unchanged(
        stacks: list[Stack], tmp_path: Path) -> None:
    s = Stack(tmp_path, ssd_read_gbps=1e-6)  # 1 KB/s: reading 4 blocks would take seconds
    stacks.append(s)
    eng = s.engine()
    a = prompt(12 * T + 1, seed=1)
    evict_tail(eng, a, other_blocks=8)  # a: blocks 0..7 in CPU, 8..11 only on SSD
    longer = torch.cat([a[:12 * T], prompt(5, seed=2)])
    disk_reads = fetch_snapshot(s.kvm.server_address, 10)["counters"]["op_counts"].get("DISK2H|ok", 0)
    out, st = eng.generate(longer, 16)
    assert st.choice is RestoreChoice.CPU_PREFIX, st
    assert (st.num_matched_tokens, st.num_restored_tokens, st.num_computed_tokens) == (12 * T, 8 * T, 4 * T + 5)
    assert not st.fallback and "SSD" in st.choice_reason
    after = fetch_snapshot(s.kvm.server_address, 10)["counters"]["op_counts"].get("DISK2H|ok", 0)
    assert after == disk_reads, "the declined SSD part was never read"
    assert out == same_forwards(s.reference(), a, longer, 8 * T, 16)
    check_clean(s)
    # the turn's put stored the recomputed blocks in CPU again: the next turn restores them all from CPU
    _, again = eng.generate(torch.cat([longer, prompt(3, seed=3)]), 1)
    assert again.choice is RestoreChoice.ALL and again.num_restored_tokens == 13 * T, again
    check_clean(s)


def test_a_slow_ssd_tier_with_nothing_in_cpu_means_recompute(stacks: list[Stack], tmp_path: Path) -> None:
    s = Stack(tmp_path, ssd_read_gbps=1e-6)
    stacks.append(s)
    eng = s.engine()
    a = prompt(8 * T + 1, seed=4)
    evict_tail(eng, a, other_blocks=16)  # the other prompt fills the CPU tier: a is only on SSD
    longer = torch.cat([a[:8 * T], prompt(6, seed=5)])
    out, st = eng.generate(longer, 16)
    assert st.choice is RestoreChoice.RECOMPUTE and st.num_restored_tokens == 0 and st.num_matched_tokens == 8 * T
    ref_out, ref_st = s.reference().generate(longer, 16)
    assert out == ref_out and ref_st.num_restored_tokens == 0
    check_clean(s)


def test_a_fast_ssd_tier_or_the_check_off_restores_everything_as_before(stacks: list[Stack], tmp_path: Path) -> None:
    for ssd_gbps, cost_check in ((100.0, True), (1e-6, False)):
        s = Stack(tmp_path / f"{ssd_gbps}-{cost_check}", ssd_read_gbps=ssd_gbps)
        stacks.append(s)
        eng = s.engine(cost_check)
        a = prompt(12 * T + 1, seed=6)
        evict_tail(eng, a, other_blocks=8)
        longer = torch.cat([a[:12 * T], prompt(5, seed=7)])
        out, st = eng.generate(longer, 16)
        assert st.num_restored_tokens == 12 * T and not st.fallback, st
        assert st.choice is (RestoreChoice.ALL if cost_check else None), st
        reads = fetch_snapshot(s.kvm.server_address, 10)["counters"]["op_counts"].get("DISK2H|ok", 0)
        assert reads == 1, "the SSD part was read"
        assert out == same_forwards(s.reference(), a, longer, 12 * T, 16)
        check_clean(s)


def test_the_engine_learns_its_prefill_cost_from_its_own_prefills(stacks: list[Stack], tmp_path: Path) -> None:
    """Which forwards the model learns from (the fit itself: test_hf_cost_model.py; timings on this
    shared machine jump by 100x when the process is descheduled, so no choice is asserted here)."""
    s = Stack(tmp_path, ssd_read_gbps=3.0)
    stacks.append(s)
    check = CostCheck(explore_every=0)
    eng = s.engine(check)
    first_prompt = prompt(9 * T + 1, seed=8)
    _, first = eng.generate(first_prompt, 1)
    assert first.choice is None, "nothing matched: nothing to weigh"
    eng.calibrate_cost(1024)
    _, st = eng.generate(torch.cat([first_prompt[:9 * T], prompt(3, seed=9)]), 1)
    # the first prefill (37 tokens), the calibration's second pass (chunks of a 1024-token prompt), and the
    # prefill after a restore counted with its cached prefix (36 restored, 3 computed) when it restored
    expected = [(0, 37), (0, 64), (64, 192), (256, 256), (512, 512), (st.num_restored_tokens, st.num_computed_tokens)]
    assert [(p, n) for p, n, _ in check.model.samples] == expected
    assert all(t > 0 for _, _, t in check.model.samples)
    assert st.choice is not None and st.num_matched_tokens == 9 * T, st
    if "no prefill cost estimate yet (5 prefills seen)" in st.choice_reason:  # the fit was ill-posed then
        assert st.choice is RestoreChoice.ALL
    else:
        assert "estimated TTFT" in st.choice_reason and st.choice is not RestoreChoice.CPU_PREFIX  # all in CPU
    with pytest.raises(ValueError, match="no cost check"):
        s.engine(False).calibrate_cost(64)
    check_clean(s)


def test_the_restored_cpu_prefix_is_bit_exact_kv(stacks: list[Stack], tmp_path: Path) -> None:
    """The references above are only as good as this: the CPU prefix restored after a declined SSD
    part is torch.equal to the K/V the reference computed and reuses."""
    s = Stack(tmp_path, ssd_read_gbps=1e-6)
    stacks.append(s)
    eng, ref = s.engine(), s.reference()
    a = prompt(12 * T + 1, seed=10)
    evict_tail(eng, a, other_blocks=8)
    longer = torch.cat([a[:12 * T], prompt(5, seed=11)])
    _, cache, st, put = eng.prefill(longer)
    eng.finish_put(put)
    assert st.choice is RestoreChoice.CPU_PREFIX and st.num_restored_tokens == 8 * T
    _, ref_cache, _, _ = ref.prefill(a)
    fresh = DynamicCache(config=s.config)
    ref._reuse(ref_cache, 8 * T, fresh)
    for i in range(s.config.num_hidden_layers):
        (k, v), (ref_k, ref_v) = layer_kv(cache, i), layer_kv(fresh, i)
        assert torch.equal(k[:, :, :8 * T], ref_k) and torch.equal(v[:, :, :8 * T], ref_v), f"layer {i}"
    check_clean(s)
