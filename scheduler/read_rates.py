"""ReadRates: how fast each cache tier reads, as the server sees its completed ops.

An engine deciding whether to restore a prefix or recompute it needs the time the load will take
(``MatchInfo.load_s``); that time is blocks x block bytes / the tier's read rate. The rate of a tier
is measured on the ops that read it: H2D (CPU tier -> engine), DISK2H (SSD), REMOTE2H (remote), each
from its dispatch to its completion as the server sees them (worker queueing and the round trip
included: that is what a GET waits for). It is a ratio of two EWMAs, bytes over seconds, so a large
op weighs more than a one-block one. Both EWMAs start from the configured prior
(``CacheConfig.*_read_gbps``) as one pseudo-op of ``PRIOR_BYTES``: a real op moves the rate by
``alpha`` of its weight, so one small op (whose time is mostly per-op latency) or one op slowed by a
busy GPU cannot replace the prior outright. That happened on the H200: one H2D measured at 1 GB/s made
the HF engine's cost check recompute every later prompt, and a tier never read is never measured
again. With ``measure_read_rates`` off the priors are the rates, never replaced (a known disk, or a
test forcing a slow tier). Server thread only.
"""

from __future__ import annotations

from flexkv.common.config import CacheConfig
from flexkv.types import CACHE_TIERS, Medium, OpType

_READS = {OpType.H2D: Medium.CPU, OpType.DISK2H: Medium.SSD, OpType.REMOTE2H: Medium.REMOTE}
EWMA_ALPHA = 0.2  # weight of the newest op: the rate follows a change within ~5 ops
PRIOR_BYTES = 1 << 30  # the prior counts as one op of this size


class ReadRates:
    """Per-tier read rates in bytes/s (prior, then EWMA of completed reads)."""

    def __init__(self, cache: CacheConfig, block_bytes: int, alpha: float = EWMA_ALPHA) -> None:
        self.block_bytes = block_bytes
        self.measure = cache.measure_read_rates
        self.alpha = alpha
        self._prior = {Medium.CPU: cache.cpu_read_gbps * 1e9, Medium.SSD: cache.ssd_read_gbps * 1e9,
                       Medium.REMOTE: cache.remote_read_gbps * 1e9}
        self._bytes = dict.fromkeys(CACHE_TIERS, float(PRIOR_BYTES))
        self._seconds = {t: PRIOR_BYTES / rate for t, rate in self._prior.items()}
        self.num_samples = dict.fromkeys(CACHE_TIERS, 0)

    def observe(self, op_type: OpType, num_blocks: int, seconds: float) -> None:
        """A successful op of ``num_blocks`` blocks took ``seconds`` from dispatch to completion."""
        tier = _READS.get(op_type)
        if tier is None or not self.measure or num_blocks <= 0 or seconds <= 0:
            return
        a = self.alpha
        self._bytes[tier] += a * (num_blocks * self.block_bytes - self._bytes[tier])
        self._seconds[tier] += a * (seconds - self._seconds[tier])
        self.num_samples[tier] += 1

    def bps(self, tier: Medium) -> float:
        """The read rate of ``tier`` in bytes/s (> 0)."""
        if not self.measure or self.num_samples[tier] == 0:
            return self._prior[tier]  # exactly as configured
        return self._bytes[tier] / self._seconds[tier]

    def as_list(self) -> list[float]:
        """Rates in tier order (CPU, SSD, REMOTE), as ``MatchInfoReplyMsg.read_bps`` carries them."""
        return [self.bps(t) for t in CACHE_TIERS]

    def stats(self) -> dict[str, int | float]:
        """``read_bps_<tier>`` and ``read_samples_<tier>`` (ops measured; 0 = the prior) per tier."""
        out: dict[str, int | float] = {}
        for tier in CACHE_TIERS:
            name = tier.name.lower()
            out[f"read_bps_{name}"] = self.bps(tier)
            out[f"read_samples_{name}"] = self.num_samples[tier]
        return out
