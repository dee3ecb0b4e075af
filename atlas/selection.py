"""Step selection: which steps of each trajectory are supervised.

Every selector keeps the same number of steps per trajectory at a given ratio, so comparisons at
one ratio are fair:

    k(ratio, n) = min(n, max(1, floor(ratio * n)))

where n is the number of *candidate* steps of the trajectory: the steps its source file marks as
trainable (all of them, unless the file says otherwise, e.g. AgentGym's ``loss: false`` on a
scripted reply). "At most ``ratio`` of the steps" as in the paper, but never zero, so every
trajectory contributes one step. ``full`` ignores the ratio and keeps every candidate.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from typing import Iterable

from atlas.data.trajectory import Trajectory

log = logging.getLogger(__name__)


def num_selected(ratio: float, num_steps: int) -> int:
    """The number of steps every ratio-based selector keeps: ``min(n, max(1, floor(ratio*n)))``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if num_steps <= 0:
        return 0
    # the epsilon keeps 0.3 * 10 == 3, not 2.9999999999999996 -> 2
    return min(num_steps, max(1, math.floor(ratio * num_steps + 1e-9)))


class Selector(ABC):
    """Chooses the supervised steps of trajectories.

    Subclasses implement :meth:`choose` for one trajectory; :meth:`select` applies it to all.
    """

    name: str = "selector"

    def __init__(self, ratio: float = 1.0):
        num_selected(ratio, 1)  # validates the ratio up front, before any work
        self.ratio = ratio

    def select(self, trajectories: Iterable[Trajectory]) -> list[Trajectory]:
        """Copies of the trajectories with exactly the chosen steps selected."""
        out = []
        for t in trajectories:
            candidates = t.selected_steps
            chosen = self.choose(t, candidates, self.k(len(candidates))) if candidates else []
            if not set(chosen) <= set(candidates):
                raise RuntimeError(f"{self.name} chose non-candidate steps in trajectory {t.id}")
            out.append(t.with_selection(chosen))
        return out

    def k(self, num_candidates: int) -> int:
        return num_selected(self.ratio, num_candidates)

    @abstractmethod
    def choose(self, trajectory: Trajectory, candidates: list[int], k: int) -> list[int]:
        """Return k step indices out of ``candidates``."""


class FullSelector(Selector):
    """All candidate steps: the standard fine-tuning baseline. Ignores ``ratio``."""

    name = "full"

    def __init__(self):
        super().__init__(ratio=1.0)

    def choose(self, trajectory, candidates, k):
        return list(candidates)


class RandomSelector(Selector):
    """k random candidate steps per trajectory.

    The draw depends only on (seed, trajectory id), so it does not change when the dataset is
    shuffled, filtered or extended.
    """

    name = "random"

    def __init__(self, ratio: float = 0.3, seed: int = 0):
        super().__init__(ratio)
        self.seed = seed

    def choose(self, trajectory, candidates, k):
        rng = random.Random(f"{self.seed}:{trajectory.id}")
        return sorted(rng.sample(candidates, k))
