"""Counterfactual step costs on the shipped expert trajectories: one cost per step, seeded and
deterministic, the costs each environment's deviations should have, the failure cost, and clear
errors for data that does not replay (tampered observations, no simulator)."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from atlas.counterfactual import (CounterfactualScorer, ReplayMismatchError, probe_steps,
                                  recorded_actions, step_costs)
from atlas.data.formats import read_trajectories
from atlas.data.generate import expert_episode
from tests.helpers import CONF, ROOT, make_env

DATA = ROOT / "atlas" / "data"


def load_env(name: str):
    return make_env(name)


@pytest.fixture(scope="module")
def data():
    """The shipped trajectories of every default environment, by id."""
    out = {}
    for name in ("babyai", "scienceworld", "twx", "wordle"):
        out.update({t.id: t for t in read_trajectories(DATA / "default" / f"{name}.jsonl")})
    return out


@pytest.fixture(scope="module")
def babyai():
    env = load_env("babyai")
    yield env
    env.close()


@pytest.fixture(scope="module")
def wordle():
    return load_env("wordle")


def lower_bound(trajectory) -> list[int]:
    """The least a step can cost: the wrong turn itself solves the task at once."""
    n = trajectory.num_steps
    return [1 - (n - i) for i in range(n)]


def tamper(trajectory, message_index: int, text: str):
    messages = [dataclasses.replace(m) for m in trajectory.messages]
    messages[message_index] = dataclasses.replace(messages[message_index], content=text)
    return dataclasses.replace(trajectory, messages=messages, meta=dict(trajectory.meta))


# ---- BabyAI: a wrong move or turn costs about two turns ------------------------------------------
@pytest.mark.parametrize("tid", ["babyai/BabyAI-GoToLocal-v0/train/15",
                                 "babyai/BabyAI-PickupLoc-v0/train/0",
                                 "babyai/BabyAI-OpenDoor-v0/train/1"])
def test_babyai_costs_per_step_deterministic_and_about_two(babyai, data, tid):
    trajectory = data[tid]
    assert trajectory.meta["mistake_step"] is None
    costs = step_costs(babyai, trajectory)
    assert len(costs) == trajectory.num_steps
    assert costs == step_costs(babyai, trajectory)  # same seed, same deviations, same costs
    # The bot's path is shortest, so no deviation saves a turn; undoing one takes at most a
    # turn back and a step back (turning around: two turns).
    assert all(0 <= c <= 3 for c in costs), costs
    assert sum(costs) / len(costs) >= 1.5, costs
    # The last action ends the mission: any other one wastes at least that turn ("go forward"
    # into the object to pick up leaves the agent in place: +1; a turn must be undone: +2).
    assert costs[-1] >= 1, costs


def test_recorded_mistake_replays_and_lowers_earlier_costs(babyai, data):
    """The recorded injected mistake is replayed as it happened; before it, the expert's own
    finish skips the recorded detour, so deviating there costs less than elsewhere."""
    trajectory = data["babyai/BabyAI-OpenDoor-v0/train/0"]
    m = trajectory.meta["mistake_step"]
    rows = probe_steps(babyai, trajectory)
    costs = [sum(p.cost for p in row) / len(row) for row in rows]
    assert all(c >= b for c, b in zip(costs, lower_bound(trajectory)))
    assert all(p.solved for row in rows for p in row)
    assert max(costs[:m + 1]) <= 0 < min(costs[m + 1:]), costs
    assert [p.recorded_turns for p in rows[m]] == [trajectory.num_steps - m] * 2


def test_seed_and_probes_pick_the_deviations(babyai, data):
    trajectory = data["babyai/BabyAI-GoToLocal-v0/train/15"]
    wrong = [[p.wrong_action for p in row] for row in probe_steps(babyai, trajectory, probes=3)]
    other = [[p.wrong_action for p in row] for row in probe_steps(babyai, trajectory, 3, seed=1)]
    assert all(len(row) == 3 for row in wrong) and wrong != other
    actions = recorded_actions(trajectory)
    assert all(a not in row for a, row in zip(actions, wrong))  # a deviation, never the expert


# ---- Wordle: the failure cost --------------------------------------------------------------------
def test_wordle_deviating_from_the_sixth_guess_is_irrecoverable(wordle, data):
    """Solved on guess 6: a wrong last guess leaves no guess, so the step gets budget + 1."""
    trajectory = data["wordle/wordle/train/663"]
    assert trajectory.meta["final_observation"].startswith("Guess 6/6")
    rows = probe_steps(wordle, trajectory)
    assert [p.solved for p in rows[-1]] == [False, False]
    costs = step_costs(wordle, trajectory)
    assert costs[-1] == wordle.max_turns + 1
    assert max(costs[:-1]) < wordle.max_turns + 1  # earlier deviations leave guesses to recover
    assert all(c >= b for c, b in zip(costs, lower_bound(trajectory)))


def test_wordle_budget_bounds_the_counterfactual(wordle, data):
    trajectory = data["wordle/wordle/train/1584"]
    full = step_costs(wordle, trajectory)
    assert max(full) <= 1 and full[-1] == 1  # a wasted guess, then the answer
    # One turn is only the wrong guess: never solved, every step costs budget + 1.
    assert step_costs(wordle, trajectory, budget=1) == [2.0] * trajectory.num_steps
    with pytest.raises(ValueError, match="budget"):
        step_costs(wordle, trajectory, budget=0)
    with pytest.raises(ValueError, match="probes"):
        step_costs(wordle, trajectory, probes=0)


# ---- Maze: detours and bumps ---------------------------------------------------------------------
def test_maze_detour_costs_two_and_an_edge_bump_one():
    env = load_env("maze")
    for task in env.tasks("train", 3):
        trajectory = expert_episode(env, task)
        costs = step_costs(env, trajectory)
        # A detour onto a cell one move farther costs the move and the way back; a bump into
        # the edge (or a diagonal, which is no move) only the wasted turn.
        assert len(costs) == trajectory.num_steps and set(costs) <= {1.0, 1.5, 2.0}, costs


# ---- gold-path engines: a rejected deviation costs exactly one turn ------------------------------
def test_twx_rejected_deviation_costs_one_turn(data):
    plain, mistaken = data["twx/twc/train/1"], data["twx/sorting/train/0"]
    m = mistaken.meta["mistake_step"]
    env = load_env("twx")
    try:
        assert step_costs(env, plain) == [1.0] * plain.num_steps
        # Before the recorded mistake, the expert's own finish skips its wasted turn.
        assert step_costs(env, mistaken) == [0.0] * (m + 1) + [1.0] * (mistaken.num_steps - m - 1)
    finally:
        env.close()


def test_scienceworld_replays_the_recorded_gold_path(data):
    """ScienceWorld draws another gold path (route, animal) at most resets of a variation: the
    costs only stay deterministic, and +1, because the recorded path is the expert's plan."""
    trajectory = data["scienceworld/lifespan-longest-lived/train/0"]
    env = load_env("scienceworld")
    try:
        costs = step_costs(env, trajectory)
        assert costs == [1.0] * trajectory.num_steps
        assert step_costs(env, trajectory) == costs
    finally:
        env.close()


# ---- errors --------------------------------------------------------------------------------------
def test_tampered_observation_names_trajectory_and_step(babyai, data):
    trajectory = data["babyai/BabyAI-OpenDoor-v0/train/1"]
    step = trajectory.steps[1]
    obs = trajectory.messages[step.message_index + 1].content
    bad = tamper(trajectory, step.message_index + 1, obs.replace("You are carrying",
                                                                 "You are holding"))
    with pytest.raises(ReplayMismatchError, match=rf"{trajectory.id}.*step 1 \('go forward'\)"
                                                  r".*differs.*recorded .*You are holding nothing"):
        step_costs(babyai, bad)
    # Reordered (ScienceWorld lists objects in varying order): the same words still match.
    head, _, tail = obs.removeprefix("Observation: ").partition(". ")
    assert head and tail
    reordered = tamper(trajectory, step.message_index + 1, f"Observation: {tail} {head}.")
    assert step_costs(babyai, reordered) == step_costs(babyai, trajectory)
    bad = tamper(trajectory, 0, trajectory.messages[0].content + " Hurry.")
    with pytest.raises(ReplayMismatchError, match=rf"{trajectory.id}.*reset.*Hurry"):
        step_costs(babyai, bad)
    # The final observation lives in meta; the episode must also end at the last step.
    bad = dataclasses.replace(trajectory, meta={**trajectory.meta, "final_observation": "Won."})
    with pytest.raises(ReplayMismatchError, match=rf"step {trajectory.num_steps - 1}"):
        step_costs(babyai, bad)
    short = dataclasses.replace(trajectory, messages=trajectory.messages[:-2],
                                meta={**trajectory.meta, "final_observation": None})
    with pytest.raises(ReplayMismatchError, match="did not end the episode"):
        step_costs(babyai, short)


def test_missing_task_or_simulator_raises_value_error_naming_the_trajectory(babyai, data):
    trajectory = data["babyai/BabyAI-GoToLocal-v0/train/0"]
    no_task = dataclasses.replace(trajectory, id="no-task", meta={
        k: v for k, v in trajectory.meta.items() if k != "task"})
    with pytest.raises(ValueError, match="no-task.*meta lacks task"):
        step_costs(babyai, no_task)
    fireact = read_trajectories(DATA / "fireact" / "fireact_hotpotqa.jsonl")[0]
    scorer = CounterfactualScorer({"babyai": babyai})
    with pytest.raises(ValueError, match=rf"{fireact.id}: no environment 'fireact_hotpotqa'"):
        scorer([trajectory, fireact])
    scorer = CounterfactualScorer({"babyai": babyai, "fireact_hotpotqa": babyai})
    with pytest.raises(ValueError, match=rf"{fireact.id}: meta lacks task, seed, split"):
        scorer([trajectory, fireact])
    no_action = tamper(trajectory, 1, "Thought: hmm")
    with pytest.raises(ValueError, match=rf"{trajectory.id}: step 0 has no 'Action:'"):
        step_costs(babyai, no_action)


# ---- the scorer ----------------------------------------------------------------------------------
def test_scorer_builds_envs_lazily_reuses_and_closes_them(babyai, wordle, data):
    ids = ["babyai/BabyAI-GoToLocal-v0/train/0", "wordle/wordle/train/1584",
           "babyai/BabyAI-PickupLoc-v0/train/0"]
    trajectories = [data[i] for i in ids]
    configs = {"babyai": OmegaConf.load(CONF / "env" / "babyai.yaml"),
               "wordle": str(CONF / "env" / "wordle.yaml"),
               "scienceworld": OmegaConf.load(CONF / "env" / "scienceworld.yaml")}
    built = []
    scorer = CounterfactualScorer(configs, probes=2, seed=0)
    original = scorer.env

    def spy(name):
        env = original(name)
        built.append((name, id(env)))
        return env

    scorer.env = spy
    costs = scorer(trajectories)
    assert costs == [step_costs(babyai, trajectories[0]), step_costs(wordle, trajectories[1]),
                     step_costs(babyai, trajectories[2])]
    # One babyai instance for both babyai trajectories; no JVM for the unused scienceworld.
    assert [n for n, _ in built] == ["babyai", "wordle", "babyai"]
    assert built[0][1] == built[2][1]
    assert scorer._built == {}  # closed at the end of the call

    # An instance passed in belongs to the caller: used as is and left open.
    with CounterfactualScorer({"babyai": babyai}) as scorer:
        assert scorer([trajectories[0]]) == [costs[0]]
    assert babyai._envs  # BabyAIEnv.close() empties it
