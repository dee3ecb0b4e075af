"""Step-level evaluation (teacher-forced): at every step of an expert trajectory on a *test*
task, the model reads the expert's history up to that step and writes its own turn.

This is the dense metric of agents trained on expert data (Mind2Web's step success rate,
AgentBench-style action accuracy). At the scale a CPU allows, rollouts rarely succeed, while
every step here is a scored sample.

    expert test trajectories (cached)  ->  one teacher-forced forward per trajectory, from
                                           the cache of the opening its environment's share
        -> NLL of each expert turn, and the KV cache of the shared history
        -> greedy turns for all steps, many at once, each attending to its prefix of that
           one cache (:class:`~atlas.prefix_decoding.SharedPrefixDecoder`)
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from atlas.console import progress
from atlas.data.formats import read_trajectories, write_trajectories
from atlas.data.masking import tokenize_steps
from atlas.data.trajectory import Trajectory
from atlas.prefix_decoding import SharedPrefixDecoder
from atlas.rollout import ActionFormat, Policy, common_prefix, has_complete_action
from atlas.stats import Ratio
from atlas.utils import per_environment

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
    read: Callable[[str], str | None]  # a turn's text -> its canonical action
    criteria: dict[int, str]
    ids: list[int]
    spans: list[tuple[int, int]]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    nll: list[float] | None = None


class _SharedOpening:
    """The KV cache of the opening the test trajectories of one environment share (system
    prompt, instructions), computed once and reused by each trajectory's teacher-forced pass:
    on the default suite, ~6k of its 56k tokens."""

    def __init__(self, items: list[_Trajectory]):
        self.length: dict[str, int] = {}  # per environment: tokens all its trajectories share
        first: dict[str, list[int]] = {}
        count = Counter(it.trajectory.env for it in items)
        for it in items:
            env, end = it.trajectory.env, it.spans[0][0] - 1  # the first predicted token stays
            if count[env] < 2:  # a cache used once saves nothing
                continue
            if env not in first:
                first[env], self.length[env] = it.ids, end
            self.length[env] = min(self.length[env], common_prefix(first[env], it.ids[:end + 1]))
        self.ids = first
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.reused_tokens = 0

    def cache(self, model, env: str) -> tuple[int, Any]:
        """How many leading tokens of a trajectory of ``env`` come from the shared cache, and a
        cache holding them (fresh for each call: the forward appends to it)."""
        from transformers import DynamicCache

        n = self.length.get(env, 0)
        if not n:
            return 0, None
        if env not in self.kv:
            device = next(model.parameters()).device
            out = model(input_ids=torch.tensor([self.ids[env][:n]], device=device), use_cache=True)
            self.kv[env] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        else:
            self.reused_tokens += n
        return n, DynamicCache(ddp_cache_data=self.kv[env])


def _tokenized(items, tokenizer) -> list[_Trajectory]:
    """The scoring items as trajectories under scoring, with their tokens."""
    out = []
    for t, group, read, criteria in items:
        tok = tokenize_steps(t, tokenizer)
        out.append(_Trajectory(t, group, read, criteria, tok.input_ids, tok.step_spans))
    return out


@torch.inference_mode()
def _teacher_forced(policy: Policy, item: _Trajectory, opening: _SharedOpening | None = None
                    ) -> None:
    """One forward over the trajectory up to its last scored turn: each turn's mean NLL (the LM
    head runs only where a turn's tokens are predicted), and the KV cache of the history. The
    opening its environment's trajectories share is read from ``opening``'s cache."""
    model = policy.model
    device = next(model.parameters()).device
    end = max(e for s, e in item.spans)
    shared, cache = opening.cache(model, item.trajectory.env) if opening else (0, None)
    ids = torch.tensor([item.ids[:end]], device=device)
    positions = torch.cat([torch.arange(s - 1, e - 1) for s, e in item.spans]).to(device)
    out = model(input_ids=ids[:, shared:], past_key_values=cache, use_cache=True,
                logits_to_keep=positions - shared)
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
          policy: Policy | None = None, segment: int | None = None,
          complete: Callable[[str], bool] = has_complete_action) -> list[dict[str, Any]]:
    """Score every step of ``items`` (trajectory, group, action reader, criteria): the reader
    gives a turn's canonical action (:meth:`atlas.rollout.ActionFormat.reader`), and
    ``complete`` says when a response holds its action (decoding stops there).

    By default (``policy`` None, a model :meth:`SharedPrefixDecoder.supports`) the
    :class:`SharedPrefixDecoder` writes the turns, ``batch_size`` steps at a time, each
    reading its trajectory's one cache. Otherwise the ``policy`` (default: a batched
    :class:`~atlas.rollout.Policy`) does: trajectories are processed a chunk at a time (about
    ``chunk_steps`` steps, default ``4 * batch_size``, so the KV caches held at once stay
    bounded); within a chunk the steps are sorted by prompt length and generated for
    ``batch_size`` at a time, each row holding a copy of its trajectory's cache; with
    ``segment``, rows that have written their action leave the batch every ``segment`` tokens.

    Returns:
        One record per scored step: env, group, task id, step, criterion, the expert's and the
        model's action (canonical), ``correct``, ``nll``, the response.
    """
    if policy is None and SharedPrefixDecoder.supports(model):
        return _score_shared(model, tokenizer, items, batch_size, max_new_tokens, complete)
    policy = policy or Policy(model, tokenizer, max_new_tokens=max_new_tokens, segment=segment,
                              complete=complete)
    chunk_steps = chunk_steps or 4 * batch_size
    records: list[dict[str, Any]] = []
    tokenized = _tokenized(items, tokenizer)
    opening = _SharedOpening(tokenized)
    chunks, chunk, size = [], [], 0
    for item in tokenized:
        chunk.append(item)
        size += len(scored_steps(item.trajectory))
        if size >= chunk_steps:
            chunks.append(chunk)
            chunk, size = [], 0
    if chunk:
        chunks.append(chunk)
    bar = progress(total=sum(len(scored_steps(it[0])) for it in items), desc="steps", unit="step")
    for chunk in chunks:
        work = []
        for item in chunk:
            t = item.trajectory
            _teacher_forced(policy, item, opening)
            for step, prompt in zip(scored_steps(t), _prompts(policy, t)):
                key = f"step-eval/{t.id}/{step}"
                policy.cache[key] = (item.ids, item.kv)  # shared: no copy per step
                work.append((len(prompt), key, prompt, item, step))
        work.sort(key=lambda w: w[0])
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            responses = policy.generate([w[2] for w in batch], [w[1] for w in batch],
                                        remember=False)
            for (_, key, _, item, step), response in zip(batch, responses):
                records.append(_record(item, step, response))
            bar.update(len(batch))
        for w in work:
            policy.forget(w[1])
    bar.close()
    return records



def _judge(t: Trajectory, read: Callable, step: int, response: str) -> dict[str, Any]:
    """The model's action against the expert's, both as the environment's parser reads them."""
    expert = read(t.steps[step].message.as_text())  # its text, and its call where it has one
    action = read(response)
    return {"expert_action": expert, "action": action,
            "correct": action is not None and action == expert}


def _record(item: _Trajectory, step: int, response: str) -> dict[str, Any]:
    t = item.trajectory
    return {"env": t.env, "group": item.group, "task": t.id, "step": step,
            "criterion": item.criteria.get(step, UNMARKED),
            **_judge(t, item.read, step, response),
            "nll": round(item.nll[step], 5), "response": response}


def rescore(records: list[dict[str, Any]], items) -> list[dict[str, Any]]:
    """Cached records judged again with today's parsers: a cache keeps a model's turns (what
    costs minutes), not the verdicts of the action parser it was written under."""
    by_id = {t.id: (t, read) for t, _, read, _ in items}
    return [{**r, **_judge(*by_id[r["task"]], r["step"], r["response"])} for r in records]


def _prompts(policy: Policy, t: Trajectory) -> list[list[int]]:
    """The prompt of each scored step: the expert's history up to it, and the assistant header."""
    assistant = [k for k, m in enumerate(t.messages) if m.role == "assistant"]
    chat = t.chat()
    offset = 1 if t.system else 0  # chat() puts the system prompt first
    return [policy.prompt_ids(chat[:offset + assistant[step]], t.tools) for step in scored_steps(t)]


def _score_shared(model, tokenizer, items, slots: int, max_new_tokens: int,
                  complete: Callable[[str], bool] = has_complete_action) -> list[dict[str, Any]]:
    """``score`` with the :class:`SharedPrefixDecoder`: each trajectory's teacher-forced pass
    is run when the decoder has room for its steps, and its cache is held until they are done."""
    policy = Policy(model, tokenizer, max_new_tokens=max_new_tokens)
    decoder = SharedPrefixDecoder(model, tokenizer, max_new_tokens, slots, policy.stop, policy.pad,
                                  complete)
    tokenized = _tokenized(items, tokenizer)
    opening = _SharedOpening(tokenized)
    bar = progress(total=sum(len(scored_steps(it[0])) for it in items), desc="steps", unit="step")

    def trajectories():
        for k, item in enumerate(tokenized):
            _teacher_forced(policy, item, opening)
            kv, item.kv = item.kv, None  # the decoder holds it while its steps run
            bar.update(len(scored_steps(item.trajectory)))
            yield k, item.ids, kv, _prompts(policy, item.trajectory)

    responses = decoder.decode(trajectories())
    bar.close()
    return [_record(item, step, responses[(k, j)]) for k, item in enumerate(tokenized)
            for j, step in enumerate(scored_steps(item.trajectory))]


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
def load_suite(envs: dict[str, tuple[str, DictConfig]], cfg: DictConfig,
               actions: ActionFormat | None = None
               ) -> tuple[list[tuple[Trajectory, str, Callable, dict[int, str]]], dict[str, str]]:
    """The test trajectories of every environment of the eval suite, with their criteria, in
    the agent's action format (``actions``, default text).

    Returns the scoring items and, per environment, its test-set file."""
    actions = actions or ActionFormat()
    items, files = [], {}
    for name, (group, env_cfg) in envs.items():
        n = per_environment(cfg.tasks or 0, name, group, "eval.steps.tasks")
        if not n:
            continue
        cls = get_class(env_cfg._target_)
        if not cls.has_expert:
            log.warning("eval.steps: %s has no expert to write test trajectories (it is played "
                        "on a server): no step-level evaluation there", name)
            continue
        trajectories, path = test_trajectories(env_cfg, n, cfg.seed, cfg.mistake_fraction)
        files[name] = str(path)
        trajectories = [actions.convert(t, cls) for t in trajectories]
        for t, crit in zip(trajectories, step_criteria(trajectories, cfg.criteria_ratio)):
            items.append((actions.view(t), group, actions.reader(cls), crit))
    return items, files


def suite_key(items, cfg: DictConfig, tokenizer) -> str:
    """What fixes a model's step records besides its weights: the steps and the decoding."""
    payload = json.dumps([[t.fingerprint() for t, *_ in items], cfg.max_new_tokens,
                          tokenizer.chat_template, TEST_SET_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

