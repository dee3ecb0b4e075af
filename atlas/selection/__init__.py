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

The package follows two seams: ``selectors`` (the choice) and ``record`` (the selection record,
its file and its reuse). Everything callers use is exported here (configs name
``atlas.selection.CriticalSelector``...).
"""

from atlas.selection.record import (MAX_FAILED_FRACTION, OnFailure, Selection, SelectionFailed,
                                    apply_selections, log_failures, saved_selections,
                                    select_steps, summarize, write_selection)
from atlas.selection.selectors import (CounterfactualSelector, CriticalSelector, FullSelector,
                                       HybridSelector, NonCriticalSelector, OracleSelector,
                                       PerplexitySelector, RandomSelector, ScoredSelector,
                                       Selector, build_selector, draw, num_selected)

__all__ = ["CounterfactualSelector", "CriticalSelector", "FullSelector", "HybridSelector",
           "MAX_FAILED_FRACTION", "NonCriticalSelector", "OnFailure", "OracleSelector",
           "PerplexitySelector", "RandomSelector", "ScoredSelector", "Selection",
           "SelectionFailed", "Selector", "apply_selections", "build_selector", "draw",
           "log_failures", "num_selected", "saved_selections", "select_steps", "summarize",
           "write_selection"]
