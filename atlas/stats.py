"""Uncertainty of every number atlas compares: Wilson intervals for success rates, and a
stratified cluster bootstrap for rewards, step accuracies and NLL, alone or paired.

Steps of one trajectory are not independent (a model that misreads the task gets most of its
steps wrong), so the bootstrap resamples *tasks* (the clusters), within each environment (the
strata): an environment keeps its number of tasks in every replicate, and a group average
(held-in, held-out) is the mean of its environments' values, as the paper averages them.

A statistic is a ratio of sums over tasks: per task a numerator and a denominator (correct
steps and scored steps; summed NLL and scored steps; success and 1). A paired difference between
two jobs that saw the same tasks resamples the *same* tasks for both, which removes the
task-to-task variance the two share.

    >>> wilson(5, 10)                                   # (0.2366..., 0.7634...)
    >>> Ratio.of({"babyai": {"t1": (3, 4), "t2": (1, 5)}}).interval()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95
BOOTSTRAP_REPLICATES = 2000


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (scipy's), as fractions in [0, 1].

    Unlike the normal approximation it is never empty at 0/n or n/n: 0 successes in 10 trials
    still leave up to 27.8% at 95%.
    """
    if n <= 0:
        return (math.nan, math.nan)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence,
                                                          method="wilson")
    return (float(ci.low), float(ci.high))


# per stratum (environment): task id -> (numerator, denominator)
Units = Mapping[str, Mapping[str, tuple[float, float]]]


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its interval (same scale as the statistic)."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def scaled(self, factor: float) -> "Estimate":
        return Estimate(self.value * factor, self.low * factor, self.high * factor)

    def to_json(self, digits: int = 4) -> dict[str, float]:
        return {"value": round(self.value, digits), "low": round(self.low, digits),
                "high": round(self.high, digits)}

    def __format__(self, spec: str) -> str:
        spec = spec or ".1f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


class Ratio:
    """Mean over strata of sum(numerator) / sum(denominator) over each stratum's tasks.

    Args:
        strata: One ``(tasks, 2)`` array per stratum: numerator, denominator of each task. For a
            paired difference, ``(tasks, 3)``: numerator of A, numerator of B, shared denominator.
    """

    def __init__(self, strata: list[np.ndarray]):
        strata = [np.asarray(s, dtype=float) for s in strata]
        self.strata = [s for s in strata if len(s) and s[:, -1].sum() > 0]
        if not self.strata:
            raise ValueError("no stratum with a non-zero denominator")

    @classmethod
    def of(cls, units: Units) -> "Ratio":
        return cls([np.array([units[env][t] for t in sorted(units[env])]).reshape(-1, 2)
                    for env in sorted(units)])

    @classmethod
    def paired(cls, a: Units, b: Units) -> "Ratio":
        """A - B over the tasks both have, per stratum (the denominators must agree)."""
        strata = []
        for env in sorted(set(a) & set(b)):
            common = sorted(set(a[env]) & set(b[env]))
            rows = []
            for t in common:
                (na, da), (nb, db) = a[env][t], b[env][t]
                if not math.isclose(da, db):
                    raise ValueError(f"{env}/{t}: the two jobs scored {da:g} and {db:g} units; "
                                     f"a paired comparison needs the same steps")
                rows.append((na, nb, da))
            strata.append(np.array(rows, dtype=float).reshape(-1, 3))
        return cls(strata)

    @staticmethod
    def _value(sums: np.ndarray) -> np.ndarray:
        """sums: (..., 2 or 3) summed columns -> the stratum's value."""
        num = sums[..., 0] - (sums[..., 1] if sums.shape[-1] == 3 else 0.0)
        return num / sums[..., -1]

    def value(self) -> float:
        return float(np.mean([self._value(s.sum(axis=0)) for s in self.strata]))

    def interval(self, confidence: float = CONFIDENCE, replicates: int = BOOTSTRAP_REPLICATES,
                 seed: int = 0) -> Estimate:
        """Percentile bootstrap over tasks, stratified by environment (deterministic by seed).

        A replicate whose resampled denominator is 0 in some stratum (only possible when some
        tasks have a zero denominator) takes that stratum's point value.
        """
        rng = np.random.default_rng(seed)
        values = np.zeros(replicates)
        for s in self.strata:
            idx = rng.integers(0, len(s), size=(replicates, len(s)))
            sums = s[idx].sum(axis=1)  # (replicates, columns)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = self._value(sums)
            values += np.where(sums[:, -1] > 0, v, self._value(s.sum(axis=0)))
        values /= len(self.strata)
        alpha = (1 - confidence) / 2
        low, high = np.quantile(values, [alpha, 1 - alpha])
        return Estimate(self.value(), float(low), float(high))


def seed_spread(values: list[float], confidence: float = CONFIDENCE) -> dict[str, float] | None:
    """Mean, sample std and (with >= 3 seeds) the t interval of the mean over seeds."""
    if not values:
        return None
    from scipy.stats import t as student_t

    out = {"mean": float(np.mean(values)), "n": len(values)}
    if len(values) >= 2:
        out["std"] = float(np.std(values, ddof=1))
    if len(values) >= 3:
        half = student_t.ppf((1 + confidence) / 2, len(values) - 1) * out["std"] / math.sqrt(len(values))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out
