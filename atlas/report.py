"""A paper-style comparison report of a Hydra multirun, from the result files its jobs wrote.

    python train.py -m selector=critical,random ratio=0.1,0.3 seed=0,1
    python -m atlas.report logs/train/multiruns/<time>            # or: make report DIR=...
    python -m atlas.report <dir> --metric reward --out /tmp/report --no-wandb

Reads every job directory under ``<dir>`` (recursively) that holds a ``train_summary.json`` and
its ``eval/results.json``, and writes to ``--out`` (default ``<dir>/report/``):

- ``report.md``: one row per (selector, ratio) cell, one column per environment (held-in first)
  and per group average, each the mean over the cell's seeds ± their sample standard deviation,
  with its 95% interval: a bootstrap over the test tasks (from the jobs' ``steps.jsonl`` or
  ``episodes.jsonl``), and the t interval over seeds where there are >= 3; then the **paired
  differences** of each selector at each ratio against ``full``, ``random`` and ``noncritical``
  at the same ratio, and against the base model (step accuracy), with paired-bootstrap 95%
  intervals, and in words which are resolved (the interval excludes 0) and which are not; with
  step accuracy, held-in accuracy by the heuristic oracle's criterion of the test step;
- ``report.csv``: the same cells as numbers (``<column>_mean``, ``_std``, ``_low``, ``_high``);
  ``differences.csv``: the paired differences;
- ``ratio_<selector>.png``: held-in and held-out average against the ratio, with 95% error bars
  and the ``full`` selector (every step supervised) as dashed reference lines.

The metric (``--metric``) is step accuracy where every job has step-level results (the dense
measure a small run can resolve), else rollout success; ``success`` and ``reward`` can be asked.

Jobs that differ in a config-group choice other than the selector (``model=``, ``oracle=``, ...)
are never averaged together: each choice that varies across jobs becomes a column of its own.
When the jobs logged to W&B, the table and the plots go to a new W&B run (``job_type=report``,
offline unless WANDB_MODE says otherwise) under ``<out>/wandb``.

Size: reading the jobs, the table, the paired differences, the plots and the words that say
which differences are resolved are one pipeline over one set of records; split, each part would
pass the same records around.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from atlas import step_eval
from atlas.evaluation import GROUPS, read_jsonl
from atlas.stats import Ratio, Units, seed_spread

log = logging.getLogger(__name__)

METRICS = ("step_accuracy", "success", "reward")
# which file of a job holds the per-task numbers of a metric (for intervals and paired tests)
UNIT_METRICS = {"step_accuracy": "steps", "success": "episodes", "reward": "episodes"}
# the comparisons the paper makes, for each selector at each ratio
BASELINES = ("full", "random", "noncritical")
SHORT = {"held_in": "in", "held_out": "out"}
# column -> (summary section, key, scale): validation loss on every step of the held-out
# trajectories after training, and the share of training steps supervised (%)
TRAINING = {"val_loss": ("metrics", "val/loss", 1.0),
            "supervised_steps": ("selection", "train/supervised_step_fraction", 100.0)}
LABELS = {"held_in": "held-in avg", "held_out": "held-out avg", "val_loss": "val loss",
          "supervised_steps": "supervised steps (%)"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def find_jobs(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished jobs under ``root`` and the job directories that have no results.

    Args:
        root: A Hydra sweep directory (or any directory above job directories).

    Returns:
        ``(jobs, missing)``: each job is ``{"dir", "summary", "results"}`` with its
        ``eval/results.json``; ``missing`` names (relative to ``root``) the directories that look
        like jobs (``.hydra/``) but lack a summary or eval results, each with the reason.
    """
    jobs, missing = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        # Natural order (job 10 after job 9): the environments' first-seen order follows it.
        dirnames.sort(key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", d)])
        job_dir = Path(dirpath)
        if "train_summary.json" not in filenames:
            if ".hydra" in dirnames:
                missing.append(f"{job_dir.relative_to(root)} (no train_summary.json: crashed or running)")
                dirnames.clear()
            continue
        dirnames.clear()  # a job's model/, wandb/, eval/ hold no further jobs
        summary = _read_json(job_dir / "train_summary.json")
        if "duplicate_of" in summary:  # the sweep ran this job once, elsewhere
            log.info("%s: the same job as %s", job_dir.relative_to(root), summary["duplicate_of"])
            continue
        absent = [k for k in ("selector", "ratio", "seed") if k not in summary]
        if absent:
            raise ValueError(f"{job_dir / 'train_summary.json'}: no {', '.join(absent)} "
                             f"(not a train.py summary?)")
        # The job's own eval/ first: the absolute path in the summary breaks when a sweep moves.
        candidates = [job_dir / "eval" / "results.json"]
        if (summary.get("eval") or {}).get("results_file"):
            candidates.append(Path(summary["eval"]["results_file"]))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(f"{job_dir.relative_to(root)} (no eval results)")
            continue
        jobs.append({"dir": job_dir, "summary": summary, "results": _read_json(found),
                     "eval_dir": found.parent})
    return jobs, missing


def aggregate(jobs: list[dict[str, Any]], metric: str) -> tuple[list[str], dict[str, str], list[dict]]:
    """Cells of (selector, ratio, varying choices), each with mean and spread over its seeds.

    Args:
        jobs: From :func:`find_jobs`.
        metric: ``success`` or ``reward`` (percent).

    Returns:
        ``(choice_keys, columns, rows)``: the choice keys that vary across jobs; value column ->
        its group (``held_in``/``held_out``/``avg``) with environments held-in first; one row per
        cell with ``selector``, ``ratio``, the choices, ``n_seeds``, ``seeds`` and
        ``<column>_mean``/``<column>_std`` (std None below two seeds, mean None without values).
    """
    columns: dict[str, str] = {}
    for group in GROUPS:
        for job in jobs:
            source = ((job["results"].get("steps") or {}) if metric == "step_accuracy"
                      else job["results"])
            for name, env in source.get("environments", {}).items():
                if env.get("group") == group:
                    columns.setdefault(name, group)
    columns.update({g: "avg" for g in GROUPS})
    # what training did, beside what the episodes show (at small scale, often the only signal)
    columns.update({name: "training" for name in TRAINING})
    # "selector" is the row key already; any other choice that differs must split the cells,
    # and so must any other override (module.lr=..., data.limit=...) that differs
    keys = sorted({k for job in jobs for k in _choices(job["summary"])} - {"selector"})
    choice_keys = [k for k in keys if len({_choices(job["summary"]).get(k) for job in jobs}) > 1]
    if len({_other_overrides(job) for job in jobs}) > 1:
        choice_keys.append("overrides")
    cells: dict[tuple, list[dict]] = {}
    for job in jobs:
        s = job["summary"]
        ratio = 1.0 if s["selector"] == "full" else round(float(s["ratio"]), 6)  # full ignores it
        choices = tuple(_other_overrides(job) if k == "overrides"
                        else str(_choices(s).get(k, "?")) for k in choice_keys)
        cells.setdefault((s["selector"], ratio, choices), []).append(job)
    rows = []
    for (selector, ratio, choices), members in sorted(cells.items()):
        by_seed: dict[int, list[dict]] = {}
        for m in members:
            by_seed.setdefault(m["summary"]["seed"], []).append(m)
        repeated = {seed: ms for seed, ms in by_seed.items() if len(ms) > 1}
        if repeated:
            # `full` at several ratios is the same run each time: one seed, not several
            (log.info if selector == "full" else log.warning)(
                "%s ratio=%s: %d jobs share a seed and are averaged as one (%s)", selector,
                "all" if selector == "full" else ratio, sum(map(len, repeated.values())),
                ", ".join(str(m["dir"]) for ms in repeated.values() for m in ms))
        row = {"selector": selector, "ratio": ratio, **dict(zip(choice_keys, choices)),
               "n_seeds": len(by_seed), "seeds": sorted(by_seed)}
        for name, group in columns.items():
            values = ([v for m in ms if (v := _value(m, name, group, metric)) is not None]
                      for ms in by_seed.values())
            per_seed = [statistics.fmean(vs) for vs in values if vs]
            row[f"{name}_mean"] = statistics.fmean(per_seed) if per_seed else None
            row[f"{name}_std"] = statistics.stdev(per_seed) if len(per_seed) >= 2 else None
            spread = seed_spread(per_seed)
            if spread and "low" in spread:  # >= 3 seeds: the t interval of the mean over seeds
                row[f"{name}_seeds_low"], row[f"{name}_seeds_high"] = spread["low"], spread["high"]
        # the cell's per-task numbers (mean over its seeds): task-bootstrap intervals, pairing
        seeds = [ms[0] for ms in by_seed.values()]
        row["jobs"] = seeds
        row["units"] = _pool([u for m in seeds if (u := job_units(m, metric)) is not None])
        row["base_units"] = (_pool([u for m in seeds if (u := job_units(m, metric, base=True))])
                             if metric == "step_accuracy" else None)
        for name, group in columns.items():
            strata = _strata(row["units"], columns, name, group)
            if strata and row[f"{name}_mean"] is not None:
                est = Ratio(strata).interval().scaled(100)
                row[f"{name}_low"], row[f"{name}_high"] = est.low, est.high
        rows.append(row)
    return choice_keys, columns, rows


def job_units(job: dict[str, Any], metric: str, base: bool = False) -> Units | None:
    """A job's per-task numbers of ``metric``: env -> task -> (sum, count), from its
    ``steps.jsonl`` (``steps_base.jsonl``: the base model's) or ``episodes.jsonl``; None when
    the job has no such file."""
    cache = job.setdefault("units", {})
    key = (metric, base)
    if key not in cache:
        kind = UNIT_METRICS[metric]
        name = f"{kind}_base.jsonl" if base else f"{kind}.jsonl"
        path = job["eval_dir"] / name
        if not path.is_file():
            cache[key] = None
        elif kind == "steps":
            cache[key] = step_eval.units(_step_records(job, name), "correct")
        else:
            units: dict[str, dict[str, tuple[float, float]]] = {}
            for r in read_jsonl(path):
                meta = r.get("meta") or {}
                value = float(meta.get("success") if metric == "success" else meta.get("score", 0.0))
                units.setdefault(r["env"], {})[meta.get("id", r["id"])] = (value, 1.0)
            cache[key] = units
    return cache[key]


def _step_records(job: dict[str, Any], name: str = "steps.jsonl") -> list[dict] | None:
    """A job's step records (``steps.jsonl``, or the base model's ``steps_base.jsonl``), read
    once; None when the job has none."""
    records = job.setdefault("records", {})
    if name not in records:
        path = job["eval_dir"] / name
        records[name] = read_jsonl(path) if path.is_file() else None
    return records[name]


def _pool(units: list[Units]) -> Units | None:
    """Per task, the mean numerator over seeds (the tasks every seed has; same denominators)."""
    if not units:
        return None
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for env in set.intersection(*(set(u) for u in units)):
        tasks = set.intersection(*(set(u[env]) for u in units))
        out[env] = {t: (statistics.fmean(u[env][t][0] for u in units), units[0][env][t][1])
                    for t in tasks}
    return out


def _strata(units: Units | None, columns: dict[str, str], name: str, group: str) -> list | None:
    """The bootstrap strata behind one column: its environment, or its group's environments."""
    if not units or group == "training":
        return None
    envs = ([e for e, g in columns.items() if g == name] if group == "avg" else [name])
    picked = {e: units[e] for e in envs if e in units}
    return Ratio.of(picked).strata if picked else None


def differences(choice_keys: list[str], columns: dict[str, str], rows: list[dict],
                metric: str) -> list[dict[str, Any]]:
    """Paired differences with 95% paired-bootstrap intervals over the test tasks: each
    selector at each ratio against ``full``, ``random`` and ``noncritical`` at the same ratio,
    and (step accuracy) every cell against the base model. One entry per (comparison, group)."""
    def label(r):
        return "full" if r["selector"] == "full" else f"{r['selector']} {r['ratio']:g}"

    def variant(r):
        return tuple(r[k] for k in choice_keys)

    out = []
    for row in rows:
        if not row["units"]:
            continue
        against = []
        for other in rows:
            if other is row or not other["units"] or variant(other) != variant(row):
                continue
            if other["selector"] == "full" and row["selector"] != "full":
                against.append((label(other), other["units"]))
            elif (other["selector"] in BASELINES[1:] and other["selector"] != row["selector"]
                  and other["ratio"] == row["ratio"] and row["selector"] != "full"
                  # random vs noncritical once, in the paper's order (not again reversed)
                  and not (row["selector"] in BASELINES[1:]
                           and BASELINES.index(row["selector"]) > BASELINES.index(other["selector"]))):
                against.append((label(other), other["units"]))
        if row["base_units"]:
            against.append(("base model", row["base_units"]))
        for name, units in against:
            for group in GROUPS:
                envs = [e for e, g in columns.items() if g == group]
                a = {e: row["units"][e] for e in envs if e in row["units"]}
                b = {e: units[e] for e in envs if e in units}
                if not a or not b:
                    continue
                try:
                    est = Ratio.paired(a, b).interval().scaled(100)
                except ValueError as e:
                    log.warning("%s vs %s (%s): not compared: %s", label(row), name, group, e)
                    continue
                out.append({"a": label(row), "b": name, **dict(zip(choice_keys, variant(row))),
                            "group": group, "metric": metric, "value": est.value, "low": est.low,
                            "high": est.high, "resolved": est.excludes_zero()})
    return out


def format_differences(choice_keys: list[str], diffs: list[dict], metric: str) -> str:
    """The paired differences as a table, then in words: which are resolved, which are not."""
    if not diffs:
        return ""
    unit = "percentage points"
    lines = [f"## Paired differences: {metric.replace('_', ' ')} ({unit}), A − B",
             "",
             "Every job saw the same test tasks, so each comparison resamples the same tasks for "
             "both cells (95% paired-bootstrap interval over tasks, stratified by environment; "
             "cells with several seeds use the per-task mean over their seeds). **bold**: the "
             "interval excludes 0.", ""]
    extra = [k for k in choice_keys]
    header = ["A", "B", *extra, *(LABELS[g] for g in GROUPS)]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    pairs: dict[tuple, dict[str, dict]] = {}
    for d in diffs:
        pairs.setdefault((d["a"], d["b"], *(d[k] for k in extra)), {})[d["group"]] = d
    for key, by_group in pairs.items():
        cells = []
        for g in GROUPS:
            d = by_group.get(g)
            text = "–" if d is None else f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
            cells.append(f"**{text}**" if d and d["resolved"] else text)
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    resolved = [d for d in diffs if d["resolved"]]
    unresolved = [d for d in diffs if not d["resolved"]]
    lines.append("")
    if resolved:
        lines.append("**Resolved** (the interval excludes 0): " + "; ".join(
            f"{d['a']} {'>' if d['value'] > 0 else '<'} {d['b']} on {LABELS[d['group']]} "
            f"({d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}])" for d in resolved) + ".")
    else:
        lines.append("**Resolved**: none; no interval excludes 0.")
    if unresolved:
        lines.append("")
        lines.append("**Not resolved** (the interval includes 0; these cells are not ranked): "
                     + "; ".join(f"{d['a']} vs {d['b']} on {LABELS[d['group']]}"
                                 for d in unresolved) + ".")
    return "\n".join(lines) + "\n"


def _value(job: dict[str, Any], name: str, group: str, metric: str) -> float | None:
    if group == "training":
        section, key, scale = TRAINING[name]
        value = (job["summary"].get(section) or {}).get(key)
        return None if value is None else scale * float(value)
    results = job["results"].get("steps") or {} if metric == "step_accuracy" else job["results"]
    entry = results.get("averages" if group == "avg" else "environments", {}).get(name)
    value = entry.get("accuracy" if metric == "step_accuracy" else metric) if entry else None
    value = value["value"] if isinstance(value, dict) else value
    return None if value is None or math.isnan(float(value)) else float(value)


def _choices(summary: dict[str, Any]) -> dict[str, Any]:
    """A job's config-group choices, and its ``selector.granularity`` (a dimension of the
    comparison beside them: ``-m selector.granularity=step,action``)."""
    return {**(summary.get("choices") or {}), "granularity": summary.get("granularity", "step")}


def _other_overrides(job: dict[str, Any]) -> str:
    """The job's command-line overrides besides the selector, ratio, seed and group choices
    (from ``.hydra/overrides.yaml``), e.g. ``module.lr=0.001``; empty when there are none."""
    path = job["dir"] / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    from omegaconf import OmegaConf

    choices = set(job["summary"].get("choices") or {})
    keep = []
    for override in OmegaConf.load(path) or []:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in {"selector", "ratio", "seed", "selector.granularity", *choices} \
                and not key.startswith("hydra"):
            keep.append(override)
    return " ".join(sorted(keep))


def format_markdown(choice_keys: list[str], columns: dict[str, str], rows: list[dict]) -> str:
    """The cells as a Markdown table: "61.2 ± 3.4" (mean ± sample std over seeds; a bare mean
    for one seed), then "[55.0, 67.1]", the 95% task-bootstrap interval where the jobs left
    per-task results, and "(seeds: a, b)", the t interval over >= 3 seeds."""
    header = (["selector", "ratio", *choice_keys]
              + [LABELS[n] if g in ("avg", "training") else f"{n} ({SHORT[g]})"
                 for n, g in columns.items()]
              + ["seeds"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        values = []
        for name in columns:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            digits = 3 if name == "val_loss" else 1
            text = ("–" if mean is None else f"{mean:.{digits}f}" if std is None
                    else f"{mean:.{digits}f} ± {std:.{digits}f}")
            if row.get(f"{name}_low") is not None:  # task bootstrap, 95%
                text += f" [{row[f'{name}_low']:.{digits}f}, {row[f'{name}_high']:.{digits}f}]"
            if row.get(f"{name}_seeds_low") is not None:  # t interval over >= 3 seeds
                text += (f" (seeds: {row[f'{name}_seeds_low']:.{digits}f}, "
                         f"{row[f'{name}_seeds_high']:.{digits}f})")
            values.append(text)
        ratio = "all" if row["selector"] == "full" else f"{row['ratio']:g}"
        cells = [row["selector"], ratio, *(row[k] for k in choice_keys), *values, str(row["n_seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_criterion(choice_keys: list[str], rows: list[dict], group: str = "held_in"
                 ) -> list[dict[str, Any]]:
    """Per cell, step accuracy on the test steps of each heuristic-oracle criterion (the
    ``criterion`` of each ``steps.jsonl`` record): whether a selector improved the steps it
    trained on, or the others. Each entry: the cell's labels, and per criterion its steps and
    accuracy (%) with a 95% task-bootstrap interval (per-task mean over the cell's seeds)."""
    out = []
    for row in rows:
        records = [_step_records(job) for job in row["jobs"]]
        if not records or any(r is None for r in records):
            continue
        entry = {"selector": row["selector"], "ratio": row["ratio"],
                 **{k: row[k] for k in choice_keys}, "criteria": {}}
        for criterion in step_eval.CRITERIA:
            units = _pool([step_eval.units([r for r in rs if r["criterion"] == criterion],
                                           "correct", group) for rs in records])
            if not units or not any(units.values()):
                continue
            est = Ratio.of({e: u for e, u in units.items() if u}).interval().scaled(100)
            entry["criteria"][criterion] = {
                "steps": sum(int(n) for u in units.values() for _, n in u.values()),
                "value": est.value, "low": est.low, "high": est.high}
        if entry["criteria"]:
            out.append(entry)
    return out


def format_by_criterion(choice_keys: list[str], entries: list[dict[str, Any]],
                        group: str = "held_in") -> str:
    if not entries:
        return ""
    criteria = [c for c in step_eval.CRITERIA if any(c in e["criteria"] for e in entries)]
    counts = {c: {e["criteria"][c]["steps"] for e in entries if c in e["criteria"]}
              for c in criteria}
    # one suite: the step counts go in the header; cells of different suites show their own
    steps = {c: f" ({n.pop()} steps)" if len(n) == 1 else "" for c, n in counts.items()}
    lines = [f"## {LABELS[group].replace(' avg', '')} step accuracy by the criterion of the test "
             f"step (%)", "",
             "The heuristic oracle marks the test steps as it marks training steps; a cell is the "
             "accuracy on the steps of one criterion (mean over environments, per-task mean over "
             "seeds) with its 95% task-bootstrap interval. It shows whether a selector improved "
             "the steps it trained on or the others; marked categories hold few steps.", "",
             "| " + " | ".join(["selector", "ratio", *choice_keys,
                                *(f"{c}{steps[c]}" for c in criteria)]) + " |",
             "|" + "|".join("---" for _ in range(len(criteria) + 2 + len(choice_keys))) + "|"]
    for e in entries:
        cells = [(f"{v['value']:.1f} [{v['low']:.1f}, {v['high']:.1f}]"
                  + ("" if steps[c] else f" ({v['steps']} steps)")
                  if (v := e["criteria"].get(c)) else "–") for c in criteria]
        ratio = "all" if e["selector"] == "full" else f"{e['ratio']:g}"
        lines.append("| " + " | ".join([e["selector"], ratio, *(str(e[k]) for k in choice_keys),
                                        *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_ratios(choice_keys: list[str], rows: list[dict], metric: str, out: Path,
                title: str) -> list[Path]:
    """One ``ratio_<selector>.png`` per selector but ``full``: group averages against the ratio.

    Every choice combination keeps the same pair of colours on every plot, and the ``full`` cell
    of that combination is drawn in them as dashed lines, so each curve has its own baseline.
    """
    # Figure + an explicit Agg canvas rather than pyplot: no display and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = sorted({tuple(r[k] for k in choice_keys) for r in rows})
    full = {tuple(r[k] for k in choice_keys): r for r in rows if r["selector"] == "full"}
    paths = []
    for selector in sorted({r["selector"] for r in rows} - {"full"}):
        fig = Figure(figsize=(6, 4), layout="tight")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for i, variant in enumerate(variants):
            suffix = ", ".join(f"{k}={v}" for k, v in zip(choice_keys, variant))
            cells = sorted((r for r in rows if r["selector"] == selector
                            and tuple(r[k] for k in choice_keys) == variant), key=lambda r: r["ratio"])
            for j, group in enumerate(GROUPS):
                color = f"C{(2 * i + j) % 10}"
                label = LABELS[group] + (f" ({suffix})" if suffix else "")
                points = [(r["ratio"], r[f"{group}_mean"], *_error(r, group))
                          for r in cells if r[f"{group}_mean"] is not None]
                if points:
                    x, y, below, above = zip(*points)
                    err = [below, above] if any(below) or any(above) else None
                    ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, label=label)
                ref = full.get(variant, {}).get(f"{group}_mean")
                if ref is not None:
                    ax.axhline(ref, color=color, linestyle="--", linewidth=1,
                               label=f"all steps ({LABELS[group]}{', ' + suffix if suffix else ''})")
        ratios = sorted({r["ratio"] for r in rows if r["selector"] == selector})
        ax.set_xticks(ratios, [f"{x:g}" for x in ratios])  # the swept ratios, not 0.025 steps
        ax.set_xlabel("ratio of supervised steps")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{selector}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
        path = out / f"ratio_{selector}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _error(row: dict, name: str) -> tuple[float, float]:
    """Error bar below and above the mean: the 95% interval (over >= 3 seeds, else over tasks),
    else the std over seeds, else none."""
    mean = row[f"{name}_mean"]
    for kind in ("_seeds", ""):
        if row.get(f"{name}{kind}_low") is not None:
            return (max(0.0, mean - row[f"{name}{kind}_low"]), max(0.0, row[f"{name}{kind}_high"] - mean))
    std = row.get(f"{name}_std") or 0.0
    return (std, std)


def report(multirun_dir: str | Path, out: str | Path | None = None, metric: str | None = None,
           use_wandb: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and the ratio plots of a multirun; print the table.

    Args:
        multirun_dir: The sweep directory (``logs/train/multiruns/<time>``).
        out: Where the report goes; default ``<multirun_dir>/report``.
        metric: ``step_accuracy``, ``success`` or ``reward``; None: step accuracy where every
            job has step-level results, else success.
        use_wandb: Also log to W&B when the jobs did (and WANDB_MODE is not ``disabled``).

    Returns:
        ``{"markdown", "csv", "plots", "rows", "differences", "by_criterion", "missing",
        "wandb_dir", "metric"}``: the written paths, the cells as in ``report.csv`` (plus each
        cell's ``jobs`` and pooled per-task ``units``), the paired differences, held-in step
        accuracy by criterion (:func:`by_criterion`), the job directories left out, the W&B run
        directory or None, the metric.

    Raises:
        ValueError: Unknown metric, malformed JSON, or no job with eval results.
    """
    root = Path(multirun_dir).resolve()
    if metric is not None and metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not root.is_dir():
        raise ValueError(f"{multirun_dir}: not a directory")
    jobs, missing = find_jobs(root)
    for m in missing:
        log.warning("left out of the report: %s", m)
    if not jobs:
        raise ValueError(f"no finished job with eval results under {root} "
                         f"(a job needs train_summary.json and eval/results.json)")
    if metric is None:
        metric = ("step_accuracy" if all(j["results"].get("steps") for j in jobs) else "success")
    choice_keys, columns, rows = aggregate(jobs, metric)
    diffs = differences(choice_keys, columns, rows, metric)
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)

    table = format_markdown(choice_keys, columns, rows)
    text = f"# {root}: {metric} (%), {len(jobs)} jobs\n\n{table}\n"
    if diffs:
        text += "\n" + format_differences(choice_keys, diffs, metric)
        with (out / "differences.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(diffs[0]))
            writer.writeheader()
            writer.writerows(diffs)
    criteria = by_criterion(choice_keys, rows) if metric == "step_accuracy" else []
    if criteria:
        text += "\n" + format_by_criterion(choice_keys, criteria)
    if missing:
        text += "\nMissing jobs (left out): " + "; ".join(f"`{m}`" for m in missing) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    # metric is a column too, so a success CSV and a reward CSV cannot be mixed up.
    fields = (["selector", "ratio", *choice_keys, "n_seeds", "metric"]
              + [f"{n}_{stat}" for n in columns for stat in ("mean", "std")])
    fields += [f"{n}_{stat}" for n in columns for stat in ("low", "high", "seeds_low", "seeds_high")
               if any(r.get(f"{n}_{stat}") is not None for r in rows)]
    records = [{**r, "metric": metric} for r in rows]
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    plots = plot_ratios(choice_keys, rows, metric, out, f"{metric} vs ratio ({root.name})")

    wandb_dir = None
    # Checked before wandb_offline_by_default(), which would fill in "offline".
    if use_wandb and os.environ.get("WANDB_MODE") != "disabled" and any(
            "wandb" in j["summary"] for j in jobs):
        import wandb

        from atlas.utils import wandb_offline_by_default

        wandb_offline_by_default()
        # dir=out: W&B adds its own wandb/ below it, so the run lands in <out>/wandb/.
        # the jobs' project and group (older summaries lack them: train.py's defaults)
        logged = next(j["summary"]["wandb"] for j in jobs if "wandb" in j["summary"])
        run = wandb.init(project=logged.get("project", "atlas"), job_type="report",
                         group=logged.get("group") or f"train-{root.name}", dir=str(out),
                         config={"multirun_dir": str(root), "metric": metric, "jobs": len(jobs)})
        try:
            tables = {"report/table": wandb.Table(columns=fields, data=[
                [r.get(c) for c in fields] for r in records])}
            if diffs:
                tables["report/differences"] = wandb.Table(
                    columns=list(diffs[0]), data=[list(d.values()) for d in diffs])
            run.log({**tables,
                     **{f"report/{p.stem}": wandb.Image(str(p)) for p in plots}})
            wandb_dir = str(Path(run.dir).parent.resolve())
        finally:
            run.finish()
        log.info("W&B report run (%s) in %s", os.environ["WANDB_MODE"], wandb_dir)
    log.info("report in %s", out.resolve())
    return {"markdown": out / "report.md", "csv": out / "report.csv", "plots": plots,
            "rows": rows, "differences": diffs, "by_criterion": criteria, "missing": missing,
            "wandb_dir": wandb_dir,
            "metric": metric}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m atlas.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra sweep directory (logs/train/multiruns/<time>)")
    parser.add_argument("--out", help="output directory (default: <multirun_dir>/report)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="default: step_accuracy where every job has it, else success")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        report(args.multirun_dir, args.out, args.metric, use_wandb=not args.no_wandb)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
