"""Step-level evaluation (teacher-forced): at every step of an expert trajectory on a *test*
task, the model reads the expert's history up to that step and writes its own turn.

This is the dense metric of agents trained on expert data (Mind2Web's step success rate,
AgentBench-style action accuracy). At the scale a CPU allows, rollouts rarely succeed, while
every step here is a scored sample.

    expert test trajectories (cached)  ->  one teacher-forced forward per trajectory
        -> NLL of each expert turn, and the KV cache of the shared history
        -> greedy turns for all steps, batched, each reusing its prefix of that cache
        -> action accuracy per environment, group and heuristic-oracle criterion

- **Test trajectories** are the environments' experts on test-split tasks (the split never
  shares a (task, seed) with the train split the default data comes from), rendered exactly as
  the training data (``atlas.data.generate``, with the same share of injected mistakes and
  recoveries), generated once and cached under ``$ATLAS_CACHE_DIR/expert_test`` keyed by the
  environment config, the task count, the seed and the mistake share.
- **Scored steps**: every expert step but an injected mistake (kept in the history, since the
  recovery that follows it is scored).
- **Per step**: the expert turn's mean token NLL under teacher forcing (the same tokens the
  training loss reads: the turn and its end-of-turn token), and the greedy turn's action
  compared with the expert's after both pass through the environment's own parser
  (:meth:`~atlas.envs.base.Environment.canonical_action`). A turn without a parsable action is
  wrong. Exact match is a lower bound where several actions are equally right: BabyAI and Maze
  paths of equal length, any informative Wordle guess, the order of independent ScienceWorld /
  TextWorld-Express sub-goals.
- **Criterion**: the heuristic oracle's label of the step when it marks the trajectory at
  ``criteria_ratio`` (Plan Creation, Critical Observation, Critical Action, Self Correction), or
  ``unmarked``; accuracy split by it shows whether a selector improves the steps it trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from atlas.data.formats import read_trajectories, write_trajectories
from atlas.data.masking import tokenize_steps
from atlas.data.trajectory import Trajectory
from atlas.rollout import Policy, parse_action
from atlas.stats import Ratio

log = logging.getLogger(__name__)

UNMARKED = "unmarked"
CRITERIA = ("Plan Creation", "Critical Observation", "Critical Action", "Self Correction", UNMARKED)
# bump when the generator or the rendering of test trajectories changes
TEST_SET_VERSION = 1


# ---- test trajectories ---------------------------------------------------------------------
def test_set_spec(env_cfg: DictConfig, tasks: int, seed: int, mistake_fraction: float) -> dict:
    """What fixes a test set: its cache key is the hash of this."""
    return {"env": OmegaConf.to_container(env_cfg, resolve=True), "tasks": int(tasks),
            "split": "test", "seed": int(seed), "mistake_fraction": float(mistake_fraction),
            "version": TEST_SET_VERSION}


def test_trajectories(env_cfg: DictConfig, tasks: int, seed: int = 0,
                      mistake_fraction: float = 0.2, cache_root: str | Path | None = None
                      ) -> tuple[list[Trajectory], Path]:
    """The expert's trajectories on the first ``tasks`` test tasks of an environment (those the
    expert solved), from the cache or generated (and cached) now. Returns them and their file."""
    from atlas.data.generate import generate
    from atlas.model import cache_dir

    spec = test_set_spec(env_cfg, tasks, seed, mistake_fraction)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_root or cache_dir() / "expert_test") / f"{env_cfg.name}-{key}.jsonl"
    if path.exists():
        return read_trajectories(path, format="atlas"), path
    t0 = time.time()
    env = instantiate(env_cfg)
    try:
        trajectories, failed = generate(env, tasks, "test", 0, mistake_fraction, seed)
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    write_trajectories(tmp, trajectories, "atlas")
    tmp.replace(path)  # whole or absent: an interrupted generation leaves no partial test set
    path.with_suffix(".spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    log.info("%s: %d expert test trajectories (%d unsolved left out) in %.0f s -> %s",
             env_cfg.name, len(trajectories), failed, time.time() - t0, path)
    return trajectories, path


def scored_steps(trajectory: Trajectory) -> list[int]:
    """The steps that are scored: all but an injected mistake."""
    mistake = trajectory.meta.get("mistake_step")
    return [i for i in range(trajectory.num_steps) if i != mistake]


def step_criteria(trajectories: list[Trajectory], ratio: float) -> list[dict[int, str]]:
    """Per trajectory, step -> the heuristic oracle's criterion, at ``ratio`` of its steps."""
    from atlas.oracle import HeuristicOracle
    from atlas.selection import num_selected

    candidates = [scored_steps(t) for t in trajectories]
    judgements = HeuristicOracle().judge(trajectories, candidates,
                                         [num_selected(ratio, len(c)) for c in candidates])
    return [dict(zip(j.steps, j.criteria)) for j in judgements]


def overlap(test: list[Trajectory], train: list[Trajectory]) -> list[str]:
    """Test trajectories whose task (env, family, seed) or first observation occurs in training."""
    def task(t: Trajectory):
        return (t.env, t.meta.get("task"), t.meta.get("seed"))

    seen_tasks = {task(t) for t in train if t.meta.get("task") is not None}
    seen_starts = {(t.env, t.messages[0].content) for t in train}
    return [t.id for t in test if task(t) in seen_tasks or (t.env, t.messages[0].content) in seen_starts]


# ---- scoring -------------------------------------------------------------------------------
@dataclass
class _Trajectory:
    """A test trajectory under scoring: its tokens, the KV cache of its teacher-forced pass."""

    trajectory: Trajectory
    group: str
    canonical: Callable[[str | None], str | None]
    criteria: dict[int, str]
    ids: list[int]
    spans: list[tuple[int, int]]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    nll: list[float] | None = None


@torch.inference_mode()
def _teacher_forced(policy: Policy, item: _Trajectory) -> None:
    """One forward over the trajectory up to its last scored turn: each turn's mean NLL (the LM
    head runs only where a turn's tokens are predicted), and the KV cache of the history."""
    model = policy.model
    device = next(model.parameters()).device
    end = max(e for s, e in item.spans)
    ids = torch.tensor([item.ids[:end]], device=device)
    positions = torch.cat([torch.arange(s - 1, e - 1) for s, e in item.spans]).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=positions)
    logprobs = out.logits[0].float().log_softmax(-1)
    targets = ids[0, positions + 1]
    token_nll = -logprobs.gather(1, targets[:, None])[:, 0]
    item.nll, at = [], 0
    for s, e in item.spans:
        item.nll.append(float(token_nll[at:at + e - s].mean()))
        at += e - s
    item.ids = item.ids[:end]
    item.kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]


def score(model, tokenizer, items: list[tuple[Trajectory, str, Callable, dict[int, str]]],
          batch_size: int = 16, max_new_tokens: int = 160, chunk_steps: int | None = None,
          policy: Policy | None = None, segment: int | None = None) -> list[dict[str, Any]]:
    """Score every step of ``items`` (trajectory, group, canonical-action function, criteria).

    Trajectories are processed a chunk at a time (about ``chunk_steps`` steps, default
    ``4 * batch_size``, so the KV caches held at once stay bounded); within a chunk the steps
    are sorted by prompt length and generated for ``batch_size`` at a time, each row reusing
    its trajectory's cache; with ``segment``, rows that have written their action leave the
    batch every ``segment`` tokens (see :class:`~atlas.rollout.Policy`).

    Returns:
        One record per scored step: env, group, task id, step, criterion, the expert's and the
        model's action (canonical), ``correct``, ``nll``, the response.
    """
    policy = policy or Policy(model, tokenizer, max_new_tokens=max_new_tokens, segment=segment)
    chunk_steps = chunk_steps or 4 * batch_size
    records: list[dict[str, Any]] = []
    chunks, chunk, size = [], [], 0
    for it in items:
        chunk.append(it)
        size += len(scored_steps(it[0]))
        if size >= chunk_steps:
            chunks.append(chunk)
            chunk, size = [], 0
    if chunk:
        chunks.append(chunk)
    bar = tqdm(total=sum(len(scored_steps(it[0])) for it in items), desc="steps", unit="step",
               disable=None)
    for chunk in chunks:
        work = []
        for t, group, canonical, criteria in chunk:
            tok = tokenize_steps(t, tokenizer)
            item = _Trajectory(t, group, canonical, criteria, tok.input_ids, tok.step_spans)
            _teacher_forced(policy, item)
            assistant = [k for k, m in enumerate(t.messages) if m.role == "assistant"]
            chat = t.chat()
            offset = 1 if t.system else 0  # chat() puts the system prompt first
            for step in scored_steps(t):
                key = f"step-eval/{t.id}/{step}"
                policy.cache[key] = (item.ids, item.kv)  # shared: no copy per step
                prompt = policy.prompt_ids(chat[:offset + assistant[step]])
                work.append((len(prompt), key, prompt, item, step))
        work.sort(key=lambda w: w[0])
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            responses = policy.generate([w[2] for w in batch], [w[1] for w in batch],
                                        remember=False)
            for (_, key, _, item, step), response in zip(batch, responses):
                t = item.trajectory
                expert = item.canonical(parse_action(t.steps[step].message.content))
                action = item.canonical(parse_action(response))
                records.append({
                    "env": t.env, "group": item.group, "task": t.id, "step": step,
                    "criterion": item.criteria.get(step, UNMARKED),
                    "expert_action": expert, "action": action,
                    "correct": action is not None and action == expert,
                    "nll": round(item.nll[step], 5), "response": response})
            bar.update(len(batch))
        for w in work:
            policy.forget(w[1])
    bar.close()
    return records


# ---- summaries -----------------------------------------------------------------------------
def units(records: list[dict[str, Any]], metric: str, group: str | None = None
          ) -> dict[str, dict[str, tuple[float, float]]]:
    """env -> task -> (sum, steps) of ``correct`` or ``nll``: the bootstrap's clusters."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for r in records:
        if group is not None and r["group"] != group:
            continue
        num, den = out.setdefault(r["env"], {}).get(r["task"], (0.0, 0.0))
        out[r["env"]][r["task"]] = (num + float(r[metric]), den + 1.0)
    return out


def summarize(records: list[dict[str, Any]], groups: dict[str, str]) -> dict[str, Any]:
    """Per environment: steps, accuracy (%) and NLL with bootstrap 95% intervals over tasks,
    accuracy by criterion; per group: the mean over its environments, with its interval."""
    per_env: dict[str, Any] = {}
    for env, group in groups.items():
        rs = [r for r in records if r["env"] == env]
        if not rs:
            continue
        acc = Ratio.of(units(rs, "correct")).interval().scaled(100)
        nll = Ratio.of(units(rs, "nll")).interval()
        by = {}
        for c in CRITERIA:
            cs = [r for r in rs if r["criterion"] == c]
            if cs:
                by[c] = {"steps": len(cs), "accuracy": round(100 * sum(r["correct"] for r in cs)
                                                             / len(cs), 2)}
        per_env[env] = {"group": group, "tasks": len({r["task"] for r in rs}), "steps": len(rs),
                        "accuracy": acc.to_json(2), "nll": nll.to_json(4),
                        "no_action": sum(r["action"] is None for r in rs), "by_criterion": by}
    averages = {}
    for group in dict.fromkeys(groups.values()):
        rs = [r for r in records if r["group"] == group]
        if not rs:
            continue
        by = {}
        for c in CRITERIA:
            cs = [r for r in rs if r["criterion"] == c]
            if cs:
                by[c] = {"steps": len(cs),
                         "accuracy": Ratio.of(units(cs, "correct")).interval().scaled(100).to_json(2)}
        averages[group] = {
            "steps": len(rs), "environments": len({r["env"] for r in rs}),
            "accuracy": Ratio.of(units(rs, "correct")).interval().scaled(100).to_json(2),
            "nll": Ratio.of(units(rs, "nll")).interval().to_json(4), "by_criterion": by}
    return {"environments": per_env, "averages": averages}


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], group: str,
                      metric: str = "correct") -> dict[str, Any]:
    """A - B on the steps both scored (same tasks), with a paired-bootstrap 95% interval."""
    est = Ratio.paired(units(a, metric, group), units(b, metric, group)).interval()
    est = est.scaled(100) if metric == "correct" else est
    return {**est.to_json(2 if metric == "correct" else 4), "resolved": est.excludes_zero()}


def format_table(steps: dict[str, Any]) -> str:
    """The step-level results as plain text: accuracy (%) and NLL with 95% intervals."""
    lines = [f"{'environment':<16}{'group':<10}{'tasks':>6}{'steps':>7}  {'step accuracy':<24}"
             f"{'NLL':<24}{'no action':>9}"]
    for name, r in steps["environments"].items():
        lines.append(f"{name:<16}{r['group']:<10}{r['tasks']:>6}{r['steps']:>7}  "
                     f"{_fmt(r['accuracy']):<24}{_fmt(r['nll'], '.3f'):<24}{r['no_action']:>9}")
    for group, avg in steps["averages"].items():
        lines.append(f"{group + ' avg':<32}{avg['steps']:>7}  {_fmt(avg['accuracy']):<24}"
                     f"{_fmt(avg['nll'], '.3f'):<24}")
    for group, avg in steps["averages"].items():  # by the heuristic oracle's criterion
        lines.append(f"{group} by criterion: " + "; ".join(
            f"{c} {_fmt(v['accuracy'])} ({v['steps']} steps)" for c, v in avg["by_criterion"].items()))
    return "\n".join(lines)


def _fmt(est: dict[str, float], spec: str = ".1f") -> str:
    return f"{est['value']:{spec}} [{est['low']:{spec}}, {est['high']:{spec}}]"


# ---- the suite -----------------------------------------------------------------------------
def load_suite(envs: dict[str, tuple[str, DictConfig]], cfg: DictConfig
               ) -> tuple[list[tuple[Trajectory, str, Callable, dict[int, str]]], dict[str, str]]:
    """The test trajectories of every environment of the eval suite, with their criteria.

    Returns the scoring items and, per environment, its test-set file."""
    items, files = [], {}
    for name, (group, env_cfg) in envs.items():
        # one count for all, or per environment name, else per group (held_in / held_out)
        n = cfg.tasks if isinstance(cfg.tasks, int) else (cfg.tasks or {}).get(
            name, (cfg.tasks or {}).get(group, 0))
        if not n:
            continue
        if n < 1:
            raise ValueError(f"eval.steps.tasks for {name} must be >= 1, got {n}")
        trajectories, path = test_trajectories(env_cfg, n, cfg.seed, cfg.mistake_fraction)
        files[name] = str(path)
        canonical = get_class(env_cfg._target_).canonical_action
        for t, crit in zip(trajectories, step_criteria(trajectories, cfg.criteria_ratio)):
            items.append((t, group, canonical, crit))
    return items, files


def suite_key(items, cfg: DictConfig, tokenizer) -> str:
    """What fixes a model's step records besides its weights: the steps and the decoding."""
    payload = json.dumps([[t.fingerprint() for t, *_ in items], cfg.max_new_tokens,
                          tokenizer.chat_template, TEST_SET_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

