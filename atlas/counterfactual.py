"""Environment-grounded criticality of expert steps: what does departing from the expert cost?

A step of an expert trajectory is *critical* when leaving the expert's action there is costly.
For step ``i`` of a trajectory generated from an environment, :func:`step_costs`

1. resets the environment to the trajectory's task and replays the recorded actions of steps
   ``0..i-1``, checking every observation against the recorded one (a mismatch means the data
   no longer matches the simulator, and raises :class:`ReplayMismatchError`);
2. takes a plausible wrong action, ``env.mistake(rng)``, instead of the recorded action ``i``,
   then lets the expert finish: ``env.expert_step(after_mistake=wrong)`` once, then
   ``env.expert_step()`` until the episode ends or the turn budget is spent;
3. scores the probe as (turns from step ``i`` to the end in the counterfactual, the wrong one
   included) - (turns the recorded trajectory took from step ``i`` to its end).

Costs are averaged over ``probes`` deviations, each with its own seeded ``rng``.

Choices:
    * Budget: the counterfactual continuation may take ``budget`` turns, the wrong one
      included; by default the environment's ``max_turns`` (the cap the expert data was
      generated under), the same for every step of the trajectory, so that the failure cost
      below is one constant per environment. The environment's own limits (Wordle's 6
      guesses, a maze's or an engine's step limit) still apply, counting the replayed turns.
    * Failure: a counterfactual that ends unsolved (the deviation broke the task, or the
      budget ran out) costs ``budget + 1``: more than any solved counterfactual can cost
      (at most ``budget - 1``, since the recorded remainder is at least one turn).
    * A deviation that happens to solve the task at once may cost less than 0.
    * Replay mirrors the generator (:func:`atlas.data.generate.expert_turns`): the expert is
      asked for its step before each replayed action, because some experts are stateful
      (BabyAI's bot replans once per engine step and must see every step).
    * The recorded trajectory may contain an injected mistake (``meta["mistake_step"]``): it is
      replayed like any other step. The recorded remainder of every step up to it includes the
      mistake and its repair, which the expert's counterfactual finish skips, so those steps
      cost that much less (BabyAI: about 2; a rejected gold-path mistake: 1).
    * Gold-path experts (an environment with a ``gold`` list of actions that its expert
      replays: ScienceWorld, TextWorld-Express) get the recorded path as their gold path
      after every reset: both engines' gold agents are unseeded, and a ScienceWorld reset of
      the same variation draws another route or target (the blue jay instead of the dove) in
      most resets, so the expert would resume a plan the trajectory never followed, and the
      deviations (drawn from the gold path) would differ between runs.
    * Observations match when equal or when they hold the same words in another order:
      ScienceWorld lists a room's objects in an order that varies between resets of the same
      variation (a wood cup of blue paint before or after one of yellow paint). A word added,
      lost or changed is a mismatch.
    * Before probing, the whole recorded episode is replayed once: it must end (``done``) at
      its last step, solved, with ``meta["final_observation"]`` when recorded. Where the
      expert does not propose the recorded action at a step that was not the injected
      mistake, a warning says so: costs there compare the expert with a path it would not
      take.
    * Cost is O(n^2 * probes) environment steps for a trajectory of n steps: there is no
      general way to snapshot an engine's state (ScienceWorld and TextWorld-Express live in a
      JVM), so every probe resets and replays.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from atlas.data.generate import observation_turn
from atlas.data.trajectory import Trajectory
from atlas.envs.base import Environment, Feedback, Task
from atlas.rollout import parse_action

log = logging.getLogger(__name__)

#: Meta keys a trajectory needs to be replayed (the generator writes them).
REQUIRED_META = ("task", "seed", "split")
WORD = re.compile(r"\w+")


class ReplayMismatchError(RuntimeError):
    """A recorded trajectory does not replay in its environment: data and simulator differ."""


@dataclass(frozen=True)
class Probe:
    """One counterfactual deviation at one step.

    Attributes:
        step: Step index where the expert's action was replaced.
        wrong_action: The action taken instead (``env.mistake``).
        turns: Turns from the step to the end of the counterfactual, the wrong one included.
        recorded_turns: Turns the recorded trajectory took from the step to its end.
        solved: Whether the counterfactual episode ended solved within the budget.
        cost: ``turns - recorded_turns`` when solved, else the failure cost ``budget + 1``.
    """

    step: int
    wrong_action: str
    turns: int
    recorded_turns: int
    solved: bool
    cost: float


def task_of(trajectory: Trajectory) -> Task:
    """The task a generated trajectory was played on.

    Raises:
        ValueError: naming the trajectory and the meta keys it lacks (e.g. FireAct data, which
            has no simulator).
    """
    missing = [k for k in REQUIRED_META if trajectory.meta.get(k) is None]
    if missing:
        raise ValueError(f"trajectory {trajectory.id}: meta lacks {', '.join(missing)}; "
                         "counterfactual costs need a trajectory generated from a simulator "
                         "(meta task, seed, split)")
    meta = trajectory.meta
    return Task(env=trajectory.env, name=str(meta["task"]), seed=int(meta["seed"]),
                split=str(meta["split"]))


def recorded_actions(trajectory: Trajectory, env_cls: type[Environment] = Environment) -> list[str]:
    """The action of every step, as the rollout loop parses it: its ``Action:`` line, or the
    action its tool call stands for (``action_format=tools``).

    Raises:
        ValueError: naming the trajectory and the step whose turn has no action.
    """
    actions = []
    for step in trajectory.steps:
        calls = step.message.tool_calls
        action = (env_cls.call_to_action(calls[0].name, calls[0].args) if calls
                  else parse_action(step.message.content))
        if action is None:
            raise ValueError(f"trajectory {trajectory.id}: step {step.index} has no "
                             "'Action:' line to replay")
        actions.append(action)
    return actions


def _expected_observations(trajectory: Trajectory) -> list[str | None]:
    """The user turn recorded after each step (None where nothing was recorded)."""
    out: list[str | None] = []
    messages = trajectory.messages
    for step in trajectory.steps:
        after = messages[step.message_index + 1] if step.message_index + 1 < len(messages) else None
        out.append(None if after is None or after.role == "assistant" else
                   observation_turn(after.content) if after.role == "tool" else after.content)
    # The generator drops the final observation from the messages and keeps it in meta.
    final = trajectory.meta.get("final_observation")
    if out and out[-1] is None and final is not None:
        out[-1] = observation_turn(final)
    return out


class _Replay:
    """Resets an environment to a trajectory's task and replays its recorded steps."""

    def __init__(self, env: Environment, trajectory: Trajectory):
        self.env, self.trajectory = env, trajectory
        self.task = task_of(trajectory)
        self.actions = recorded_actions(trajectory, type(env))
        self.expected = _expected_observations(trajectory)
        mistake = trajectory.meta.get("mistake_step")
        self.mistake_step = int(mistake) if mistake is not None else None
        # Gold-path experts draw their path anew at every reset (see the module docstring).
        self.gold = ([a for k, a in enumerate(self.actions) if k != self.mistake_step]
                     if isinstance(getattr(env, "gold", None), list) else None)

    def _fail(self, where: str, message: str) -> ReplayMismatchError:
        name = self.trajectory.id + (f" ({self.task.id})" if self.task.id != self.trajectory.id
                                     else "")
        return ReplayMismatchError(
            f"trajectory {name}, {where}: {message}; the data no longer matches the simulator "
            "(regenerate it with atlas.data.generate)")

    def run(self, steps: int) -> tuple[list[str], Feedback | None]:
        """Reset, then replay the first ``steps`` recorded actions (checking each observation).

        Returns:
            The expert's proposed action before each replayed step (for the drift warning), and
            the last step's feedback (None when no step was replayed).
        """
        first = self.env.reset(self.task)
        if self.gold is not None:
            self.env.gold = list(self.gold)
        if not _same(first, self.trajectory.messages[0].content):
            raise self._fail("reset", "the first observation "
                             + _differ(first, self.trajectory.messages[0].content))
        proposed, feedback = [], None
        for k in range(steps):
            after = self.actions[k - 1] if k and k - 1 == self.mistake_step else None
            proposed.append(self.env.expert_step(after_mistake=after)[1])
            feedback = self.env.step(self.actions[k])
            self.check(k, feedback)
        return proposed, feedback

    def check(self, k: int, feedback: Feedback) -> None:
        """Raise unless replayed step ``k`` gave the recorded observation and episode state."""
        expected, got = self.expected[k], observation_turn(feedback.observation)
        if expected is not None and not _same(got, expected):
            raise self._fail(f"step {k} ({self.actions[k]!r})",
                             "the observation " + _differ(got, expected))
        last = k == len(self.actions) - 1
        if feedback.done and not last:
            raise self._fail(f"step {k} ({self.actions[k]!r})",
                             f"the episode ended, but {len(self.actions) - 1 - k} more steps "
                             "are recorded")
        if last and not feedback.done:
            raise self._fail(f"step {k} ({self.actions[k]!r})",
                             "the recorded last step did not end the episode")


def _same(got: str, recorded: str) -> bool:
    """Equal, or the same words in another order (see the module docstring)."""
    return got == recorded or Counter(WORD.findall(got)) == Counter(WORD.findall(recorded))


def _differ(got: str, recorded: str, context: int = 60) -> str:
    """Where two texts first differ, with a little context (observations run long)."""
    at = next((i for i, (a, b) in enumerate(zip(got, recorded)) if a != b),
              min(len(got), len(recorded)))
    start = max(0, at - context)

    def cut(text: str) -> str:
        return ("..." if start else "") + repr(text[start:at + context]) + (
            "..." if len(text) > at + context else "")

    return (f"differs from the recorded one at character {at}: got {cut(got)}, "
            f"recorded {cut(recorded)}")


def _rng(seed: int, trajectory_id: str, step: int, probe: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: the same stream in every process.
    return random.Random(f"{seed}:{trajectory_id}:{step}:{probe}")


def probe_steps(env: Environment, trajectory: Trajectory, probes: int = 2, seed: int = 0,
                budget: int | None = None) -> list[list[Probe]]:
    """Every counterfactual deviation of every step, for inspection (see :func:`step_costs`).

    Returns:
        One list of ``probes`` :class:`Probe` per step of the trajectory.

    Raises:
        ValueError: the trajectory lacks meta task/seed/split, a step has no action, the
            recorded episode is not solved, or ``probes``/``budget`` are below 1.
        ReplayMismatchError: a replayed observation differs from the recorded one.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    budget = env.max_turns if budget is None else budget
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    replay = _Replay(env, trajectory)
    n = len(replay.actions)

    # Once in full: the recorded episode must end where the data says, solved.
    proposed, last = replay.run(n)
    if not last.success:
        raise ValueError(f"trajectory {trajectory.id}: the recorded episode is not solved; "
                         "counterfactual costs compare deviations with a solved expert episode")
    drift = [k for k, (p, a) in enumerate(zip(proposed, replay.actions))
             if k != replay.mistake_step and p != a]
    if drift:
        log.warning("trajectory %s: the expert now proposes other actions than recorded at "
                    "steps %s; costs there compare the expert with a path it would not take",
                    trajectory.id, drift)

    failure = float(budget + 1)
    out = []
    for i in range(n):
        recorded = n - i
        row = []
        for p in range(probes):
            replay.run(i)
            wrong = env.mistake(_rng(seed, trajectory.id, i, p))[1]
            feedback, turns = env.step(wrong), 1
            while not feedback.done and turns < budget:
                action = env.expert_step(after_mistake=wrong if turns == 1 else None)[1]
                feedback, turns = env.step(action), turns + 1
            solved = bool(feedback.done and feedback.success)
            row.append(Probe(step=i, wrong_action=wrong, turns=turns, recorded_turns=recorded,
                             solved=solved, cost=float(turns - recorded) if solved else failure))
        out.append(row)
    return out


def step_costs(env: Environment, trajectory: Trajectory, probes: int = 2, seed: int = 0,
               budget: int | None = None) -> list[float]:
    """One cost per step of the trajectory (len == trajectory.num_steps); higher = more critical.

    Args:
        env: The environment the trajectory was generated from (``trajectory.env``).
        trajectory: A solved trajectory from :mod:`atlas.data.generate` (meta task, seed, split).
        probes: Deviations per step; the cost is their mean.
        seed: Seeds the deviations, together with the trajectory id, the step and the probe.
        budget: Turns the counterfactual may take from the deviated step, the wrong one
            included; default ``env.max_turns``. An unsolved counterfactual costs
            ``budget + 1``.

    Returns:
        Per step, the mean over probes of (counterfactual turns to the end) - (recorded turns
        to the end), or ``budget + 1`` for a probe that ended unsolved.

    Raises:
        ValueError: the trajectory lacks meta task/seed/split, a step has no action, or the
            recorded episode is not solved.
        ReplayMismatchError: a replayed observation differs from the recorded one.
    """
    return [sum(p.cost for p in row) / len(row)
            for row in probe_steps(env, trajectory, probes, seed, budget)]


EnvSpec = Any  # an Environment, a config mapping with _target_, or a path to such a YAML file


class CounterfactualScorer:
    """Counterfactual step costs for many trajectories, one environment per name.

    Environments are built lazily, the first time a trajectory needs one, and reused for every
    trajectory of that name (ScienceWorld and TextWorld-Express start a JVM each). The ones the
    scorer built are closed at the end of each call (and by :meth:`close`); instances passed in
    belong to the caller and are left open.

    Args:
        envs: Environment name -> an :class:`Environment`, a config (``_target_`` mapping or
            DictConfig, instantiated with ``hydra.utils.instantiate``), or the path of such a
            YAML file (e.g. ``conf/env/babyai.yaml``).
        probes: Deviations per step (see :func:`step_costs`).
        seed: Seed of the deviations.
        budget: Turn budget of a counterfactual; default each environment's ``max_turns``.
    """

    def __init__(self, envs: Mapping[str, EnvSpec], probes: int = 2, seed: int = 0,
                 budget: int | None = None):
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self.specs = dict(envs)
        self.probes, self.seed, self.budget = probes, seed, budget
        self._built: dict[str, Environment] = {}

    def check(self, trajectory: Trajectory) -> None:
        """Raise a ValueError naming the trajectory when it cannot be scored here."""
        if trajectory.env not in self.specs:
            raise ValueError(f"trajectory {trajectory.id}: no environment {trajectory.env!r} "
                             f"to replay it in (have: {sorted(self.specs) or 'none'})")
        task_of(trajectory)

    def env(self, name: str) -> Environment:
        """The environment for ``name``, built on first use."""
        spec = self.specs[name]
        if isinstance(spec, Environment):
            return spec
        if name not in self._built:
            from hydra.utils import instantiate
            from omegaconf import OmegaConf

            config = OmegaConf.load(spec) if isinstance(spec, (str, Path)) else spec
            env = instantiate(config)
            if not isinstance(env, Environment):
                raise ValueError(f"environment {name!r}: config built a "
                                 f"{type(env).__name__}, not an Environment")
            self._built[name] = env
        return self._built[name]

    def __call__(self, trajectories: Iterable[Trajectory]) -> list[list[float]]:
        """Costs of every step of every trajectory, in order.

        Raises:
            ValueError: before any work, for the first trajectory without an environment or
                without meta task/seed/split.
            ReplayMismatchError: a trajectory does not replay in its environment.
        """
        from atlas.console import progress

        trajectories = list(trajectories)
        for trajectory in trajectories:  # fail before starting a JVM
            self.check(trajectory)
        try:
            return [step_costs(self.env(t.env), t, self.probes, self.seed, self.budget)
                    for t in progress(iterable=trajectories, desc="counterfactual",
                                      unit="trajectory")]
        finally:
            self.close()

    def close(self) -> None:
        """Close the environments this scorer built (a later call builds them again)."""
        built, self._built = self._built, {}
        for env in built.values():
            env.close()

    def __enter__(self) -> "CounterfactualScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
