"""The selection record and its file: one :class:`Selection` per trajectory, applied to the
trajectories (``meta["selection"]``), written as the selection file with its exports, reused from
a saved file when the same selector config made it from the same trajectories, and the failures
said loudly.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from atlas.data.trajectory import Trajectory
from atlas.utils import Choice, UserError

if TYPE_CHECKING:
    from atlas.selection.selectors import Selector

log = logging.getLogger(__name__)


class OnFailure(Choice):
    """What a run does with trajectories whose selection failed: leaves them out, or stops."""

    SKIP = "skip"
    ERROR = "error"


#: default share of trajectories whose selection may fail before a run stops
MAX_FAILED_FRACTION = 0.2


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
            out.append(selector._selection(t, selector.k(len(t.candidate_steps)), s["steps"],
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
    on_failure = OnFailure.of(on_failure, "selector.on_failure")
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
