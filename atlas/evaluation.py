"""Held-in and held-out evaluation: play the test tasks of every environment, score, report.

    python evaluate.py                                   # the base model
    python evaluate.py checkpoint=logs/train/runs/<run>/model
    python train.py ...                                  # ends with the same evaluation

Writes to the output directory:

- ``episodes.jsonl``: every finished episode as a trajectory (atlas format) with its outcome in
  ``meta``, appended as episodes finish, so a crash later loses nothing already played;
- ``results.json``: success rate and mean reward per environment, and the held-in and held-out
  averages (mean over environments, as the ATLaS paper reports them).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from atlas.data.formats import trajectory_to_record
from atlas.envs.base import SPLITS
from atlas.rollout import EnvPool, Episode, Policy, run_episodes
from atlas.utils import atomic_write

log = logging.getLogger(__name__)

GROUPS = ("held_in", "held_out")


def environments(eval_cfg: DictConfig) -> dict[str, tuple[str, DictConfig]]:
    """name -> (group, env config) for every environment of the evaluation suite."""
    envs: dict[str, tuple[str, DictConfig]] = {}
    for group in GROUPS:
        for key, env_cfg in (eval_cfg.get(group) or {}).items():
            if env_cfg is None:  # removed with `~eval.held_out.maze` or `eval.held_out.maze=null`
                continue
            if "_target_" not in env_cfg:
                raise ValueError(f"eval.{group}.{key}: not an environment config (no _target_)")
            if env_cfg.name in envs:
                raise ValueError(f"eval.{group}.{key}: environment name {env_cfg.name!r} is used "
                                 f"twice; a results table needs distinct names")
            envs[env_cfg.name] = (group, env_cfg)
    if not envs:
        raise ValueError("eval has no environments in held_in or held_out")
    return envs


def summarize(episodes: list[Episode], groups: dict[str, str]) -> dict[str, Any]:
    """Per-environment success rate and mean reward (percent), and per-group averages."""
    per_env: dict[str, dict[str, Any]] = {}
    for name, group in groups.items():
        eps = [e for e in episodes if e.task.env == name]
        per_env[name] = {
            "group": group, "episodes": len(eps),
            "success": 100 * statistics.fmean(e.success for e in eps) if eps else float("nan"),
            "reward": 100 * statistics.fmean(e.score for e in eps) if eps else float("nan"),
            "turns": statistics.fmean(e.turns for e in eps) if eps else float("nan"),
            "invalid_actions": sum(e.invalid for e in eps),
            "errors": sum(e.status == "error" for e in eps),
        }
    averages = {}
    for group in GROUPS:
        rows = [r for r in per_env.values() if r["group"] == group]
        if rows:
            averages[group] = {m: statistics.fmean(r[m] for r in rows) for m in ("success", "reward")}
    return {"environments": per_env, "averages": averages}


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table (percent)."""
    lines = [f"{'environment':<16}{'group':<10}{'episodes':>9}{'success':>9}{'reward':>9}"
             f"{'turns':>7}{'errors':>7}"]
    for name, r in results["environments"].items():
        lines.append(f"{name:<16}{r['group']:<10}{r['episodes']:>9}{r['success']:>9.1f}"
                     f"{r['reward']:>9.1f}{r['turns']:>7.1f}{r['errors']:>7}")
    for group, avg in results["averages"].items():
        lines.append(f"{group + ' avg':<26}{'':>9}{avg['success']:>9.1f}{avg['reward']:>9.1f}")
    return "\n".join(lines)


def metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat metric names for loggers: eval/held_in/success, eval/babyai/reward, ..."""
    flat = {f"{prefix}/{g}/{m}": v for g, avg in results["averages"].items() for m, v in avg.items()}
    for name, r in results["environments"].items():
        for m in ("success", "reward", "turns", "errors"):
            flat[f"{prefix}/{name}/{m}"] = float(r[m])
    return flat


def evaluate(model, tokenizer, eval_cfg: DictConfig, out_dir: str | Path,
             logger: Any = None) -> dict[str, Any]:
    """Play the test tasks of every environment in ``eval_cfg`` and report.

    Args:
        model: The agent's causal LM (a trained one, or a base model).
        tokenizer: Its tokenizer (the chat template used in training).
        eval_cfg: The ``eval`` config group (environments, episodes, batching, generation).
        out_dir: Where ``episodes.jsonl`` and ``results.json`` go.
        logger: Optional Lightning logger; gets the metrics (and, for W&B, an episode table).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if eval_cfg.split not in SPLITS:
        raise ValueError(f"eval.split must be one of {SPLITS}, got {eval_cfg.split!r}")
    for key in ("episodes", "batch_size", "instances"):
        if eval_cfg[key] < 1:
            raise ValueError(f"eval.{key} must be >= 1, got {eval_cfg[key]}")
    envs = environments(eval_cfg)
    groups = {name: group for name, (group, _) in envs.items()}
    pool = EnvPool({name: (lambda c=c: instantiate(c)) for name, (_, c) in envs.items()},
                   instances=eval_cfg.instances)
    episodes_file = out / "episodes.jsonl"
    episodes_file.unlink(missing_ok=True)
    try:
        tasks = pool.tasks(eval_cfg.split, eval_cfg.episodes)
        policy = Policy(model, tokenizer, **eval_cfg.generation)
        with episodes_file.open("a", encoding="utf-8") as f:
            def save(ep: Episode) -> None:
                f.write(json.dumps(trajectory_to_record(ep.trajectory), ensure_ascii=False) + "\n")
                f.flush()

            episodes = run_episodes(policy, pool, tasks, batch_size=eval_cfg.batch_size,
                                    max_turns=_plain(eval_cfg.get("max_turns")),
                                    max_prompt_tokens=eval_cfg.max_prompt_tokens, on_finish=save)
    finally:
        pool.close()
    results = summarize(episodes, groups)
    results.update({"split": eval_cfg.split, "episodes_file": str(episodes_file.resolve()),
                    "config": OmegaConf.to_container(eval_cfg, resolve=True)})
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    for ep in episodes:
        if ep.status == "error":
            log.warning("episode %s failed: %s", ep.task.id, ep.error)
    log.info("evaluation (%s tasks)\n%s", eval_cfg.split, format_table(results))
    log.info("results in %s", (out / "results.json").resolve())
    if logger:
        logger.log_metrics(metrics(results))
        if type(logger).__name__ == "WandbLogger":
            rows = [ep.record() for ep in episodes]
            columns = list(rows[0]) + ["transcript"]
            data = [list(r.values()) + [_transcript(ep)] for r, ep in zip(rows, episodes)]
            logger.log_table("eval/episodes", columns=columns, data=data)
    return results


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _transcript(ep: Episode) -> str:
    return "\n\n".join(f"[{m.role}] {m.content}" for m in ep.trajectory.messages)


def load_agent(checkpoint: str | None, model_cfg: DictConfig):
    """The model and tokenizer to evaluate: a train.py ``model/`` directory, or the ``model``
    config. A PEFT adapter directory is applied to the ``model`` config's base model."""
    from atlas.model import load_model, load_tokenizer

    if checkpoint is None:
        return (load_model(**model_cfg), load_tokenizer(model_cfg.tokenizer or model_cfg.name))
    path = Path(checkpoint)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no config.json or adapter_config.json "
                                f"(expected a model/ directory written by train.py)")
    if (path / "adapter_config.json").exists():
        # The adapter goes on the base model of the `model` config: the one train.py tuned it on
        # (its recorded base path may be a cache directory of another machine).
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(**model_cfg), path)
    else:
        model = load_model(name=str(path), dtype=model_cfg.get("dtype", "float32"),
                           attn_implementation=model_cfg.get("attn_implementation"))
    return model, load_tokenizer(str(path))


def run(cfg: DictConfig) -> dict[str, Any]:
    """The evaluate.py job (``conf/evaluate.yaml``)."""
    import lightning as L
    import wandb

    from atlas.model import resolve_device
    from atlas.utils import redact, single_log_handler, wandb_offline_by_default

    single_log_handler()
    wandb_offline_by_default()
    L.seed_everything(cfg.seed)
    model, tokenizer = load_agent(cfg.get("checkpoint"), cfg.model)
    model.to(resolve_device())
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    try:
        if logger:
            logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))
        results = evaluate(model, tokenizer, cfg.eval, cfg.paths.output_dir, logger)
        return results
    finally:
        wandb.finish()
