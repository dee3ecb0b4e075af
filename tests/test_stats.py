"""Intervals (atlas/stats.py) against known values and their nominal coverage."""

from __future__ import annotations

import numpy as np
import pytest

from atlas.stats import Ratio, seed_spread, wilson


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.27753),   # never an empty interval at 0/n
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 2, 0.09453, 0.90547),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_of_no_trials_is_undefined():
    assert all(np.isnan(wilson(0, 0)))


def _clustered(rng, tasks: int, p_task: np.ndarray):
    """Per task: 2-12 steps, each correct with the task's own probability (clustered)."""
    steps = rng.integers(2, 13, size=tasks)
    correct = rng.binomial(steps, p_task)
    return {f"t{i}": (float(c), float(s)) for i, (c, s) in enumerate(zip(correct, steps))}


def test_task_bootstrap_covers_the_true_accuracy_at_about_the_nominal_rate():
    """Steps within a task are correlated (each task has its own difficulty); the interval that
    resamples tasks must still cover the population accuracy ~95% of the time."""
    rng = np.random.default_rng(1)
    # population: task difficulty ~ Beta(2, 3) -> step-weighted accuracy = E[p] = 0.4 (steps are
    # independent of p), for two environments averaged: (0.4 + 0.7) / 2
    truth = (0.4 + 0.7) / 2
    covered, trials = 0, 300
    for _ in range(trials):
        units = {"a": _clustered(rng, 30, rng.beta(2, 3, 30)),
                 "b": _clustered(rng, 30, rng.beta(7, 3, 30))}
        est = Ratio.of(units).interval(replicates=1000, seed=int(rng.integers(1 << 30)))
        covered += est.low <= truth <= est.high
    assert 0.90 <= covered / trials <= 0.99, covered / trials


def test_step_level_interval_would_be_too_narrow():
    """The reason to resample tasks: treating correlated steps as independent understates the
    spread. Here the task bootstrap is clearly wider than a binomial interval over steps."""
    rng = np.random.default_rng(2)
    units = {"a": _clustered(rng, 20, rng.beta(0.5, 0.5, 20))}  # tasks all-or-nothing-ish
    est = Ratio.of(units).interval()
    k = sum(c for c, _ in units["a"].values())
    n = sum(s for _, s in units["a"].values())
    lo, hi = wilson(int(k), int(n))
    assert est.high - est.low > 1.3 * (hi - lo)


def test_paired_difference():
    rng = np.random.default_rng(3)
    p = rng.beta(2, 2, 40)
    a = {"env": _clustered(rng, 40, p)}
    # identical jobs: exactly no difference, and the interval says so
    same = Ratio.paired(a, a).interval()
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    # B = A with one more correct step on half the tasks: a +difference that pairing resolves
    b = {"env": {t: (min(c + (i % 2), s), s) for i, (t, (c, s)) in enumerate(a["env"].items())}}
    diff = Ratio.paired(b, a).interval()
    assert diff.value > 0 and diff.excludes_zero()
    # unpaired, the two intervals overlap: only pairing resolves it
    ia, ib = Ratio.of(a).interval(), Ratio.of(b).interval()
    assert ia.high > ib.low
    # only the tasks both jobs have count; scored steps must agree
    with pytest.raises(ValueError, match="same steps"):
        Ratio.paired({"env": {"t0": (1.0, 3.0)}}, {"env": {"t0": (1.0, 4.0)}})


def test_seed_spread():
    assert seed_spread([]) is None
    assert seed_spread([2.0]) == {"mean": 2.0, "n": 1}
    two = seed_spread([1.0, 3.0])
    assert two["std"] == pytest.approx(np.sqrt(2)) and "low" not in two
    three = seed_spread([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.3027; std 1; half width 4.3027 / sqrt(3)
    assert three["high"] - three["mean"] == pytest.approx(4.3027 / np.sqrt(3), abs=1e-3)
