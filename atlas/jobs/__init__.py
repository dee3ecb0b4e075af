"""The three jobs, side by side, each a short sequence of named stages:

- :func:`atlas.jobs.select.select` (``select.py``): expert trajectories -> selection -> the
  selection file;
- :func:`atlas.jobs.train.train` (``train.py``): expert trajectories -> selection -> masked
  examples -> Lightning training -> the saved model -> rollouts and step-level evaluation;
- :func:`atlas.jobs.evaluate.evaluate` (``evaluate.py``): a model -> step-level evaluation and
  rollouts -> results files.

:func:`job` is what every one of them does around its stages.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from atlas.console import tidy
from atlas.utils import redact, wandb_offline_by_default


@contextmanager
def job(cfg: DictConfig) -> Iterator[str]:
    """Around a job's stages: one console handler (each message once, library noise filtered),
    W&B offline unless the user chose a mode, the job's seed (``cfg.seed``, data-loader workers
    included), and its W&B run finished at the end, whatever happens (otherwise the next job of
    a multirun logs into it). Yields the W&B mode."""
    import lightning as L

    tidy()
    mode = wandb_offline_by_default()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        yield mode
    finally:
        import wandb

        wandb.finish()


def logged_config(cfg: DictConfig, **extra: Any) -> dict[str, Any]:
    """The job's config as its logger records it, once: resolved, secrets redacted."""
    return {**redact(OmegaConf.to_container(cfg, resolve=True)), **extra}
