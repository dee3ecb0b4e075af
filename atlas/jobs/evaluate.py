"""The evaluate job (``evaluate.py``, ``conf/evaluate.yaml``): a model (the base model, or a
``model/`` directory that ``train.py`` wrote) -> step-level evaluation and rollouts on the
held-in and held-out test tasks (:func:`atlas.evaluation.evaluate`) -> ``results.json``,
``steps.jsonl``, ``episodes.jsonl`` and W&B."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from atlas import evaluation
from atlas.jobs import job, logged_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluate job; returns its results (also ``results.json``)."""
    with job(cfg):
        # 1. the agent (with an inference server, only its tokenizer: the server holds it)
        checkpoint = cfg.get("checkpoint")
        server = evaluation.backend(cfg.eval) == "server"
        if server and not (cfg.eval.get("steps") and cfg.eval.steps.tasks):
            from atlas.model import load_tokenizer

            model = None
            tokenizer = load_tokenizer(checkpoint or cfg.model.tokenizer or cfg.model.name)
        else:
            from atlas.model import resolve_device

            model, tokenizer = evaluation.load_agent(checkpoint, cfg.model)
            model.to(resolve_device())
        logger = instantiate(cfg.logger) if cfg.get("logger") else None
        if logger:
            logger.log_hyperparams(logged_config(cfg))
        # 2. step-level evaluation and rollouts; a checkpoint is compared with its base model
        #    (model=), and the base model itself fills that cache
        results = evaluation.evaluate(
            model, tokenizer, cfg.eval, cfg.paths.output_dir, logger, cfg.model,
            is_base=not checkpoint,
            served=evaluation.served_paths(checkpoint, cfg.model) if server else None)
        if "baseline" in results:
            log.info("base model vs this model\n%s", evaluation.format_comparison(results))
        return results
