"""The selectors: which steps of each trajectory are supervised (``conf/selector/``), with
the step budget ``k(ratio, n)`` they all share.

Size: every selector is a short subclass of one base class, and the oracle and metric
families share their parent here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from atlas.data.trajectory import Trajectory
from atlas.selection.record import (MAX_FAILED_FRACTION, OnFailure, Selection, apply_selections,
                                    log_failures)
from atlas.utils import ConfigError

log = logging.getLogger(__name__)


def draw(seed: int, trajectory: Trajectory) -> random.Random:
    """The random source of a trajectory's choice: (seed, trajectory id), so a draw does not
    change when the dataset is shuffled, filtered or extended."""
    return random.Random(f"{seed}:{trajectory.id}")


def num_selected(ratio: float, num_steps: int) -> int:
    """The number of steps every ratio-based selector keeps: ``min(n, max(1, floor(ratio*n)))``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if num_steps <= 0:
        return 0
    # the epsilon keeps 0.3 * 10 == 3, not 2.9999999999999996 -> 2
    return min(num_steps, max(1, math.floor(ratio * num_steps + 1e-9)))


def build_selector(cfg) -> tuple["Selector", str]:
    """The selector of a ``selector`` config and its ``granularity``: which part of each chosen
    step is supervised (``step``, ``action``, ``thought``; atlas/data/masking.py), a setting of
    the masks rather than of the choice, so it is not passed to the selector."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from atlas.data.masking import Granularity

    granularity = Granularity.of(cfg.get("granularity", "step"), "selector.granularity")
    # resolved (``${oracle}``, ``${ratio}``), without the key, the config left as it is
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("granularity", None)
    return instantiate(OmegaConf.create(resolved)), granularity


class Selector:
    """Chooses the supervised steps of trajectories.

    Subclasses implement :meth:`choose` (one trajectory at a time) or override
    :meth:`selections` (all at once, e.g. to batch oracle requests).
    """

    name: str = "selector"

    def __init__(self, ratio: float = 1.0, on_failure: str = "skip",
                 max_failed_fraction: float = MAX_FAILED_FRACTION):
        num_selected(ratio, 1)  # validates the ratio up front, before any work
        on_failure = OnFailure.of(on_failure, "selector.on_failure")
        if isinstance(max_failed_fraction, bool) or not isinstance(max_failed_fraction, (int, float)) \
                or not 0.0 <= max_failed_fraction <= 1.0:
            raise ConfigError(f"selector.max_failed_fraction must be a number in [0, 1], got "
                              f"{max_failed_fraction!r}")
        self.ratio = ratio
        self.on_failure = on_failure
        self.max_failed_fraction = max_failed_fraction
        self.last_run: dict[str, Any] = {}

    def signature(self) -> dict[str, Any]:
        """What a saved selection must have been made by to be reused."""
        return {"selector": self.name, "ratio": self.ratio}

    def k(self, num_candidates: int) -> int:
        return num_selected(self.ratio, num_candidates)

    def selections(self, trajectories: Sequence[Trajectory]) -> list[Selection]:
        out = []
        for t in trajectories:
            candidates = t.candidate_steps
            k = self.k(len(candidates))
            chosen = self.choose(t, candidates, k) if candidates else []
            out.append(self._selection(t, k, chosen))
        return out

    def select(self, trajectories: Iterable[Trajectory]) -> list[Trajectory]:
        """Copies of the trajectories with exactly the chosen steps selected (failed ones left
        out, or an error under ``on_failure=error``)."""
        trajectories = list(trajectories)
        selections = self.selections(trajectories)
        self.check(selections)
        return apply_selections(trajectories, selections)

    def check(self, selections: Sequence[Selection], record: str = "the selection file") -> None:
        """Log the failed selections; raise :class:`SelectionFailed` when they are too many
        (``max_failed_fraction``) or any under ``on_failure=error``."""
        log_failures(selections, self.on_failure, self.max_failed_fraction, record)

    def choose(self, trajectory: Trajectory, candidates: list[int], k: int) -> list[int]:
        """Return at most k step indices out of ``candidates``."""
        raise NotImplementedError

    def _selection(self, t: Trajectory, k: int, steps: list[int], **fields: Any) -> Selection:
        candidates = set(t.candidate_steps)
        if not set(steps) <= candidates or len(set(steps)) != len(steps) or len(steps) > k:
            raise RuntimeError(f"{self.name} chose steps {steps} in trajectory {t.id}: "
                               f"not {k} distinct candidates out of {sorted(candidates)}")
        fields.setdefault("criteria", [None] * len(steps))
        fields.setdefault("reasons", [None] * len(steps))
        return Selection(trajectory_id=t.id, fingerprint=t.fingerprint(),
                         signature=self.signature(), k=k, steps=list(steps), **fields)


class FullSelector(Selector):
    """All candidate steps: the standard fine-tuning baseline. Ignores ``ratio``."""

    name = "full"

    def __init__(self):
        super().__init__(ratio=1.0)

    def signature(self):
        return {"selector": self.name}

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

    def signature(self):
        return {**super().signature(), "seed": self.seed}

    def choose(self, trajectory, candidates, k):
        return sorted(draw(self.seed, trajectory).sample(candidates, k))


# ---- oracle selectors ---------------------------------------------------------------------------


class OracleSelector(Selector):
    """A selector that asks an oracle (``conf/oracle/``) for each trajectory's critical steps."""

    def __init__(self, oracle, ratio: float = 0.3, on_failure: str = "skip",
                 max_failed_fraction: float = MAX_FAILED_FRACTION):
        super().__init__(ratio, on_failure, max_failed_fraction)
        self.oracle = oracle

    def signature(self):
        return {**super().signature(), **self.oracle.signature()}

    def judgements(self, trajectories: Sequence[Trajectory]) -> list:
        """The oracle's judgement of each trajectory (None for one without candidate steps:
        there is nothing to ask)."""
        asked = [t for t in trajectories if t.candidate_steps]
        candidates = [t.candidate_steps for t in asked]
        judged = iter(self.oracle.judge(asked, candidates, [self.k(len(c)) for c in candidates]))
        self.last_run = dict(self.oracle.last_run)
        return [next(judged) if t.candidate_steps else None for t in trajectories]

    def _from_judgement(self, t: Trajectory, j, steps: list[int] | None = None,
                        **fields: Any) -> Selection:
        k = self.k(len(t.candidate_steps))
        if j is None:
            return self._selection(t, k, [])
        spent = {"plan": j.plan, "subgoals": j.subgoals, "input_tokens": j.input_tokens,
                 "output_tokens": j.output_tokens, "cost_usd": j.cost_usd, "cached": j.cached}
        if not j.ok:
            return self._selection(t, k, [], status="failed", error=j.error, **spent)
        if steps is None:
            steps, fields = j.steps, {"criteria": j.criteria, "reasons": j.reasons, **fields}
        return self._selection(t, k, steps, **spent, **fields)


class CriticalSelector(OracleSelector):
    """ATLaS: the steps the oracle marks critical (at most k), with criteria and reasons.

    ``name`` renames it in records and summaries (``selector=heuristic`` is this selector with
    the rule-based oracle, named ``heuristic``).
    """

    name = "critical"

    def __init__(self, oracle, ratio: float = 0.3, on_failure: str = "skip",
                 name: str | None = None, max_failed_fraction: float = MAX_FAILED_FRACTION):
        super().__init__(oracle, ratio, on_failure, max_failed_fraction)
        self.name = name or self.name

    def selections(self, trajectories):
        return [self._from_judgement(t, j)
                for t, j in zip(trajectories, self.judgements(trajectories), strict=True)]


class NonCriticalSelector(OracleSelector):
    """k candidates the oracle did *not* mark critical, drawn from (seed, trajectory id): the
    paper's ablation. Shares the oracle's cached answers with ``critical`` at the same ratio.
    Trajectories with fewer than k unmarked candidates keep all of them."""

    name = "noncritical"

    def __init__(self, oracle, ratio: float = 0.3, seed: int = 0, on_failure: str = "skip",
                 max_failed_fraction: float = MAX_FAILED_FRACTION):
        super().__init__(oracle, ratio, on_failure, max_failed_fraction)
        self.seed = seed

    def signature(self):
        return {**super().signature(), "seed": self.seed}

    def selections(self, trajectories):
        out, short = [], 0
        for t, j in zip(trajectories, self.judgements(trajectories), strict=True):
            if j is None or not j.ok:
                out.append(self._from_judgement(t, j))
                continue
            rest = [s for s in t.candidate_steps if s not in set(j.steps)]
            k = self.k(len(t.candidate_steps))
            short += len(rest) < k
            steps = sorted(draw(self.seed, t).sample(rest, min(k, len(rest))))
            out.append(self._from_judgement(t, j, steps))
        if short:
            log.warning("noncritical: %d of %d trajectories have fewer than k steps the oracle "
                        "did not mark, and keep only those (at ratio > 0.5 with an oracle that "
                        "marks k, most do)", short, len(trajectories))
        return out


# ---- metric selectors --------------------------------------------------------------------------


class ScoredSelector(Selector):
    """Ranks steps by a per-step score (higher: more critical) and keeps the top k candidates.
    Ties are broken by a draw from (seed, trajectory id), so a metric that cannot tell steps
    apart degrades to the random selector rather than to "the first k steps". Scores are
    cached on disk when ``cacheable``.

    Args:
        ratio: See :func:`num_selected`.
        seed: Seed of the tie-breaking draw.
        cache_dir: Where ``<name>.jsonl`` score caches live (None: ``$ATLAS_CACHE_DIR/scores``).
    """

    cacheable = True

    def __init__(self, ratio: float = 0.3, seed: int = 0, cache_dir: str | None = None):
        super().__init__(ratio)
        self.seed = seed
        self.cache_dir = cache_dir

    def score_signature(self) -> dict[str, Any]:
        """What the scores depend on (the cache key, with the trajectory's fingerprint)."""
        return {"selector": self.name}

    def signature(self):
        return {**super().signature(), "seed": self.seed, **self.score_signature()}

    def compute(self, trajectories: Sequence[Trajectory]) -> list[list[float | None]]:
        """Scores of every step of every trajectory (None: cannot be scored)."""
        raise NotImplementedError

    def scores(self, trajectories: Sequence[Trajectory]) -> list[list[float | None]]:
        from atlas.oracle import cache as answers

        if not self.cacheable:
            self.last_run = {"scored": len(trajectories), "from_cache": 0}
            return self.compute(trajectories)
        cache = answers.JsonlCache(Path(self.cache_dir or answers.default_cache_dir("scores")) /
                                   f"{self.name}.jsonl")
        sig = json.dumps(self.score_signature(), sort_keys=True)
        keys = [hashlib.sha256(f"{sig}:{t.fingerprint()}".encode()).hexdigest()
                for t in trajectories]
        first = {k: t for k, t in zip(keys, trajectories)}
        scores, computed = cache.lookup(keys, lambda missing: self.compute(
            [first[k] for k in missing]))
        self.last_run = {"scored": computed, "from_cache": len(trajectories) - computed}
        return scores

    def rank(self, trajectory: Trajectory, scores: list[float | None]) -> list[int]:
        """Candidate steps, best first: highest score, unscorable last, ties by the draw."""
        candidates = trajectory.candidate_steps
        order = draw(self.seed, trajectory).sample(candidates, len(candidates))
        tiebreak = {s: i for i, s in enumerate(order)}
        return sorted(candidates, key=lambda s: (scores[s] is None, -(scores[s] or 0.0),
                                                 tiebreak[s]))

    def selections(self, trajectories):
        out = []
        for t, scores in zip(trajectories, self.scores(trajectories)):
            k = self.k(len(t.candidate_steps))
            out.append(self._selection(t, k, self.rank(t, scores)[:k], scores=scores))
        return out


class PerplexitySelector(ScoredSelector):
    """The k steps the base model finds hardest: highest mean token NLL of the step given the
    whole trajectory before it (the paper's perplexity baseline).

    Args:
        model: A ``conf/model`` entry (the model to be fine-tuned, before training).
        max_length: Tokens scored per trajectory; steps ending past it score None (ranked last).
        tools_as_text: Render tool calls into the text first, as ``data.tools_as_text`` does
            for training.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    name = "perplexity"

    def __init__(self, model: dict, ratio: float = 0.3, max_length: int = 4096,
                 device: str = "auto", seed: int = 0, cache_dir: str | None = None,
                 tools_as_text: bool = False):
        super().__init__(ratio, seed, cache_dir)
        self.model_cfg = dict(model)
        self.max_length, self.device = max_length, device
        self.tools_as_text = tools_as_text  # as training renders them (data.tools_as_text)
        # a randomly initialised model (model.config) is not worth caching scores of
        self.cacheable = bool(self.model_cfg.get("name")) and not self.model_cfg.get("config")

    def score_signature(self):
        return {"selector": self.name, "model": self.model_cfg.get("name") or "config",
                "max_length": self.max_length, **({"tools_as_text": True} if self.tools_as_text else {})}

    def compute(self, trajectories):
        import torch
        import torch.nn.functional as F
        from atlas.console import progress

        from atlas.data.masking import tokenize_steps
        from atlas.model import load_model, load_tokenizer, resolve_device

        cfg = self.model_cfg
        tokenizer = load_tokenizer(cfg.get("tokenizer") or cfg["name"])
        model = load_model(**{k: v for k, v in cfg.items() if k != "gradient_checkpointing"}).eval()
        device = resolve_device(self.device)
        model.to(device)
        out = []
        for t in progress(iterable=trajectories, desc="perplexity", unit="trajectory"):
            tok = tokenize_steps(t.as_text() if self.tools_as_text else t, tokenizer)
            ids = torch.tensor([tok.input_ids[:self.max_length]], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            # token j is predicted at position j-1
            out.append([float(nll[a - 1:b - 1].mean()) if b <= ids.shape[1] and a > 0 else None
                        for a, b in tok.step_spans])
        return out


class CounterfactualSelector(ScoredSelector):
    """Environment-grounded criticality: the k steps where a plausible wrong action, followed by
    the expert's recovery, costs the most extra turns (or breaks success) in the simulator.
    Needs trajectories from the environments' experts (``meta`` task, seed, split).

    Args:
        envs: Environment name -> environment config (``conf/env/*``).
        probes: Wrong actions tried per step (costs are averaged).
        seed: Seed of the wrong-action draws and of the tie-breaking draw.
        budget: Turn budget of the recovery (None: see :mod:`atlas.counterfactual`).
    """

    name = "counterfactual"

    def __init__(self, envs: dict, ratio: float = 0.3, probes: int = 2, seed: int = 0,
                 budget: int | None = None, cache_dir: str | None = None):
        super().__init__(ratio, seed, cache_dir)
        self.envs, self.probes, self.budget = envs, probes, budget

    def score_signature(self):
        return {"selector": self.name, "probes": self.probes, "seed": self.seed,
                "budget": self.budget}

    def compute(self, trajectories):
        from atlas.counterfactual import CounterfactualScorer

        scorer = CounterfactualScorer(self.envs, probes=self.probes, seed=self.seed,
                                      budget=self.budget)
        try:
            return scorer(trajectories)
        finally:
            scorer.close()


class HybridSelector(OracleSelector):
    """The oracle's judgement combined with a metric, k steps in all.

    Each candidate step scores ``weights[criterion]`` when the oracle marked it (0 otherwise)
    plus ``metric_weight`` times the percentile of its metric score within the trajectory (0 for
    the lowest, 1 for the highest). With the default weights (1 per criterion, metric 0.5)
    every oracle step ranks above every other step, the oracle's steps are ordered by the
    metric, and the remaining budget is filled with the steps the metric ranks highest. So
    the hybrid keeps exactly k steps even when the oracle marks fewer, and lowering a
    criterion's weight below ``metric_weight`` lets the metric overrule it.

    Args:
        oracle: The oracle (``conf/oracle/``).
        metric: A :class:`ScoredSelector` (``perplexity`` or ``counterfactual``).
        weights: Criterion in snake case (``plan_creation``, ``critical_observation``,
            ``critical_action``, ``self_correction``) -> weight; criteria not listed weigh 1.
        metric_weight: Weight of the metric percentile.
    """

    name = "hybrid"

    def __init__(self, oracle, metric: ScoredSelector, ratio: float = 0.3,
                 weights: dict[str, float] | None = None, metric_weight: float = 0.5,
                 on_failure: str = "skip", max_failed_fraction: float = MAX_FAILED_FRACTION):
        super().__init__(oracle, ratio, on_failure, max_failed_fraction)
        from atlas.oracle import CRITERIA

        known = {c.lower().replace(" ", "_") for c in CRITERIA}
        unknown = sorted(set(weights or {}) - known)
        if unknown:
            raise ValueError(f"selector.weights: unknown criteria {unknown}; expected "
                             f"{sorted(known)}")
        self.metric = metric
        self.weights = dict(weights or {})
        self.metric_weight = metric_weight

    def signature(self):
        return {**super().signature(), "metric": self.metric.score_signature(),
                "weights": dict(sorted(self.weights.items())), "metric_weight": self.metric_weight}

    def weight(self, criterion: str) -> float:
        return float(self.weights.get(criterion.lower().replace(" ", "_"), 1.0))

    def selections(self, trajectories):
        judgements = self.judgements(trajectories)
        metric = self.metric.scores(trajectories)
        out = []
        for t, j, scores in zip(trajectories, judgements, metric, strict=True):
            if j is None or not j.ok:
                out.append(self._from_judgement(t, j))
                continue
            candidates = t.candidate_steps
            k = self.k(len(candidates))
            marked = dict(zip(j.steps, zip(j.criteria, j.reasons)))
            order = sorted(candidates, key=lambda s: (scores[s] is not None, scores[s] or 0.0))
            pct = {s: i / max(1, len(order) - 1) for i, s in enumerate(order)}
            total = {s: (self.weight(marked[s][0]) if s in marked else 0.0)
                     + self.metric_weight * pct[s] for s in candidates}
            steps = sorted(candidates, key=lambda s: (-total[s], s))[:k]
            out.append(self._from_judgement(
                t, j, steps, scores=[total.get(s) for s in range(t.num_steps)],
                criteria=[marked[s][0] if s in marked else None for s in steps],
                reasons=[marked[s][1] if s in marked else f"metric percentile {pct[s]:.2f}"
                         for s in steps]))
        return out
