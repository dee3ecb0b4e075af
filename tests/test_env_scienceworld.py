"""ScienceWorld environment on the real engine: expert, mistakes, splits, observations, config.

One JVM serves the whole module (starting one takes ~1 s and ~0.3-1 GB).
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from atlas.envs.base import Task
from atlas.envs.scienceworld import NO_MATCH, compact, parse
from tests.helpers import CONF, check_recovery, make_env, play_gold_path as play


@pytest.fixture(scope="module")
def env():
    environment = make_env("scienceworld")
    yield environment
    environment.close()


def test_config_composes_with_short_families():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("generate", overrides=["env=scienceworld"])
    assert cfg.env._target_ == "atlas.envs.scienceworld.ScienceWorldEnv"
    assert cfg.env.name == "scienceworld" and cfg.env.max_turns == 30
    assert len(cfg.env.tasks) == len(set(cfg.env.tasks)) >= 4


def test_expert_solves_first_test_tasks_of_every_family(env):
    for task in env.tasks("test", 2 * len(env.task_names)):
        fb, turns = play(env, task)
        assert fb.success and fb.score == 1.0, (task.id, turns[-1])
        assert len(turns) <= 20, f"{task.id}: {len(turns)} turns, the defaults should be short"


def test_expert_recovers_from_an_injected_mistake(env):
    for task in env.tasks("test", len(env.task_names), offset=2 * len(env.task_names)):
        check_recovery(env, task, rejection=NO_MATCH)


@pytest.mark.parametrize("bad", ["", "fly to the moon", "Action: ???", "  \n ", "focus on"])
def test_bad_actions_are_answered_not_raised(env, bad):
    env.reset(env.tasks("train", 1)[0])
    fb = env.step(bad)
    assert fb.observation == NO_MATCH and not fb.done and fb.score == 0.0
    assert env.position == 0  # no gold step was taken, so the expert still holds


def test_wrong_focus_fails_the_episode_with_score_zero(env):
    env.reset(env.tasks("train", 1, offset=4)[0])  # a lifespan task: focus decides it
    fb = env.step("focus on agent")
    assert fb.done and not fb.success and fb.score == 0.0  # the engine says -1; clipped
    assert env.step(env.expert_step()[1]).observation == "The episode is over."


def test_steps_skip_the_valid_action_listing(env, monkeypatch):
    def listing(*_):
        raise AssertionError("step listed the valid actions")

    monkeypatch.setattr(env._engine, "get_valid_action_object_combinations", listing)
    monkeypatch.setattr(env._engine, "step", listing)
    task = env.tasks("test", 1, offset=4)[0]
    assert play(env, task)[0].success


def test_splits_never_share_a_variation(env):
    n = 40 * len(env.task_names)
    train, test = env.tasks("train", n), env.tasks("test", n)
    assert not {(t.name, t.seed) for t in train} & {(t.name, t.seed) for t in test}
    for name in env.task_names:
        assert not set(env.variations(name, "train")) & set(env.variations(name, "test"))
    with pytest.raises(ValueError, match="not in the test split"):
        env.reset(Task("scienceworld", train[0].name, train[0].seed, "test"))


def test_tasks_are_deterministic_and_cycle_families(env):
    assert env.tasks("test", 30) == env.tasks("test", 30)
    assert env.tasks("test", 10, offset=5) == env.tasks("test", 15)[5:]
    assert [t.name for t in env.tasks("train", 7)] == list(env.task_names)[:7]
    first = env.tasks("test", 1)[0]
    assert first.seed == env.variations(first.name, "test")[0]


def test_observations_are_compact_and_free_of_engine_noise(env, capfd):
    task = env.tasks("test", 1)[0]
    fb, turns = play(env, task)
    first = env.reset(task)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing from the JVM reaches the console
    texts = [first] + [fb.observation for _, _, fb in turns]
    for text in texts:
        assert "\t" not in text and "the agent" not in text and "py4j" not in text.lower()
        assert not any(w in text for w in ("Exception", "ERROR", "WARN"))
    assert first.startswith("Task: Your task is to") and "door to " in first
    assert all(len(t) < 1200 for t in texts)


def test_compact_folds_room_listings():
    raw = ("This room is called the hallway. In it, you see: \n\tthe agent\n\ta substance called "
           "air\n\ta picture\nYou also see:\n\tA door to the art studio (that is closed)\n\t"
           "A door to the kitchen (that is open)")
    assert compact(raw) == ("This room is called the hallway. In it, you see: a picture\n"
                            "You also see: door to art studio (closed), door to kitchen (open)")
    assert parse("move egg blue jay egg in inventory to red box") == (
        "move", "egg blue jay egg", "red box")
    assert parse("connect battery anode to black wire terminal 1") == (
        "connect", "battery anode", "black wire terminal 1")


def test_thoughts_carry_the_plan_and_the_state(env):
    task = env.tasks("test", 4)[3]  # find-animal: doors, a focus, a pick-up and a box
    fb, turns = play(env, task)
    plan = turns[0][0]
    focus = next(parse(a)[1] for a in env.gold if a.startswith("focus on"))
    box = next(parse(a)[2] for a in env.gold if a.startswith("move "))
    assert plan.startswith("Plan to find") and focus in plan and box in plan
    rooms = {parse(a)[1] for a in env.gold if a.startswith("go to ")}
    for (thought, action, _), (_, _, seen) in zip(turns[1:], turns):
        if action.startswith("go to "):
            assert "I am in the" in thought or seen.observation.split(".")[0] in thought
            assert parse(action)[1] in thought and parse(action)[1] in rooms
        if action.startswith("focus on"):
            assert "contains" in thought and env.goal in thought
    assert len({t for t, _, _ in turns}) == len(turns)  # no canned repeats
