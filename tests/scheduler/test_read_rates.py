"""ReadRates: the configured prior until a tier's first read, then an EWMA of bytes over seconds."""

from __future__ import annotations

import dataclasses

import pytest

from flexkv.common.config import CacheConfig, load_cache_config
from flexkv.scheduler.read_rates import EWMA_ALPHA, PRIOR_BYTES, ReadRates
from flexkv.types import ConfigError, Medium, OpType
from tests.runtime.kvtest import small_model

BLOCK = 1 << 20


def _ewma(prior_bps: float, ops: list[tuple[int, float]]) -> float:
    """The rate after ``ops`` (bytes, seconds), from the prior counted as one op of PRIOR_BYTES."""
    b, s = float(PRIOR_BYTES), PRIOR_BYTES / prior_bps
    for nbytes, secs in ops:
        b += EWMA_ALPHA * (nbytes - b)
        s += EWMA_ALPHA * (secs - s)
    return b / s


def test_the_rate_starts_at_the_prior_and_follows_the_ewma_of_bytes_over_seconds() -> None:
    rates = ReadRates(CacheConfig(ssd_read_gbps=0.5), BLOCK)
    assert rates.bps(Medium.SSD) == pytest.approx(0.5e9) and rates.bps(Medium.CPU) == pytest.approx(20e9)
    assert rates.bps(Medium.REMOTE) == pytest.approx(1.25e9)
    rates.observe(OpType.DISK2H, 100, 0.5)  # 100 MiB in 0.5 s moves the prior by alpha of its weight
    assert rates.bps(Medium.SSD) == pytest.approx(_ewma(0.5e9, [(100 * BLOCK, 0.5)]))
    rates.observe(OpType.DISK2H, 10, 0.5)  # a smaller, slower op moves the byte-weighted rate by alpha
    b = _ewma(0.5e9, [(100 * BLOCK, 0.5), (10 * BLOCK, 0.5)])
    assert rates.bps(Medium.SSD) == pytest.approx(b)
    for op in (OpType.H2DISK, OpType.D2H, OpType.H2REMOTE):  # writes say nothing about reads
        rates.observe(op, 1, 100.0)
    rates.observe(OpType.DISK2H, 0, 1.0)  # nothing moved, or no time: ignored
    rates.observe(OpType.DISK2H, 5, 0.0)
    assert rates.num_samples == {Medium.CPU: 0, Medium.SSD: 2, Medium.REMOTE: 0}
    rates.observe(OpType.H2D, 4, 1e-3)
    rates.observe(OpType.REMOTE2H, 4, 1e-2)
    cpu = _ewma(20e9, [(4 * BLOCK, 1e-3)])
    assert rates.as_list() == [pytest.approx(cpu), pytest.approx(b), pytest.approx(_ewma(1.25e9, [(4 * BLOCK, 1e-2)]))]
    st = rates.stats()
    assert st["read_samples_ssd"] == 2 and st["read_bps_cpu"] == pytest.approx(cpu)
    one_slow = ReadRates(CacheConfig(), BLOCK)
    one_slow.observe(OpType.H2D, 32, 32 * BLOCK / 1e9)  # one 32 MiB H2D at 1 GB/s (a busy GPU, per-op latency)
    assert one_slow.bps(Medium.CPU) > 10e9, "one small slow op does not replace the prior"
    for _ in range(30):
        one_slow.observe(OpType.H2D, 2048, 2048 * BLOCK / 50e9)  # many 2 GiB ops at 50 GB/s: the rate follows
    assert one_slow.bps(Medium.CPU) == pytest.approx(50e9, rel=0.01)


def test_with_measuring_off_the_configured_rates_stand() -> None:
    rates = ReadRates(CacheConfig(ssd_read_gbps=0.001, measure_read_rates=False), BLOCK)
    rates.observe(OpType.DISK2H, 100, 0.001)
    assert rates.bps(Medium.SSD) == 0.001e9 and rates.num_samples[Medium.SSD] == 0


def test_rates_are_config_keys_checked_and_read_from_the_environment() -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="ssd_read_gbps"):
            CacheConfig(ssd_read_gbps=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="measure_read_rates"):
        CacheConfig(measure_read_rates="no")  # type: ignore[arg-type]
    cache = load_cache_config(small_model(), {"FLEXKV_SSD_READ_GBPS": "0.25", "FLEXKV_MEASURE_READ_RATES": "off",
                                              "FLEXKV_CPU_READ_GBPS": "40"})
    assert (cache.ssd_read_gbps, cache.cpu_read_gbps, cache.measure_read_rates) == (0.25, 40.0, False)
    assert dataclasses.replace(cache, remote_read_gbps=2).remote_read_gbps == 2
