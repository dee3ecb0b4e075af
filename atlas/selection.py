"""Step selection: which steps of each trajectory are supervised.

Every ratio-based selector keeps the same number of steps per trajectory at a given ratio, so
comparisons at one ratio are fair:

    k(ratio, n) = min(n, max(1, floor(ratio * n)))

where n is the number of *candidate* steps of the trajectory: the steps its source file marks as
trainable (all of them, unless the file says otherwise, e.g. AgentGym's ``loss: false`` on a
scripted reply). "At most ``ratio`` of the steps" as in the paper, but never zero, so every
trajectory contributes one step.

Selectors (``conf/selector/``):

- ``full``: every candidate (standard fine-tuning; ignores the ratio).
- ``random``: k random candidates, drawn from (seed, trajectory id).
- ``critical``: the oracle's critical steps (ATLaS). The oracle is asked for *at most* k, as in
  the paper, so it may keep fewer; ``heuristic`` is ``critical`` with the rule-based oracle.
- ``noncritical``: k candidates the oracle did not choose (the paper's ablation).
- ``perplexity``: the k steps with the highest mean token NLL under the base model.
- ``counterfactual``: the k steps where departing from the expert costs the most in the
  environment's simulator (see :mod:`atlas.counterfactual`).
- ``hybrid``: the oracle's steps first (weighted by criterion), the rest ranked by a metric
  selector's scores, k in all (see :class:`HybridSelector`).

A selector returns one :class:`Selection` per trajectory; :func:`apply_selections` turns them into
trajectories whose ``selected`` flags are the choice and whose ``meta["selection"]`` records it
(steps, criteria, reasons, plan, oracle, model, prompt version, tokens). That is the selection
file ``select.py`` and ``train.py`` write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from atlas.data.trajectory import Trajectory
from atlas.utils import ConfigError, UserError

log = logging.getLogger(__name__)

ON_FAILURE = ("skip", "error")
#: default share of trajectories whose selection may fail before a run stops
MAX_FAILED_FRACTION = 0.2


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


@dataclass
class Selection:
    """One trajectory's selection, as recorded in ``meta["selection"]`` of the selection file.

    Attributes:
        trajectory_id: The trajectory.
        fingerprint: :meth:`Trajectory.fingerprint` of the trajectory selected from; a saved
            selection is reused only for the same content.
        signature: What produced it (selector, ratio, seed, oracle, model, prompt version...).
        k: The step budget k(ratio, n).
        steps: Chosen step indices, in the order the selector ranked them.
        criteria / reasons: Per chosen step (None where the selector gives none).
        status: ``ok`` or ``failed`` (the oracle gave no valid answer; ``error`` says why).
        plan / subgoals: The oracle's summary of the trajectory.
        scores: Per-step scores of metric selectors (higher: more critical).
        input_tokens / output_tokens / cost_usd: What the oracle spent on it.
        cached: The oracle answer came from the cache in this run.
    """

    trajectory_id: str
    fingerprint: str
    signature: dict[str, Any]
    k: int
    steps: list[int]
    criteria: list[str | None] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    plan: str | None = None
    subgoals: list[str] = field(default_factory=list)
    scores: list[float | None] | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_selections(trajectories: Sequence[Trajectory], selections: Sequence[Selection],
                     include_failed: bool = False) -> list[Trajectory]:
    """Trajectories whose selected steps are the selections', each recorded in
    ``meta["selection"]``. Failed selections are left out unless ``include_failed`` (then with
    no step selected), so nothing is ever trained on a substitute choice."""
    out = []
    for t, s in zip(trajectories, selections, strict=True):
        if t.id != s.trajectory_id:
            raise ValueError(f"selection of {s.trajectory_id} applied to trajectory {t.id}")
        if not s.ok and not include_failed:
            continue
        chosen = t.with_selection(s.steps, criteria={k: c for k, c in zip(s.steps, s.criteria) if c},
                                  reasons={k: r for k, r in zip(s.steps, s.reasons) if r})
        chosen.meta["selection"] = s.to_json()
        out.append(chosen)
    return out


def saved_selections(trajectories: Sequence[Trajectory], saved: Sequence[Trajectory],
                     selector: "Selector") -> tuple[list[Selection] | None, str]:
    """The selections of a saved selection file, when it holds a valid selection made by this
    selector config for each of these trajectories as they are now; else (None, why not).

    Reused selections count as cached: nothing is paid for them in this run. A file with failed
    selections is not reused, so selecting again retries them (the answers already paid for
    come from the oracle's cache)."""
    by_id = {t.id: t for t in saved}
    signature = selector.signature()
    out = []
    for t in trajectories:
        record = by_id.get(t.id)
        if record is None:
            return None, f"trajectory {t.id} is not in it"
        s = record.meta.get("selection")
        if not isinstance(s, dict):
            return None, f"trajectory {t.id} has no meta.selection (not a selection file?)"
        if s.get("signature") != signature:
            return None, f"it was made by {s.get('signature')}, not {signature}"
        if s.get("fingerprint") != t.fingerprint():
            return None, f"trajectory {t.id} has changed since"
        if s.get("status") != "ok":
            return None, f"trajectory {t.id} has a failed selection ({s.get('error')})"
        recorded = {k: v for k, v in s.items() if k in Selection.__dataclass_fields__ and k not in
                    ("trajectory_id", "fingerprint", "signature", "k", "steps", "cached")}
        try:  # the same checks as a fresh choice: candidates only, at most k
            out.append(selector._selection(t, selector.k(len(t.selected_steps)), s["steps"],
                                           cached=True, **recorded))
        except (RuntimeError, TypeError) as e:
            return None, f"trajectory {t.id}: {e}"
    return out, ""


class SelectionFailed(UserError, RuntimeError):
    """Too many trajectories have no valid selection (the oracle's answers failed)."""


def log_failures(selections: Sequence[Selection], on_failure: str = "skip",
                 max_failed_fraction: float = 1.0, record: str = "the selection file") -> None:
    """Say loudly which trajectories have no valid selection. Raise :class:`SelectionFailed`
    under ``on_failure=error``, or when more than ``max_failed_fraction`` of them failed."""
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"selector.on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    failed = [s for s in selections if not s.ok]
    if not failed:
        return
    msg = (f"the oracle's answers failed for {len(failed)} of {len(selections)} trajectories, "
           f"e.g. {failed[0].trajectory_id}: {failed[0].error}")
    retry = "answers already received are cached: run again to retry only the failed ones"
    if on_failure == "error":
        raise SelectionFailed(f"{msg} (selector.on_failure=error); see {record}; {retry}")
    if len(failed) > max_failed_fraction * len(selections):
        raise SelectionFailed(f"{msg}: more than selector.max_failed_fraction="
                              f"{max_failed_fraction}; see {record}; {retry}")
    log.error("%s. They are left out of training (selector.on_failure=skip) and recorded with "
              "status 'failed' in %s.", msg, record)


def build_selector(cfg) -> tuple["Selector", str]:
    """The selector of a ``selector`` config and its ``granularity``: which part of each chosen
    step is supervised (``step``, ``action``, ``thought``; atlas/data/masking.py), a setting of
    the masks rather than of the choice, so it is not passed to the selector."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from atlas.data.masking import GRANULARITIES

    granularity = cfg.get("granularity", "step")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"selector.granularity must be one of {', '.join(GRANULARITIES)}, "
                          f"got {granularity!r}")
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
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"selector.on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
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
            candidates = t.selected_steps
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
        candidates = set(t.selected_steps)
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
        asked = [t for t in trajectories if t.selected_steps]
        candidates = [t.selected_steps for t in asked]
        judged = iter(self.oracle.judge(asked, candidates, [self.k(len(c)) for c in candidates]))
        self.last_run = dict(self.oracle.last_run)
        return [next(judged) if t.selected_steps else None for t in trajectories]

    def _from_judgement(self, t: Trajectory, j, steps: list[int] | None = None,
                        **fields: Any) -> Selection:
        k = self.k(len(t.selected_steps))
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
            rest = [s for s in t.selected_steps if s not in set(j.steps)]
            k = self.k(len(t.selected_steps))
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
        from atlas.oracle import JsonlCache, default_cache_dir

        if not self.cacheable:
            self.last_run = {"scored": len(trajectories), "from_cache": 0}
            return self.compute(trajectories)
        cache = JsonlCache(Path(self.cache_dir or default_cache_dir("scores")) /
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
        candidates = trajectory.selected_steps
        order = draw(self.seed, trajectory).sample(candidates, len(candidates))
        tiebreak = {s: i for i, s in enumerate(order)}
        return sorted(candidates, key=lambda s: (scores[s] is None, -(scores[s] or 0.0),
                                                 tiebreak[s]))

    def selections(self, trajectories):
        out = []
        for t, scores in zip(trajectories, self.scores(trajectories)):
            k = self.k(len(t.selected_steps))
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
            candidates = t.selected_steps
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


# ---- the selection step of a job ---------------------------------------------------------------


def select_steps(selector: Selector, trajectories: Sequence[Trajectory],
                 selection_file: str | None = None) -> list[Selection]:
    """Selections for ``trajectories``: reused from ``selection_file`` when it was made by this
    selector config from the same trajectories, else computed."""
    if selection_file:
        from atlas.data.formats import read_trajectories

        saved, why = saved_selections(trajectories, read_trajectories(selection_file), selector)
        if saved is not None:
            log.info("reusing the selection in %s (%d trajectories)", selection_file, len(saved))
            return saved
        log.warning("not reusing %s: %s; selecting again", selection_file, why)
    return selector.selections(trajectories)


def summarize(selections: Sequence[Selection]) -> dict[str, Any]:
    """Counts and costs of a selection (written to the summaries and logged to W&B)."""
    ok = [s for s in selections if s.ok]
    criteria: dict[str, int] = {}
    for s in ok:
        for c in s.criteria:
            if c:
                criteria[c] = criteria.get(c, 0) + 1
    return {
        "trajectories": len(selections), "failed": len(selections) - len(ok),
        "steps_selected": sum(len(s.steps) for s in ok),
        "steps_budget": sum(s.k for s in ok),
        "criteria": dict(sorted(criteria.items())),
        "oracle_from_cache": sum(s.cached for s in selections),
        "input_tokens": sum(s.input_tokens for s in selections if not s.cached),
        "output_tokens": sum(s.output_tokens for s in selections if not s.cached),
        "cost_usd": round(sum(s.cost_usd for s in selections if not s.cached), 6),
    }


def write_selection(out_dir: str | Path, trajectories: Sequence[Trajectory],
                    selections: Sequence[Selection]) -> dict[str, str]:
    """The selection file and its exports in ``out_dir``; returns {kind: path}.

    - ``selection.jsonl``: atlas format, every trajectory with the chosen steps selected and
      ``meta.selection`` (failed ones too, with no step selected and their error);
    - ``selection.agentgym.jsonl``: AgentGym/AgentTraj records, ``loss`` true on chosen turns;
    - ``selection.openai.jsonl``: OpenAI fine-tuning JSONL, ``weight`` 1 on chosen turns.
    The exports hold only trajectories with a valid selection.
    """
    from atlas.data.formats import write_trajectories

    out = Path(out_dir)
    everything = apply_selections(trajectories, selections, include_failed=True)
    chosen = [t for t in everything if t.meta["selection"]["status"] == "ok"]
    paths = {"selection": write_trajectories(out / "selection.jsonl", everything),
             "agentgym": write_trajectories(out / "selection.agentgym.jsonl", chosen, "agentgym"),
             "openai": write_trajectories(out / "selection.openai.jsonl", chosen, "openai")}
    return {k: str(p.resolve()) for k, p in paths.items()}


def run(cfg) -> dict[str, Any]:
    """The ``select.py`` job: load, split like ``train.py``, select, write the selection files."""
    from atlas.data.datamodule import load_trajectories, split_trajectories
    from atlas.utils import atomic_write

    if cfg.split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {cfg.split!r}")
    d = cfg.data
    trajectories = load_trajectories(d.files, format=d.format, env=d.env, limit=d.limit)
    if cfg.get("eval") is not None:  # action_format=tools: as train.py sees them
        from atlas.evaluation import in_action_format

        trajectories = in_action_format(trajectories, cfg.eval)
    if cfg.split == "train":
        trajectories, _ = split_trajectories(trajectories, d.val_fraction)
    selector, _ = build_selector(cfg.selector)
    selections = selector.selections(trajectories)
    out = Path(cfg.paths.output_dir)
    files = write_selection(out, trajectories, selections)
    summary = {"selector": selector.signature(), "split": cfg.split, **summarize(selections),
               "oracle_run": selector.last_run, "files": files}
    atomic_write(out / "selection_summary.json", json.dumps(summary, indent=2))
    s = summary
    log.info("%s: %d trajectories, %d steps selected (budget %d), %d failed; criteria %s",
             selector.name, s["trajectories"], s["steps_selected"], s["steps_budget"],
             s["failed"], s["criteria"] or "-")
    log.info("selection written to %s", files["selection"])
    selector.check(selections, str(out / "selection_summary.json"))
    return summary
