"""The train job (``train.py``, ``conf/train.yaml``): expert trajectories -> selection -> masked
examples -> Lightning -> model -> evaluation.

Every arrow leaves a file in the run's output directory:

- ``selection.jsonl``: the training trajectories with the selector's choice, each recording it in
  ``meta.selection`` (atlas format; ``selection_file=`` reuses it, and ``data.files=[...]
  data.val_fraction=0 selector=full`` trains on exactly it), with its exports
  ``selection.agentgym.jsonl`` and ``selection.openai.jsonl`` (see atlas/selection/);
- ``checkpoints/``: Lightning checkpoints (``ckpt_path=.../last.ckpt`` resumes);
- ``model/``: the trained model (or PEFT adapter) and tokenizer, saved with ``save_pretrained``;
- ``eval/``: rollouts of the trained model on the held-in and held-out test tasks
  (``episodes.jsonl``, ``results.json``; see atlas/evaluation.py);
- ``train_summary.json``: selection statistics, final metrics and where everything went.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from atlas.console import LineProgress, duration, is_terminal, summary_block
from atlas.data.datamodule import load_trajectories, split_trajectories
from atlas.evaluation import check_suite, in_action_format
from atlas.model import load_model, load_tokenizer
from atlas.selection import (apply_selections, build_selector, select_steps, summarize,
                             write_selection)
from atlas.jobs import job, logged_config
from atlas.utils import DDP_JOB_ENV, atomic_write

log = logging.getLogger(__name__)


def _choices() -> dict[str, str]:
    """Config-group choices of this job (selector=..., model=...), when run under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return {k: v for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and not k.startswith("hydra")}
    except ValueError:
        return {}


def _log_file(out: Path) -> str | None:
    """The job's log file (Hydra's ``<job name>.log`` in the run directory), if any."""
    from hydra.core.hydra_config import HydraConfig

    try:
        path = out / f"{HydraConfig.get().job.name}.log"
    except ValueError:  # not run by Hydra
        return None
    return str(path.resolve()) if path.is_file() else None


def _hydra_job() -> tuple[dict[str, list[str]], str | None]:
    """This job's overrides (``task`` and ``hydra``) and, in a sweep, the sweep's directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return {"overrides": [], "hydra_overrides": []}, None
    return ({"overrides": list(hc.overrides.task), "hydra_overrides": list(hc.overrides.hydra)},
            hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None)


# how long ranks > 0 wait for rank 0's selection (an LLM oracle over thousands of trajectories)
SELECTION_WAIT_S = 6 * 3600


def wait_for_file(path: Path, timeout_s: float, what: str, poll_s: float = 2.0) -> Path:
    """Wait until another process has written ``path`` (atomically), or raise after a timeout."""
    start = next_log = time.monotonic()
    while not path.exists():
        now = time.monotonic()
        if now - start > timeout_s:
            raise TimeoutError(f"waited {now - start:.0f} s for {what} ({path}): did rank 0 fail?")
        if now >= next_log:
            log.info("waiting for %s (%s)", what, path)
            next_log = now + 60
        time.sleep(poll_s)
    return path


# what Lightning's DDP launcher sets in the parent's environment
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE",
                  DDP_JOB_ENV)


def _end_distributed(launch_env: dict[str, str | None]) -> None:
    """Leave the process as the job found it, so the next job of a multirun starts its own DDP
    group: Lightning keeps the process group and its launch variables, and with ``LOCAL_RANK``
    set it would take the next job's ranks as started by someone else, and wait for them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and launch_env["MASTER_PORT"] is None:
        dist.destroy_process_group()
    for key, value in launch_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _wandb_run(cfg: DictConfig, choices: dict[str, str], selector_name: str, granularity: str,
               sweep_dir: str | None) -> dict[str, Any]:
    """W&B run settings that make a sweep comparable on a dashboard: the sweep as the group,
    the compared factors as tags and in the run name."""
    lc = cfg.logger
    ratio = "all" if selector_name == "full" else f"{cfg.ratio:g}"
    tags = [f"selector:{selector_name}", f"ratio:{ratio}", f"seed:{cfg.seed}"]
    tags += [f"{g}:{choices[g]}" for g in ("model", "oracle", "data") if g in choices]
    tags.append(f"granularity:{granularity}")
    part = "" if granularity == "step" else f"-{granularity}"
    return {"group": lc.get("group") or (f"{cfg.task_name}-{Path(sweep_dir).name}" if sweep_dir
                                         else None),
            "tags": [*(lc.get("tags") or []), *tags],
            "name": lc.get("name") or (f"{selector_name}{part}-s{cfg.seed}" if selector_name == "full"
                                       else f"{selector_name}{part}-r{ratio}-s{cfg.seed}")}


def _callbacks(cfg: DictConfig | None, has_logger: bool) -> list[Any]:
    callbacks = [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]
    if not has_logger:  # Lightning refuses a LearningRateMonitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def duplicate_of(cfg: DictConfig, sweep_dir: str | None, out: Path) -> str | None:
    """In a sweep, the output directory of an earlier job that is this same job, or None.

    Jobs are the same when their resolved configs agree but for the output paths and the
    settings the selector ignores (``full`` ignores ``ratio``): a ``ratio=0.3,0.5`` sweep then
    trains ``full`` once. Each job claims its config's key under ``<sweep>/.jobs/`` atomically,
    so this holds for parallel launchers too.
    """
    if sweep_dir is None or rank_zero_only.rank != 0:
        return None
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("paths", None)
    if "ratio" not in json.dumps(config.get("selector")):  # the selector never reads the ratio
        config.pop("ratio", None)
    # the job's own directory appears in other settings too (the logger's save_dir, ...)
    text = json.dumps(config, sort_keys=True, default=str).replace(str(cfg.paths.output_dir), "<out>")
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    claim = Path(sweep_dir) / ".jobs" / key
    claim.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(claim, "x", encoding="utf-8") as f:
            f.write(str(out.resolve()))
        return None
    except FileExistsError:
        first = claim.read_text(encoding="utf-8").strip()
        return None if first == str(out.resolve()) else first  # a resumed job is itself


@dataclass
class TrainingData:
    """The first two stages of a training job, as :func:`select_training_data` returns them.

    Attributes:
        trajectories: All the trajectories read (training and validation).
        train: The training trajectories as read (after the validation split).
        val: The validation trajectories.
        selector: The selector of ``cfg.selector``.
        granularity: ``selector.granularity``.
        selections: One per training trajectory.
        chosen: The training trajectories with the selection applied: their chosen steps
            flagged (trajectories whose selection failed left out).
    """

    trajectories: list
    train: list
    val: list
    selector: Any
    granularity: str
    selections: list
    chosen: list


def select_training_data(cfg: DictConfig, reuse: str | None = None) -> TrainingData:
    """Expert trajectories (``data``, in the agent's action format, split like every job) and
    the selector's choice (``selector``, ``oracle``, ``ratio``; reused from ``reuse``, a saved
    selection file). train.py and the mask inspector (atlas/inspect.py) start with this."""
    d = cfg.data
    trajectories = load_trajectories(d.files, format=d.format, env=d.env, limit=d.limit,
                                     tasks=d.get("tasks"))
    trajectories = in_action_format(trajectories, cfg.eval)  # action_format=tools: as calls
    train_t, val_t = split_trajectories(trajectories, d.val_fraction)
    selector, granularity = build_selector(cfg.selector)
    selections = select_steps(selector, train_t, reuse)
    return TrainingData(trajectories, train_t, val_t, selector, granularity, selections,
                        apply_selections(train_t, selections))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``conf/train.yaml``; returns its summary."""
    t0 = time.time()
    launch_env = {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with job(cfg) as wandb_mode:
        same = duplicate_of(cfg, _hydra_job()[1], out)
        if same is not None:
            log.info("this job is the same as %s (selector %s ignores ratio=%s): not run again",
                     same, cfg.selector.get("_target_", "").rsplit(".", 1)[-1], cfg.ratio)
            summary = {"duplicate_of": same, "ratio": cfg.ratio, "seed": cfg.seed}
            atomic_write(out / "train_summary.json", json.dumps(summary, indent=2))
            return summary
        if "deepspeed_stage_3" in str(cfg.trainer.get("strategy")):
            raise ValueError("trainer.strategy=deepspeed_stage_3 shards the weights, and the model "
                             "would be saved and evaluated from its shards: use deepspeed_stage_2, "
                             "or trainer=fsdp to shard the weights")
        try:
            if cfg.get("eval_after_training"):
                check_suite(cfg.eval)  # a bad eval setting fails now, not after training
            # 1. expert trajectories, 2. selection (selector + oracle + ratio; reused from
            #    selection_file, oracle answers cached)
            data = _selection(cfg, out)
            # 3. masked examples (chat template, labels only on the selected steps)
            tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
            datamodule, stats, selection_stats = _masked_examples(cfg, data, tokenizer)
            # 4. Lightning training
            choices = _choices()
            module, trainer, logger = _trainer(cfg, data, stats, tokenizer, choices)
            summary = {"choices": choices, "selector": data.selector.name, "ratio": cfg.ratio,
                       "granularity": data.granularity, "seed": cfg.seed, "selection": stats,
                       "criteria": selection_stats["criteria"], "oracle_run": data.selector.last_run}
            if cfg.get("validate_before_training") and datamodule.val_examples \
                    and not cfg.get("ckpt_path"):
                [before] = trainer.validate(module, datamodule=datamodule, verbose=False)
                summary["val_loss_before_training"] = before["val/loss"]
                log.info("val/loss before training: %.4f", before["val/loss"])
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            # 5. the trained model, loadable by evaluate.py and any transformers code
            summary.update(_save_model(trainer, module, tokenizer, out))
            summary["wall_time_s"] = round(time.time() - t0, 1)
            if not trainer.is_global_zero:
                return summary
            # 6. step-level evaluation and rollouts in the held-in and held-out environments
            results = None
            if cfg.get("eval_after_training"):
                results = _evaluate(cfg, trainer, module, tokenizer, out, logger, data)
                summary["eval"] = _eval_summary(results, out)
                summary["wall_time_s"] = round(time.time() - t0, 1)
            if logger and type(logger).__name__ == "WandbLogger":
                summary["wandb"] = _wandb_summary(logger, stats, selection_stats, summary, wandb_mode)
            atomic_write(out / "train_summary.json", json.dumps(summary, indent=2))
            _report(cfg, summary, results, data, out, wandb_mode)
        finally:
            _end_distributed(launch_env)
    return summary


def _selection(cfg: DictConfig, out: Path) -> TrainingData:
    """Stages 1 and 2, written to ``selection.jsonl`` (by rank zero: every rank trains on its
    choice, and ranks started beside it wait for the file)."""
    reuse = cfg.get("selection_file")
    if rank_zero_only.rank != 0:
        # every rank trains on rank 0's choice and asks the oracle nothing; ranks that torchrun
        # or SLURM started alongside rank 0 wait for it (Lightning's own start after it)
        reuse = str(wait_for_file(out / "selection.jsonl", SELECTION_WAIT_S, "rank 0's selection"))
    data = select_training_data(cfg, reuse)
    if rank_zero_only.rank == 0:  # DDP children run this function too
        write_selection(out, data.train, data.selections)
    # before loading anything more: a selection with too few trajectories left stops here
    data.selector.check(data.selections, str(out / "selection.jsonl"))
    return data


def _masked_examples(cfg: DictConfig, data: TrainingData, tokenizer):
    """Stage 3: the data module, its statistics (the selection's counts among them) and the
    selection's own summary."""
    # _partial_: runtime objects passed to instantiate() would be turned into configs
    datamodule = instantiate(cfg.data.loader, _partial_=True)(
        train=data.chosen, val=data.val, tokenizer=tokenizer, granularity=data.granularity)
    datamodule.setup("fit")
    stats = dict(datamodule.stats)
    selection_stats = summarize(data.selections)
    stats.update({f"select/{k}": v for k, v in selection_stats.items() if k != "criteria"})
    name, granularity = data.selector.name, data.granularity
    log.info("selector=%s%s%s: %d of %d training steps supervised (%.1f%%), %d of %d tokens",
             name, "" if name == "full" else f" ratio={cfg.ratio}",
             "" if granularity == "step" else f" granularity={granularity}",
             stats["train/supervised_steps"], stats["train/steps"],
             100 * stats["train/supervised_step_fraction"], stats["train/supervised_tokens"],
             stats["train/tokens"])
    return datamodule, stats, selection_stats


def _trainer(cfg: DictConfig, data: TrainingData, stats: dict[str, Any], tokenizer,
             choices: dict[str, str]):
    """Stage 4's setup: the Lightning module around the model (PEFT applied), the logger (W&B
    runs grouped and tagged by the sweep's factors), the trainer, and the config logged once."""
    peft_config = instantiate(cfg.peft) if cfg.get("peft") else None
    model = load_model(**cfg.model, peft=peft_config)
    module = instantiate(cfg.module, _partial_=True)(model=model)
    overrides, sweep_dir = _hydra_job()
    logger = False
    if cfg.get("logger"):
        wandb = cfg.logger.get("_target_", "").endswith("WandbLogger")
        settings = (_wandb_run(cfg, choices, data.selector.name, data.granularity, sweep_dir)
                    if wandb else {})
        logger = instantiate(cfg.logger, **settings)
    if rank_zero_only.rank == 0:  # read by DDP children as they start (atlas.utils.ddp_child_argv)
        out = Path(cfg.paths.output_dir)
        os.environ[DDP_JOB_ENV] = json.dumps({**overrides, "output_dir": str(out.resolve())})
    callbacks = _callbacks(cfg.get("callbacks"), has_logger=bool(logger))
    bar = {}
    if not is_terminal():  # a log file: lines every 30 s instead of a bar that prints at the end
        callbacks.append(LineProgress())
        bar = {"enable_progress_bar": False}
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, **bar)
    module.check_trainer(trainer)  # e.g. optimizer_in_backward with gradient accumulation
    if logger:
        trainer.logger.log_hyperparams(logged_config(cfg, choices=choices, selection=stats))
        if type(trainer.logger).__name__ == "WandbLogger" and rank_zero_only.rank == 0:
            from atlas.inspect import log_table  # what this job trains on, as the inspector shows it

            d = cfg.data
            try:
                log_table(trainer.logger, data.chosen,
                          {t.id: t.candidate_steps for t in data.train}, tokenizer,
                          data.granularity, d.loader.max_length, d.tools_as_text, seed=cfg.seed)
            except Exception as e:  # noqa: BLE001 - a diagnostic never stops a run
                log.warning("the train/masks table was not logged: %s: %s", type(e).__name__, e)
    return module, trainer, logger


def _save_model(trainer, module, tokenizer, out: Path) -> dict[str, Any]:
    """Stage 5: ``model/`` with ``save_pretrained`` (every rank takes part: under FSDP this
    gathers the sharded weights); returns what the summary records."""
    model_dir = out / "model"
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "model."
        module.model.save_pretrained(
            model_dir, state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        tokenizer.save_pretrained(model_dir)
    saved = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
             "global_step": trainer.global_step,
             "model_dir": str(model_dir.resolve()),
             "selection_file": str((out / "selection.jsonl").resolve())}
    if (out / "checkpoints").is_dir():
        saved["checkpoint_dir"] = str((out / "checkpoints").resolve())
    return saved


def _evaluate(cfg: DictConfig, trainer, module, tokenizer, out: Path, logger,
              data: TrainingData) -> dict[str, Any]:
    """Stage 6: the trained model scored step by step beside its base model (``cfg.model``
    without the training), and played in the test environments."""
    from atlas.evaluation import backend, evaluate, load_agent, served_paths

    model_dir = out / "model"
    agent = module.model
    if "fsdp" in type(trainer.strategy).__name__.lower():  # sharded: play the saved copy
        agent, _ = load_agent(str(model_dir), cfg.model)
        agent.to(module.device)
    return evaluate(agent, tokenizer, cfg.eval, out / "eval", logger or None,
                    base_model=cfg.model, training=data.trajectories,
                    served=served_paths(model_dir, cfg.model)
                    if backend(cfg.eval) == "server" else None)


def _eval_summary(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """What the job's summary keeps of the evaluation's results."""
    summary = {"averages": results["averages"],
               "results_file": str((out / "eval" / "results.json").resolve())}
    if "steps" in results:
        summary["steps"] = {g: {m: a[m] for m in ("accuracy", "nll")}
                            for g, a in results["steps"]["averages"].items()}
    if "baseline" in results:
        summary["vs_base"] = results["baseline"]["difference"]
    return summary


def _wandb_summary(logger, stats: dict[str, Any], selection_stats: dict[str, Any],
                   summary: dict[str, Any], wandb_mode: str) -> dict[str, Any]:
    """The W&B run's summary: selection counts and the sweep's headline numbers, one column
    each on a dashboard; returns where the run is."""
    run = logger.experiment
    run.summary.update({f"selection/{k}": v for k, v in stats.items()})
    run.summary.update({f"selection/criteria/{k}": v for k, v in selection_stats["criteria"].items()})
    if "eval" in summary:
        for group, name in (("held_in", "heldin_avg"), ("held_out", "heldout_avg")):
            avg = summary["eval"]["averages"].get(group)
            if avg:
                run.summary.update({name: avg["success"], f"{name}_reward": avg["reward"]})
            steps = (summary["eval"].get("steps") or {}).get(group)
            if steps:
                acc = steps["accuracy"]
                run.summary.update({f"{name}_step_acc": acc["value"],
                                    f"{name}_step_acc_low": acc["low"],
                                    f"{name}_step_acc_high": acc["high"]})
    return {"mode": wandb_mode, "dir": str(Path(run.dir).parent.resolve()),
            "project": run.project, "group": run.group, "run_id": run.id}


def _report(cfg: DictConfig, summary: dict[str, Any], results: dict[str, Any] | None,
            data: TrainingData, out: Path, wandb_mode: str) -> None:
    """The job's closing lines: validation loss before and after, the base model against the
    trained one, and a block of where everything went."""
    if "val_loss_before_training" in summary and "val/loss" in summary["metrics"]:
        log.info("val/loss (every step of %d held-out trajectories): %.4f -> %.4f",
                 len(data.val), summary["val_loss_before_training"], summary["metrics"]["val/loss"])
    if results and "baseline" in results:
        from atlas.evaluation import format_comparison

        log.info("base model vs trained model\n%s", format_comparison(results))
    w = summary.get("wandb")
    name = data.selector.name
    log.info("\n%s", summary_block(
        f"train.py done in {duration(summary['wall_time_s'])}: selector={name}"
        f"{'' if name == 'full' else f' ratio={cfg.ratio:g}'} seed={cfg.seed}", {
            "run": out.resolve(), "model": (out / "model").resolve(),
            "selection": (out / "selection.jsonl").resolve(),
            "eval": (summary.get("eval") or {}).get("results_file"),
            "W&B": w and (f"{w['dir']} (offline: `wandb sync {w['dir']}` uploads it)"
                          if wandb_mode == "offline" else f"{w['dir']} ({wandb_mode})"),
            "log": _log_file(out),
            "summary": (out / "train_summary.json").resolve()}))
