"""Held-in and held-out evaluation: play the test tasks of every environment, score, report.

    python evaluate.py                                   # the base model
    python evaluate.py checkpoint=logs/train/runs/<run>/model
    python train.py ...                                  # ends with the same evaluation

Writes to the output directory:

- ``episodes.jsonl``: every finished episode as a trajectory (atlas format) with its outcome in
  ``meta``, appended as episodes finish, so a crash later loses nothing already played;
- ``steps.jsonl``: step-level evaluation (atlas/step_eval.py), one record per scored expert step
  of the test trajectories: the model's action against the expert's, the expert turn's NLL;
- ``steps_base.jsonl``: the same for the base model (``eval.steps.baseline``; cached);
- ``results.json``: per environment, step accuracy and NLL (bootstrap 95% intervals over tasks),
  success rate (Wilson 95% interval) and mean reward (bootstrap); the held-in and held-out
  averages (mean over environments, as the ATLaS paper reports them) with their intervals; and
  the trained model's paired difference from the base model.

Set ``eval.episodes=0`` for step-level evaluation only, ``eval.steps.tasks=0`` for rollouts only.

Size: the suite's two halves (steps and rollouts) share its environments, its results file and
its W&B tables; the engines they drive live in ``step_eval``, ``prefix_decoding`` and
``rollout``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from atlas import step_eval
from atlas.data.formats import trajectory_to_record
from atlas.data.trajectory import Trajectory
from atlas.envs.base import Split
from atlas.rollout import ActionFormat, EnvPool, Episode, EpisodeStatus, Policy, run_episodes
from atlas.stats import Ratio, wilson
from atlas.utils import ConfigError, atomic_write, names, per_environment

log = logging.getLogger(__name__)

GROUPS = ("held_in", "held_out")
# below this many test tasks in an environment, its bootstrap interval is too narrow to trust
FEW_TASKS = 8


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
    kind = eval_cfg.get("action_format", "text")
    for name, (group, env_cfg) in envs.items():
        formats = get_class(env_cfg._target_).action_formats
        if kind not in formats:
            raise ConfigError(f"action_format={kind}: environment {name} (eval.{group}) is played "
                              f"only with action_format={'|'.join(formats)}")
    return envs


def check_suite(eval_cfg: DictConfig) -> tuple[dict[str, tuple[str, DictConfig]],
                                               dict[str, int], dict[str, list[str]]]:
    """The suite's settings, checked (train.py calls this before training, so a bad value fails
    at once): its environments (:func:`environments`), episodes per environment, and the task
    families of those whose rollouts play only some (:func:`episode_tasks`)."""
    Split.of(eval_cfg.split, "eval.split")
    for key in ("batch_size", "instances"):
        if eval_cfg[key] < 1:
            raise ValueError(f"eval.{key} must be >= 1, got {eval_cfg[key]}")
    backend(eval_cfg)
    envs = environments(eval_cfg)
    episodes = {name: per_environment(eval_cfg.episodes or 0, name, group, "eval.episodes")
                for name, (group, _) in envs.items()}
    return envs, episodes, episode_tasks(eval_cfg, envs)


def episode_tasks(eval_cfg: DictConfig, envs: dict[str, tuple[str, DictConfig]]
                  ) -> dict[str, list[str]]:
    """``eval.episode_tasks``: by environment name, some of its task families for the rollouts
    to play (the step-level evaluation keeps them all); a missing or null entry: all."""
    setting = eval_cfg.get("episode_tasks") or {}
    if not isinstance(setting, Mapping):
        raise ConfigError(f"eval.episode_tasks must map environment names to lists of task "
                          f"families, got {_plain(setting)!r}")
    out = {}
    for name, families in setting.items():
        key = f"eval.episode_tasks.{name}"
        if families is None:
            continue
        if name not in envs:
            raise ConfigError(f"{key}: no environment {name!r} in the suite (it has "
                              f"{', '.join(envs)})")
        own = envs[name][1].get("tasks")
        if own is None or get_class(envs[name][1]._target_).remote:
            raise ConfigError(f"{key}: environment {name} plays tasks by index "
                              f"(indices.test), not by family")
        out[name] = names(families, key)
        unknown = [f for f in out[name] if f not in own]
        if unknown:
            raise ConfigError(f"{key}: {unknown[0]!r} is not one of environment {name}'s task "
                              f"families ({', '.join(own)})")
    return out


def action_format(eval_cfg: DictConfig) -> ActionFormat:
    """How the agent acts in the suite's environments (``eval.action_format``)."""
    return ActionFormat(eval_cfg.get("action_format", "text"),
                        bool(eval_cfg.get("tools_as_text", False)))


def in_action_format(trajectories: list[Trajectory], eval_cfg: DictConfig) -> list[Trajectory]:
    """Expert trajectories of the suite's environments in the agent's action format: with
    ``action_format=tools``, their actions become calls of each environment's tools and the
    observations the calls' results (trajectories that already call tools stay as they are)."""
    actions = action_format(eval_cfg)
    if not actions.tools:
        return trajectories
    classes = {env_cfg.name: get_class(env_cfg._target_)
               for _, env_cfg in environments(eval_cfg).values()}
    out = []
    for t in trajectories:
        if t.env not in classes and not t.has_tool_calls:
            raise ConfigError(f"action_format=tools: trajectory {t.id} ({t.meta.get('source')}) is "
                              f"from environment {t.env!r}, whose tools no eval environment defines "
                              f"(known: {', '.join(sorted(classes))})")
        out.append(actions.convert(t, classes[t.env]) if t.env in classes else t)
    return out


def summarize(episodes: list[Episode], groups: dict[str, str]) -> dict[str, Any]:
    """Per-environment success rate (Wilson 95% interval) and mean reward (bootstrap 95% interval
    over episodes), in percent, and per-group averages over environments with their intervals."""
    per_env: dict[str, dict[str, Any]] = {}
    for name, group in groups.items():
        eps = [e for e in episodes if e.task.env == name]
        wins = sum(e.success for e in eps)
        low, high = wilson(wins, len(eps))
        per_env[name] = {
            "group": group, "episodes": len(eps),
            "success": 100 * wins / len(eps) if eps else float("nan"),
            "success_ci": [round(100 * low, 2), round(100 * high, 2)],
            "reward": 100 * statistics.fmean(e.score for e in eps) if eps else float("nan"),
            "reward_ci": _ci(Ratio.of(episode_units(eps, "score"))) if eps else None,
            "turns": statistics.fmean(e.turns for e in eps) if eps else float("nan"),
            "invalid_actions": sum(e.invalid for e in eps),
            "errors": sum(e.status == EpisodeStatus.ERROR for e in eps),
        }
    averages = {}
    for group in GROUPS:
        rows = [r for r in per_env.values() if r["group"] == group and r["episodes"]]
        if rows:
            eps = [e for e in episodes if groups.get(e.task.env) == group]
            averages[group] = {m: statistics.fmean(r[m] for r in rows) for m in ("success", "reward")}
            averages[group].update({f"{m}_ci": _ci(Ratio.of(episode_units(eps, m)))
                                    for m in ("success", "score")})
            averages[group]["reward_ci"] = averages[group].pop("score_ci")
    return {"environments": per_env, "averages": averages}


def episode_units(episodes: list[Episode], metric: str) -> dict[str, dict[str, tuple[float, float]]]:
    """env -> task -> (value, 1) of ``success`` or ``score``: one bootstrap cluster per episode."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for e in episodes:
        out.setdefault(e.task.env, {})[e.task.id] = (float(getattr(e, metric)), 1.0)
    return out


def _ci(ratio: Ratio) -> list[float]:
    est = ratio.interval().scaled(100)
    return [round(est.low, 2), round(est.high, 2)]


def format_table(results: dict[str, Any]) -> str:
    """The rollout results as a plain-text table (percent, 95% intervals in brackets)."""
    lines = [f"{'environment':<16}{'group':<10}{'episodes':>9}  {'success':<20}{'reward':<20}"
             f"{'turns':>6}{'errors':>7}"]

    def cell(value, ci):
        return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"

    for name, r in results["environments"].items():
        lines.append(f"{name:<16}{r['group']:<10}{r['episodes']:>9}  "
                     f"{cell(r['success'], r['success_ci']):<20}{cell(r['reward'], r['reward_ci']):<20}"
                     f"{r['turns']:>6.1f}{r['errors']:>7}")
    for group, avg in results["averages"].items():
        lines.append(f"{group + ' avg':<35}  {cell(avg['success'], avg.get('success_ci')):<20}"
                     f"{cell(avg['reward'], avg.get('reward_ci')):<20}")
    return "\n".join(lines)


def metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat metric names for loggers: eval/held_in/success, eval/babyai/reward,
    eval/steps/held_in/accuracy, eval/steps/babyai/nll, eval/steps/held_in/accuracy_vs_base, ..."""
    flat = {f"{prefix}/{g}/{m}": float(avg[m]) for g, avg in results.get("averages", {}).items()
            for m in ("success", "reward")}
    for name, r in results.get("environments", {}).items():
        for m in ("success", "reward", "turns", "errors"):
            flat[f"{prefix}/{name}/{m}"] = float(r[m])
    steps = results.get("steps") or {}
    for section in ("environments", "averages"):
        for name, r in (steps.get(section) or {}).items():
            for m in ("accuracy", "nll"):
                flat[f"{prefix}/steps/{name}/{m}"] = r[m]["value"]
                flat[f"{prefix}/steps/{name}/{m}_low"] = r[m]["low"]
                flat[f"{prefix}/steps/{name}/{m}_high"] = r[m]["high"]
    for group, d in ((results.get("baseline") or {}).get("difference") or {}).items():
        flat[f"{prefix}/steps/{group}/accuracy_vs_base"] = d["value"]
    return flat


def evaluate(model, tokenizer, eval_cfg: DictConfig, out_dir: str | Path,
             logger: Any = None, base_model: DictConfig | None = None,
             training: list[Trajectory] | None = None, is_base: bool = False,
             served: dict[str, str] | None = None) -> dict[str, Any]:
    """Score the model step by step on expert test trajectories, then play the test tasks of
    every environment in ``eval_cfg``; report both with their intervals.

    Args:
        model: The agent's causal LM (a trained one, or a base model).
        tokenizer: Its tokenizer (the chat template used in training).
        eval_cfg: The ``eval`` config group (environments, step evaluation, episodes, batching,
            generation).
        out_dir: Where ``steps.jsonl``, ``episodes.jsonl`` and ``results.json`` go.
        logger: Optional Lightning logger; gets the metrics (and, for W&B, the ``eval/steps``
            and ``eval/episodes`` tables).
        base_model: The ``model`` config the agent was trained from: with
            ``eval.steps.baseline``, its step records (cached) and the paired difference.
        is_base: ``model`` is ``base_model`` itself (evaluate.py without a checkpoint): its
            step records fill the base model's cache.
        training: The training trajectories, to count test tasks that occur in them.
        served: With ``eval.backend=server``, what the server command's ``{model}`` and
            ``{adapter}`` stand for (:func:`served_paths`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    envs, episodes_per_env, families = check_suite(eval_cfg)
    played = {name: env for name, env in envs.items() if episodes_per_env[name]}
    groups = {name: group for name, (group, _) in envs.items()}
    results: dict[str, Any] = {"environments": {}, "averages": {}}
    step_records = None
    if eval_cfg.get("steps") and eval_cfg.steps.tasks:
        if any(get_class(c._target_).has_expert for _, c in envs.values()):
            step_records = _step_evaluation(model, tokenizer, eval_cfg, envs, out, results,
                                            base_model, training, is_base)
        else:
            log.warning("eval.steps: no environment of the suite has an expert to write test "
                        "trajectories: rollouts only")
    episodes: list[Episode] = []
    if played:
        if step_records is not None:  # kept should the rollouts fail
            atomic_write(out / "results.json", json.dumps(results, indent=2))
        played = {name: (group, OmegaConf.merge(c, {"tasks": families[name]}) if name in families
                         else c) for name, (group, c) in played.items()}
        episodes = _rollouts(model, tokenizer, eval_cfg, played, out, served, episodes_per_env)
        results.update(summarize(episodes, {name: groups[name] for name in played}))
        results["episodes_file"] = str((out / "episodes.jsonl").resolve())
    results.update({"split": eval_cfg.split,
                    "config": OmegaConf.to_container(eval_cfg, resolve=True)})
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    for ep in episodes:
        if ep.status == EpisodeStatus.ERROR:
            log.warning("episode %s failed: %s", ep.task.id, ep.error)
    if "steps" in results:
        log.info("step-level evaluation (%d expert test steps, teacher-forced)\n%s",
                 len(step_records), step_eval.format_table(results["steps"]))
    if episodes:
        log.info("rollouts (%s tasks)\n%s", eval_cfg.split, format_table(results))
    log.info("results in %s", (out / "results.json").resolve())
    if logger:
        logger.log_metrics(metrics(results))
        if type(logger).__name__ == "WandbLogger":
            if step_records:
                columns = list(step_records[0])
                logger.log_table("eval/steps", columns=columns,
                                 data=[[r[c] for c in columns] for r in step_records])
            if episodes:
                rows = [ep.record() for ep in episodes]
                columns = list(rows[0]) + ["transcript"]
                data = [list(r.values()) + [_transcript(ep)] for r, ep in zip(rows, episodes)]
                logger.log_table("eval/episodes", columns=columns, data=data)
    return results


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``steps.jsonl``-like file; a malformed line is an error naming it."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return out


def _step_evaluation(model, tokenizer, eval_cfg: DictConfig, envs, out: Path,
                     results: dict[str, Any], base_model: DictConfig | None,
                     training: list[Trajectory] | None, is_base: bool) -> list[dict[str, Any]]:
    """Step-level evaluation of the model (and, cached, of its base model) into ``results``."""
    from atlas.model import cache_dir

    cfg = eval_cfg.steps
    for key in ("batch_size", "max_new_tokens", "segment"):
        if cfg.get(key) is not None and cfg[key] < 1:
            raise ValueError(f"eval.steps.{key} must be >= 1, got {cfg[key]}")
    actions = action_format(eval_cfg)
    items, files = step_eval.load_suite(envs, cfg, actions)
    if not items:
        raise ValueError("eval.steps: no test trajectories (every environment's task count is 0)")
    groups = {name: group for name, (group, _) in envs.items() if name in files}
    t0 = time.time()
    records = step_eval.score(model, tokenizer, items, cfg.batch_size, cfg.max_new_tokens,
                              segment=cfg.get("segment"), complete=actions.complete)
    _write_jsonl(out / "steps.jsonl", records)
    results["steps"] = {**step_eval.summarize(records, groups), "file": str((out / "steps.jsonl").resolve()),
                        "test_sets": files, "seconds": round(time.time() - t0, 1)}
    few = sorted(e for e, r in results["steps"]["environments"].items() if r["tasks"] < FEW_TASKS)
    if few:
        log.warning("%s: fewer than %d test tasks each; a bootstrap over so few tasks "
                    "understates the uncertainty of these environments (eval.steps.tasks)",
                    ", ".join(few), FEW_TASKS)
    if training is not None:
        clash = step_eval.overlap([t for t, *_ in items], training)
        results["steps"]["overlap_with_training"] = len(clash)
        if clash:
            log.warning("%d test trajectories share a task or first observation with the training "
                        "data (first: %s): their steps do not measure generalisation",
                        len(clash), clash[0])
    if base_model is not None:
        model_key = json.dumps(OmegaConf.to_container(base_model, resolve=True), sort_keys=True)
        key = hashlib.sha256((model_key + step_eval.suite_key(items, cfg, tokenizer)).encode())
        cached = cache_dir() / "step_eval" / f"base-{key.hexdigest()[:16]}.jsonl"
    if is_base and base_model is not None:  # this is the base model: later runs reuse it
        cached.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(cached, records)
    elif base_model is not None and cfg.get("baseline"):
        if cached.exists():
            base = step_eval.rescore(read_jsonl(cached), items)
            log.info("base model's step records from the cache: %s", cached)
        else:
            from atlas.model import load_model, resolve_device

            log.info("scoring the base model (%s) once; cached in %s", base_model.name, cached)
            base_lm = load_model(**base_model).to(resolve_device())
            base = step_eval.score(base_lm, tokenizer, items, cfg.batch_size, cfg.max_new_tokens,
                                   segment=cfg.get("segment"), complete=actions.complete)
            del base_lm
            cached.parent.mkdir(parents=True, exist_ok=True)
            _write_jsonl(cached, base)
        _write_jsonl(out / "steps_base.jsonl", base)
        results["baseline"] = {
            "model": base_model.name, "file": str((out / "steps_base.jsonl").resolve()),
            "steps": step_eval.summarize(base, groups),
            # this model minus the base model, paired on the same steps
            "difference": {g: step_eval.paired_difference(records, base, g)
                           for g in dict.fromkeys(groups.values())}}
    return records


def format_comparison(results: dict[str, Any]) -> str:
    """Base model vs this model: step accuracy (%, 95% intervals) per group, the paired
    difference, and rollout success where it is not zero."""
    base, this = results["baseline"]["steps"]["averages"], results["steps"]["averages"]
    lines = [f"{'step accuracy':<14}{'base model':<22}{'this model':<22}{'difference (paired)'}"]
    for group, d in results["baseline"]["difference"].items():
        mark = "resolved" if d["resolved"] else "interval includes 0"
        lines.append(f"{group:<14}{step_eval._fmt(base[group]['accuracy']):<22}"
                     f"{step_eval._fmt(this[group]['accuracy']):<22}"
                     f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]  {mark}")
    averages = results.get("averages") or {}
    for group, avg in averages.items():
        if avg.get("success"):
            lines.append(f"{group:<14}rollout success of this model {avg['success']:.1f}% "
                         f"[{avg['success_ci'][0]:.1f}, {avg['success_ci'][1]:.1f}]")
    return "\n".join(lines)


def backend(eval_cfg: DictConfig) -> str:
    """``eval.backend``, checked: ``hf`` or ``server``."""
    from atlas.serving import BACKENDS

    name = eval_cfg.get("backend", "hf")
    if name not in BACKENDS:
        raise ConfigError(f"eval.backend must be one of {BACKENDS}, got {name!r}")
    return name


def served_paths(checkpoint: str | Path | None, model_cfg: DictConfig | None) -> dict[str, str]:
    """What ``{model}`` and ``{adapter}`` of ``eval.server.command`` stand for: a full model
    directory, or a PEFT adapter directory on the ``model`` config's base model."""
    from atlas.model import resolve_model_name

    base = (resolve_model_name(model_cfg.name) if model_cfg is not None and model_cfg.get("name")
            else "")
    if checkpoint is None:
        return {"model": base, "adapter": ""}
    if (Path(checkpoint) / "adapter_config.json").exists():
        return {"model": base, "adapter": str(Path(checkpoint).resolve())}
    return {"model": str(Path(checkpoint).resolve()), "adapter": ""}


@contextmanager
def _policy(model, tokenizer, eval_cfg: DictConfig, actions: ActionFormat, out: Path,
            served: dict[str, str] | None):
    """The agent that plays the rollouts: ``Policy`` in this process, or ``ServerPolicy``
    through the inference server of ``eval.server`` (started and stopped here if it has a
    command)."""
    if backend(eval_cfg) == "hf":
        if model is None:
            raise ConfigError("eval.backend=hf needs the model in this process")
        yield Policy(model, tokenizer, complete=actions.complete, **eval_cfg.generation)
        return
    from atlas.serving import InferenceServer, ServerPolicy

    sc = eval_cfg.server
    gen = eval_cfg.generation
    key = os.environ.get(sc.api_key_env) if sc.get("api_key_env") else None
    with InferenceServer(base_url=sc.get("base_url"), command=sc.get("command"),
                         port=sc.get("port"), startup_timeout=sc.startup_timeout,
                         log_file=out / "server.log", api_key=key, **(served or {})) as server:
        policy = ServerPolicy(tokenizer, server.base_url, server.served_model(sc.get("model")),
                              max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                              top_p=gen.get("top_p", 1.0), complete=actions.complete,
                              concurrency=sc.concurrency, api_key=key)
        try:
            yield policy
        finally:
            policy.close()


def _rollouts(model, tokenizer, eval_cfg: DictConfig, envs, out: Path,
              served: dict[str, str] | None, episodes: dict[str, int]) -> list[Episode]:
    """Play ``episodes[name]`` test tasks of each environment of ``envs``; ``episodes.jsonl``
    grows as they end."""
    pool = EnvPool({name: (lambda c=c: instantiate(c)) for name, (_, c) in envs.items()},
                   instances=eval_cfg.instances)
    episodes_file = out / "episodes.jsonl"
    episodes_file.unlink(missing_ok=True)
    try:
        tasks = pool.tasks(eval_cfg.split, episodes)
        actions = action_format(eval_cfg)
        with _policy(model, tokenizer, eval_cfg, actions, out, served) as policy, \
                episodes_file.open("a", encoding="utf-8") as f:
            def save(ep: Episode) -> None:
                f.write(json.dumps(trajectory_to_record(ep.trajectory), ensure_ascii=False) + "\n")
                f.flush()

            return run_episodes(policy, pool, tasks, batch_size=eval_cfg.batch_size,
                                max_turns=_plain(eval_cfg.get("max_turns")),
                                max_prompt_tokens=eval_cfg.max_prompt_tokens, on_finish=save,
                                actions=actions)
    finally:
        pool.close()


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
