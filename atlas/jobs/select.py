"""The select job (``select.py``, ``conf/select.yaml``): expert trajectories -> selection (selector
+ oracle + ratio; oracle answers cached) -> the selection file and its exports, split like
``train.py`` splits them, so that ``train.py selection_file=...`` reuses it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from atlas.data.datamodule import load_trajectories, split_trajectories
from atlas.jobs import job
from atlas.selection import build_selector, summarize, write_selection
from atlas.utils import atomic_write

log = logging.getLogger(__name__)


def select(cfg: DictConfig) -> dict[str, Any]:
    """Run the select job; returns its summary (also ``selection_summary.json``)."""
    with job(cfg):
        if cfg.split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all', got {cfg.split!r}")
        # 1. expert trajectories, in the agent's action format, split as train.py splits them
        d = cfg.data
        trajectories = load_trajectories(d.files, format=d.format, env=d.env, limit=d.limit,
                                         tasks=d.get("tasks"))
        if cfg.get("eval") is not None:  # action_format=tools: as train.py sees them
            from atlas.evaluation import in_action_format

            trajectories = in_action_format(trajectories, cfg.eval)
        if cfg.split == "train":
            trajectories, _ = split_trajectories(trajectories, d.val_fraction)
        # 2. selection (selector + oracle + ratio; oracle answers cached)
        selector, _ = build_selector(cfg.selector)
        selections = selector.selections(trajectories)
        # 3. the selection file, its exports and the summary
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
