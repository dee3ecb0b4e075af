"""A paper-style comparison report of a Hydra multirun, from the result files its jobs wrote.

    python train.py -m selector=critical,random ratio=0.1,0.3 seed=0,1
    python -m atlas.report logs/train/multiruns/<time>            # or: make report DIR=...
    python -m atlas.report <dir> --metric reward --out /tmp/report --no-wandb

Reads every job directory under ``<dir>`` (recursively) that holds a ``train_summary.json`` and
its ``eval/results.json``, and writes to ``--out`` (default ``<dir>/report/``):

- ``report.md``: one row per (selector, ratio) cell, one column per environment (held-in first)
  and per group average, each the mean over the cell's seeds ± their sample standard deviation;
- ``report.csv``: the same cells as numbers (``<column>_mean``, ``<column>_std``);
- ``ratio_<selector>.png``: held-in and held-out average against the ratio, with the ``full``
  selector (every step supervised) as dashed reference lines.

Jobs that differ in a config-group choice other than the selector (``model=``, ``oracle=``, ...)
are never averaged together: each choice that varies across jobs becomes a column of its own.
When the jobs logged to W&B, the table and the plots go to a new W&B run (``job_type=report``,
offline unless WANDB_MODE says otherwise) under ``<out>/wandb``.
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

from atlas.evaluation import GROUPS

log = logging.getLogger(__name__)

METRICS = ("success", "reward")
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
        jobs.append({"dir": job_dir, "summary": summary, "results": _read_json(found)})
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
            for name, env in job["results"].get("environments", {}).items():
                if env.get("group") == group:
                    columns.setdefault(name, group)
    columns.update({g: "avg" for g in GROUPS})
    # what training did, beside what the episodes show (at small scale, often the only signal)
    columns.update({name: "training" for name in TRAINING})
    # "selector" is the row key already; any other choice that differs must split the cells,
    # and so must any other override (module.lr=..., data.limit=...) that differs
    keys = sorted({k for job in jobs for k in job["summary"].get("choices") or {}} - {"selector"})
    choice_keys = [k for k in keys
                   if len({(job["summary"].get("choices") or {}).get(k) for job in jobs}) > 1]
    if len({_other_overrides(job) for job in jobs}) > 1:
        choice_keys.append("overrides")
    cells: dict[tuple, list[dict]] = {}
    for job in jobs:
        s = job["summary"]
        ratio = 1.0 if s["selector"] == "full" else round(float(s["ratio"]), 6)  # full ignores it
        choices = tuple(_other_overrides(job) if k == "overrides"
                        else str((s.get("choices") or {}).get(k, "?")) for k in choice_keys)
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
        rows.append(row)
    return choice_keys, columns, rows


def _value(job: dict[str, Any], name: str, group: str, metric: str) -> float | None:
    if group == "training":
        section, key, scale = TRAINING[name]
        value = (job["summary"].get(section) or {}).get(key)
        return None if value is None else scale * float(value)
    entry = job["results"].get("averages" if group == "avg" else "environments", {}).get(name)
    value = entry.get(metric) if entry else None
    return None if value is None or math.isnan(float(value)) else float(value)


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
        if key not in {"selector", "ratio", "seed", *choices} and not key.startswith("hydra"):
            keep.append(override)
    return " ".join(sorted(keep))


def format_markdown(choice_keys: list[str], columns: dict[str, str], rows: list[dict]) -> str:
    """The cells as a Markdown table: "61.2 ± 3.4" (mean ± sample std), a bare mean for one seed."""
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
            values.append("–" if mean is None else f"{mean:.{digits}f}" if std is None
                          else f"{mean:.{digits}f} ± {std:.{digits}f}")
        ratio = "all" if row["selector"] == "full" else f"{row['ratio']:g}"
        cells = [row["selector"], ratio, *(row[k] for k in choice_keys), *values, str(row["n_seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
                points = [(r["ratio"], r[f"{group}_mean"], r[f"{group}_std"] or 0.0)
                          for r in cells if r[f"{group}_mean"] is not None]
                if points:
                    x, y, err = zip(*points)
                    ax.errorbar(x, y, yerr=err if any(err) else None, color=color, marker="o",
                                capsize=3, label=label)
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


def report(multirun_dir: str | Path, out: str | Path | None = None, metric: str = "success",
           use_wandb: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and the ratio plots of a multirun; print the table.

    Args:
        multirun_dir: The sweep directory (``logs/train/multiruns/<time>``).
        out: Where the report goes; default ``<multirun_dir>/report``.
        metric: ``success`` or ``reward``.
        use_wandb: Also log to W&B when the jobs did (and WANDB_MODE is not ``disabled``).

    Returns:
        ``{"markdown", "csv", "plots", "rows", "missing", "wandb_dir"}``: the written paths, the
        cells as in ``report.csv``, the job directories left out, the W&B run directory or None.

    Raises:
        ValueError: Unknown metric, malformed JSON, or no job with eval results.
    """
    root = Path(multirun_dir).resolve()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not root.is_dir():
        raise ValueError(f"{multirun_dir}: not a directory")
    jobs, missing = find_jobs(root)
    for m in missing:
        log.warning("left out of the report: %s", m)
    if not jobs:
        raise ValueError(f"no finished job with eval results under {root} "
                         f"(a job needs train_summary.json and eval/results.json)")
    choice_keys, columns, rows = aggregate(jobs, metric)
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)

    table = format_markdown(choice_keys, columns, rows)
    text = f"# {root}: {metric} (%), {len(jobs)} jobs\n\n{table}\n"
    if missing:
        text += "\nMissing jobs (left out): " + "; ".join(f"`{m}`" for m in missing) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    # metric is a column too, so a success CSV and a reward CSV cannot be mixed up.
    fields = (["selector", "ratio", *choice_keys, "n_seeds", "metric"]
              + [f"{n}_{stat}" for n in columns for stat in ("mean", "std")])
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
            run.log({"report/table": wandb.Table(columns=fields, data=[
                        [r.get(c) for c in fields] for r in records]),
                     **{f"report/{p.stem}": wandb.Image(str(p)) for p in plots}})
            wandb_dir = str(Path(run.dir).parent.resolve())
        finally:
            run.finish()
        log.info("W&B report run (%s) in %s", os.environ["WANDB_MODE"], wandb_dir)
    log.info("report in %s", out.resolve())
    return {"markdown": out / "report.md", "csv": out / "report.csv", "plots": plots,
            "rows": rows, "missing": missing, "wandb_dir": wandb_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m atlas.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra sweep directory (logs/train/multiruns/<time>)")
    parser.add_argument("--out", help="output directory (default: <multirun_dir>/report)")
    parser.add_argument("--metric", choices=METRICS, default="success")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        report(args.multirun_dir, args.out, args.metric, use_wandb=not args.no_wandb)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
