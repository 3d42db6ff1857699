"""The HF engine's cost check without a model or a server: the prefill fit and the decisions."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.integration.hf.cost import CostCheck, PrefillCostModel, RestoreChoice
from flexkv.types import MatchInfo, Medium

T = 16
BLOCK = 1 << 21  # Llama-3-8B bf16 at 16 tokens


def info(cpu: int, ssd: int, remote: int = 0, ssd_gbps: float = 3.0, cpu_gbps: float = 50.0) -> MatchInfo:
    mask = np.zeros(4096 * T, dtype=np.bool_)
    mask[:(cpu + ssd + remote) * T] = True
    rates = {Medium.CPU: cpu_gbps * 1e9, Medium.SSD: ssd_gbps * 1e9, Medium.REMOTE: 1e9}
    return MatchInfo(1, mask, cpu, ssd, remote, BLOCK, T, rates)


def test_match_info_estimates_its_load_time_from_the_split_and_the_rates() -> None:
    m = info(cpu=100, ssd=50, remote=20)
    assert m.num_tokens == 170 * T and m.num_cpu_tokens == 100 * T
    # SSD and remote read side by side (50 x 2 MiB at 3 GB/s, 20 at 1 GB/s), then all 170 blocks H2D
    assert m.load_s == pytest.approx(max(50 * BLOCK / 3e9, 20 * BLOCK / 1e9) + 170 * BLOCK / 50e9)
    assert m.cpu_load_s == pytest.approx(100 * BLOCK / 50e9)


def test_the_prefill_fit_recovers_a_quadratic_model_and_is_never_negative() -> None:
    truth = PrefillCostModel.fixed(2e-3, 2.5e-5, 1.2e-9)
    model = PrefillCostModel()
    assert not model.ready
    rng = np.random.default_rng(0)
    for p, s in [(0, 2048), (0, 8192), (4096, 512), (0, 32768), (16384, 16384), (30000, 16)]:
        model.observe(p, s, truth.predict(p, s) * float(rng.uniform(0.98, 1.02)))
    assert model.ready
    for p, s in [(0, 4096), (8192, 8192), (32000, 64)]:
        assert model.predict(p, s) == pytest.approx(truth.predict(p, s), rel=0.1)
    model.observe(0, 4096, 100 * truth.predict(0, 4096))  # one forward whose process was descheduled
    model.observe(0, 37, 50 * truth.predict(0, 37))  # and a cold first run: both left out of the refit
    assert model.predict(8192, 8192) == pytest.approx(truth.predict(8192, 8192), rel=0.1)
    linear = PrefillCostModel()
    for s in (10, 20, 40, 80):  # time falls with more tokens: a negative slope is never fitted
        linear.observe(0, s, 1.0 / s)
    assert linear.coefficients is None or min(linear.coefficients) >= 0
    flat = PrefillCostModel()
    for _ in range(5):
        flat.observe(0, 100, 0.01)  # one suffix length only: no slope to learn
    assert not flat.ready
    with pytest.raises(ValueError):
        flat.predict(0, 10)
    with pytest.raises(ValueError):
        PrefillCostModel.fixed(1.0, 0.0, 0.0)


def test_the_check_takes_the_fastest_choice_and_prefers_restoring_on_ties() -> None:
    # 8K-token prompts on an H200: ~250 ms to prefill 8K; 2 MiB per 16 tokens
    compute = PrefillCostModel.fixed(5e-3, 2.5e-5, 1.2e-9)
    check = CostCheck(compute, explore_every=0)
    n = 8192 + 100
    fast = check.decide(info(cpu=256, ssd=256, ssd_gbps=20.0), n)
    assert fast.choice is RestoreChoice.ALL, fast
    slow = check.decide(info(cpu=256, ssd=256, ssd_gbps=0.5), n)  # 512 MiB at 0.5 GB/s >> its recompute
    assert slow.choice is RestoreChoice.CPU_PREFIX, slow
    assert slow.estimates_s[RestoreChoice.CPU_PREFIX] < slow.estimates_s[RestoreChoice.ALL]
    nothing_in_cpu = check.decide(info(cpu=0, ssd=512, ssd_gbps=0.5), n)
    assert nothing_in_cpu.choice is RestoreChoice.RECOMPUTE and RestoreChoice.CPU_PREFIX not in \
        nothing_in_cpu.estimates_s
    cpu_only = check.decide(info(cpu=512, ssd=0), n)
    assert cpu_only.choice is RestoreChoice.ALL and set(cpu_only.estimates_s) == {RestoreChoice.ALL,
                                                                                 RestoreChoice.RECOMPUTE}
    assert "SSD" in slow.reason and "ms" in slow.reason
    unknown = CostCheck().decide(info(cpu=1, ssd=500, ssd_gbps=0.01), n)
    assert unknown.choice is RestoreChoice.ALL and "no prefill cost estimate" in unknown.reason


def test_one_declined_lower_tier_load_in_explore_every_is_restored_anyway() -> None:
    check = CostCheck(PrefillCostModel.fixed(5e-3, 2.5e-5, 1.2e-9), explore_every=3)
    choices = [check.decide(info(cpu=256, ssd=256, ssd_gbps=0.5), 8292).choice for _ in range(7)]
    assert choices == [RestoreChoice.CPU_PREFIX] * 2 + [RestoreChoice.ALL] + [RestoreChoice.CPU_PREFIX] * 2 + \
        [RestoreChoice.ALL, RestoreChoice.CPU_PREFIX]
    assert check.num_declined == 7
    cpu_only = CostCheck(PrefillCostModel.fixed(5e-3, 2.5e-5, 1.2e-9), explore_every=2)
    slow_cpu = [cpu_only.decide(info(cpu=512, ssd=0, cpu_gbps=0.01), 8292).choice for _ in range(4)]
    assert slow_cpu == [RestoreChoice.RECOMPUTE, RestoreChoice.ALL] * 2, "a declined CPU load is explored too"
    with pytest.raises(ValueError):
        CostCheck(explore_every=-1)
