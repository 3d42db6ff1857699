"""The HF engine's cost check: restore a prefix only when loading it beats recomputing it.

flexkv's ``get_match_info`` says how a matched prefix splits over the tiers (CPU prefix, then SSD,
then remote) and estimates its load time from the server's measured read rates (``MatchInfo``). The
engine knows its own compute: :class:`PrefillCostModel` fits the time of its prefills. Per prompt,
:class:`CostCheck` compares the estimated time to the first token of three choices and takes the
fastest (ties go to restoring more):

* ``ALL``: load everything matched, compute the rest;
* ``CPU_PREFIX``: load only the CPU-resident prefix, recompute the SSD/remote part and the rest
  (offered when the match reaches below the CPU tier and the CPU tier holds part of it);
* ``RECOMPUTE``: load nothing.

Before the model has seen enough prefills (or after an ill-posed fit) it says ``ALL``, i.e. what the
engine did before the check existed. The server only measures a tier's rate when something reads it,
so a tier judged slow would never be measured again: one declined load (any tier, the CPU tier
too) in ``explore_every`` is restored anyway, and its ops refresh the rate. Engine process only.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools

import numpy as np

from flexkv.types import MatchInfo

OUTLIER = 3.0  # a sample this many times slower (or faster) than the fit is left out of the refit


class RestoreChoice(enum.Enum):
    """What the cost check decided for one prompt's matched prefix."""

    ALL = "all"  # restore everything flexkv matched
    CPU_PREFIX = "cpu_prefix"  # restore the CPU-resident prefix, recompute the SSD/remote part
    RECOMPUTE = "recompute"  # restore nothing


@dataclasses.dataclass(frozen=True)
class CostDecision:
    """A choice, why (the estimates in words), and the estimated TTFT of each option weighed (s)."""

    choice: RestoreChoice
    reason: str
    estimates_s: dict[RestoreChoice, float] = dataclasses.field(default_factory=dict)


class PrefillCostModel:
    """Seconds one prefill forward takes to compute ``s`` tokens after ``p`` cached ones:
    ``t(p, s) = c0 + c1 * s + c2 * s * (p + s / 2)`` (fixed cost, per-token work, attention over the
    context), coefficients >= 0, fitted to the last ``window`` observed forwards by least squares on
    relative error (a 30 ms prefill and a 1.4 s one count alike). ``fixed(...)`` gives a known model."""

    def __init__(self, window: int = 64, min_samples: int = 3) -> None:
        self.min_samples = min_samples
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=window)
        self._coef: np.ndarray | None = None
        self._fixed = False

    @classmethod
    def fixed(cls, c0: float, c1: float, c2: float = 0.0) -> PrefillCostModel:
        """A model with known coefficients that observations never change."""
        if min(c0, c1, c2) < 0 or c1 + c2 <= 0:
            raise ValueError(f"coefficients must be >= 0 with c1 + c2 > 0, got {(c0, c1, c2)}")
        model = cls()
        model._coef, model._fixed = np.array([c0, c1, c2], dtype=np.float64), True
        return model

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def samples(self) -> list[tuple[int, int, float]]:
        """The observed forwards the fit uses: (cached tokens, computed tokens, seconds), oldest first."""
        return list(self._samples)

    def observe(self, num_cached: int, num_computed: int, seconds: float) -> None:
        """One forward computed ``num_computed`` tokens after ``num_cached`` in ``seconds``."""
        if self._fixed or num_computed <= 0 or not seconds > 0:
            return
        self._samples.append((num_cached, num_computed, seconds))
        self._coef = None  # refit on the next prediction

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(c0, c1, c2), or None while there is no usable fit."""
        if self._coef is None and not self._fixed:
            self._coef = self._fit()
        if self._coef is None or not self._coef[1] + self._coef[2] > 0:
            return None
        c0, c1, c2 = self._coef.tolist()
        return c0, c1, c2

    @property
    def ready(self) -> bool:
        return self.coefficients is not None

    def predict(self, num_cached: int, num_computed: int) -> float:
        """Estimated seconds of one forward; ValueError unless :attr:`ready`."""
        coef = self.coefficients
        if coef is None:
            raise ValueError("no prefill cost estimate yet")
        if num_computed <= 0:
            return 0.0
        p, s = float(num_cached), float(num_computed)
        return coef[0] + coef[1] * s + coef[2] * s * (p + s / 2)

    def _fit(self) -> np.ndarray | None:
        """Non-negative least squares over the three terms, then once more without the samples more
        than ``OUTLIER`` x off the first fit (a forward whose process was descheduled, a cold first run)."""
        if len(self._samples) < self.min_samples or len({s for _, s, _ in self._samples}) < 2:
            return None
        data = np.array(self._samples, dtype=np.float64)
        coef = _nnls_fit(data)
        if coef is None:
            return None
        predicted = _features(data) @ coef
        ratio = data[:, 2] / np.maximum(predicted, 1e-12)
        keep = data[(ratio < OUTLIER) & (ratio > 1 / OUTLIER)]
        if len(keep) < len(data) and len(keep) >= self.min_samples and len(set(keep[:, 1].tolist())) >= 2:
            return _nnls_fit(keep)
        return coef


def _features(data: np.ndarray) -> np.ndarray:
    """Columns 1, s, s (p + s/2) of samples (p, s, seconds)."""
    p, s = data[:, 0], data[:, 1]
    return np.stack([np.ones_like(s), s, s * (p + s / 2)], axis=1)


def _nnls_fit(data: np.ndarray) -> np.ndarray | None:
    """Coefficients >= 0 minimising the relative error over every subset of the three terms (7 tiny
    solves; a 30 ms and a 1.4 s prefill count alike); None if no subset has them all >= 0."""
    t = data[:, 2]
    features = _features(data) / t[:, None]
    target = np.ones_like(t)
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    best: tuple[float, np.ndarray] | None = None
    for size in (1, 2, 3):
        for cols in itertools.combinations(range(3), size):
            sol, *_ = np.linalg.lstsq(features[:, cols] / scale[list(cols)], target, rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(3)
            coef[list(cols)] = sol / scale[list(cols)]
            residual = float(np.sum((features @ coef - target) ** 2))
            if best is None or residual < best[0] - 1e-12:
                best = (residual, coef)
    return best[1] if best is not None else None


class CostCheck:
    """Decides, per prompt, how much of flexkv's match to restore (see the module docstring).

    ``model``: the engine's prefill cost (default: learnt from the engine's own prefills).
    ``explore_every``: restore one declined load in this many anyway (0: never), so the server keeps
    measuring the tiers (a rate measured low once would otherwise never be measured again)."""

    def __init__(self, model: PrefillCostModel | None = None, explore_every: int = 32) -> None:
        if explore_every < 0:
            raise ValueError(f"explore_every must be >= 0, got {explore_every}")
        self.model = model if model is not None else PrefillCostModel()
        self.explore_every = explore_every
        self.num_declined = 0  # lower-tier loads declined so far (exploration counts them)

    def decide(self, info: MatchInfo, num_prompt_tokens: int) -> CostDecision:
        """The choice for a prompt of ``num_prompt_tokens`` tokens whose cached prefix is ``info``."""
        if not self.model.ready:
            return CostDecision(RestoreChoice.ALL, f"no prefill cost estimate yet ({self.model.num_samples} "
                                "prefills seen)")
        n, m = num_prompt_tokens, info.num_tokens
        est = {RestoreChoice.ALL: info.load_s + self.model.predict(m, n - m)}
        lower = info.num_ssd_blocks + info.num_remote_blocks
        cpu = info.num_cpu_tokens
        if lower and 0 < cpu < m:
            est[RestoreChoice.CPU_PREFIX] = info.cpu_load_s + self.model.predict(cpu, n - cpu)
        est[RestoreChoice.RECOMPUTE] = self.model.predict(0, n)
        choice = min(est, key=lambda c: est[c])  # dict order breaks ties: restoring more first
        words = ", ".join(f"{c.value} {1e3 * v:.1f} ms" for c, v in est.items())
        reason = (f"estimated TTFT: {words} (load {1e3 * info.load_s:.1f} ms: {info.num_cpu_blocks} CPU / "
                  f"{info.num_ssd_blocks} SSD / {info.num_remote_blocks} remote blocks)")
        if choice is not RestoreChoice.ALL:  # a declined CPU load too: its rate must be measured again
            self.num_declined += 1
            if self.explore_every and self.num_declined % self.explore_every == 0:
                return CostDecision(RestoreChoice.ALL, f"exploring (refreshes the tiers' read rates); {reason}", est)
        return CostDecision(choice, reason, est)
