"""TextWorld-Express environment on the real engine, for the held-in and held-out configs."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from atlas.envs.base import Task
from atlas.envs.textworld_express import quantity, route
from tests.helpers import CONF, check_recovery, make_env, play_gold_path as play

UNKNOWN = "Unknown action: I'm not sure what you mean."


@pytest.fixture(scope="module", params=["twx", "twx_unseen"])
def env(request):
    environment = make_env(request.param)
    yield environment
    environment.close()


def test_configs_compose_and_hold_out_disjoint_games():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        seen = compose("generate", overrides=["env=twx"]).env
        unseen = compose("generate", overrides=["env=twx_unseen"]).env
    assert seen._target_ == unseen._target_ == "atlas.envs.textworld_express.TextWorldExpressEnv"
    assert (seen.name, unseen.name) == ("twx", "twx_unseen")
    assert not set(seen.tasks) & set(unseen.tasks)
    for cfg in (seen, unseen):
        assert set(cfg.game_params) == set(cfg.tasks)


def test_expert_solves_first_test_tasks_of_every_game(env):
    for task in env.tasks("test", 4 * len(env.task_names)):
        fb, turns = play(env, task)
        assert fb.success and fb.score == 1.0, (task.id, turns[-1])
        assert len(turns) <= 16, f"{task.id}: {len(turns)} turns, the params should keep it short"


def test_expert_recovers_from_an_injected_mistake(env):
    for task in env.tasks("test", 3 * len(env.task_names), offset=4 * len(env.task_names)):
        check_recovery(env, task, rejection=UNKNOWN)


@pytest.mark.parametrize("bad", ["", "fly to the moon", "Action: ???", " \n ", "take"])
def test_bad_actions_are_answered_not_raised(env, bad):
    task = env.tasks("train", 1)[0]
    env.reset(task)
    fb = env.step(bad)
    assert fb.observation == UNKNOWN and not fb.done and fb.score == 0.0 and env.position == 0


def test_a_lost_game_ends_with_score_zero(env):
    name = "simonsays" if "simonsays" in env.task_names else "sorting"
    env.reset(env.tasks("train", len(env.task_names))[env.task_names.index(name)])
    if name == "simonsays":
        wrong = next(a for a in env.valid if a != env.gold[0])  # Simon did not say it
    else:  # the largest item first
        item = env.gold[-1][4:].rsplit(" in ", 1)[0]
        env.step(f"take {item}")
        wrong = f"put {item} in box"
    fb = env.step(wrong)
    assert fb.done and not fb.success and fb.score == 0.0  # the engine says -1; clipped
    assert env.step(env.gold[0]).observation == "The episode is over."


def test_splits_use_separate_folds_and_never_share_an_episode(env):
    n = 3000
    train, test = env.tasks("train", n), env.tasks("test", n)
    assert not {(t.name, t.seed) for t in train} & {(t.name, t.seed) for t in test}
    assert {t.seed for t in train} <= set(env.seeds("train"))
    episodes = {}
    for task in train[:6 * len(env.task_names)] + test[:6 * len(env.task_names)]:
        first = env.reset(task)
        episodes.setdefault(task.split, set()).add((task.name, first, tuple(env.gold)))
    assert not episodes["train"] & episodes["test"]
    with pytest.raises(ValueError, match="not in the test fold"):
        env.reset(Task(env.name, train[0].name, train[0].seed, "test"))


def test_tasks_are_deterministic(env):
    assert env.tasks("test", 40) == env.tasks("test", 40)
    assert env.tasks("train", 10, offset=6) == env.tasks("train", 16)[6:]
    assert [t.name for t in env.tasks("train", len(env.task_names))] == env.task_names


def test_observations_are_clean(env, capfd):
    for task in env.tasks("test", len(env.task_names)):
        first = env.reset(task)
        fb, turns = play(env, task)
        texts = [first] + [f.observation for _, _, f in turns]
        for text in texts:
            assert text == text.strip() and "\n\n" not in text and "py4j" not in text.lower()
            assert not any(w in text for w in ("Exception", "ERROR", "WARN"))
        assert first.startswith("Task: ")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing from the JVM reaches the console


def test_thoughts_carry_game_state(env):
    for task in env.tasks("test", len(env.task_names), offset=len(env.task_names)):
        fb, turns = play(env, task)
        thoughts = " ".join(t for t, _, _ in turns)
        assert turns[0][0].startswith("Plan: ")
        if task.name == "arithmetic":
            problem = next(f.observation for _, a, f in turns if a == "read math problem")
            op, a, b = re.search(r"problem: (\w+) (\d+) \w+ (\d+)", problem).groups()
            answer = {"add": int(a) + int(b), "subtract": int(b) - int(a),
                      "multiply": int(a) * int(b), "divide": int(a) // int(b)}[op]
            assert f"the answer is {answer}" in thoughts
            assert any(a.startswith(f"take {answer} ") for _, a, _ in turns)
        if task.name == "sorting":
            taken = [a[5:] for _, a, _ in turns if a.startswith("take ")]
            assert " < ".join(taken[:2]) in turns[0][0]  # the plan states the order
        if task.name == "twc":
            for put in (a for _, a, _ in turns if a.startswith("put ")):
                item, place = put[4:].split(" in ", 1)
                assert f"{item} -> {place}" in turns[0][0]
        if task.name == "cookingworld":
            assert "The recipe needs" in thoughts and "The recipe says '" in thoughts
        if task.name == "mapreader":
            assert "next on the route" in thoughts and " -> " in thoughts
        if task.name == "simonsays":
            for thought, action, _ in turns:
                assert f"'{action}'" in thought
        if task.name == "coin":
            assert "The coin is here." in thoughts
        assert len({t for t, _, _ in turns}) == len(turns)


def test_quantities_and_routes():
    assert quantity("15kg of cedar") == " (15000 g)" and quantity("2mm of brick") == ""
    assert quantity("43l of oak") == " (43000 ml)" and quantity("6 bananas") == ""
    atlas = ("The map reads:\n The alley connects to the launderette.\n The attic connects to "
             "the parlor.\n The parlor connects to the launderette and attic.\n The launderette "
             "connects to the alley, parlor and side yard.")
    assert route(atlas, "alley", "attic") == ["alley", "launderette", "parlor", "attic"]
