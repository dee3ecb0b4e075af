"""BabyAI: the text rendering of hand-made egocentric views, action parsing, the quiet resets, and
the bot's thoughts (plan, subgoal, target position), mistakes, recovery and score."""

from __future__ import annotations

import random
import re

import gymnasium as gym
import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
from minigrid.core.world_object import Key

from atlas.envs.babyai import parse_action, render_view, where
from atlas.envs.base import Task
from tests.helpers import make_env

GOTO, PUTNEXT = "BabyAI-GoToLocal-v0", "BabyAI-PutNextLocal-v0"
MOVES = {"turn left", "turn right", "go forward"}


@pytest.fixture(scope="module")
def env():
    env = make_env("babyai")
    yield env
    env.close()


def view(*cells, fill="empty"):
    """A 7x7x3 egocentric image (image[x, y], the agent at x=3, y=6 facing y=0)."""
    image = np.zeros((7, 7, 3), dtype=np.uint8)
    image[..., 0] = OBJECT_TO_IDX[fill]
    for x, y, kind, color, state in cells:
        image[x, y] = (OBJECT_TO_IDX[kind], COLOR_TO_IDX[color], STATE_TO_IDX[state])
    return image


def play(env, task, mistake_at=None, rng=None):
    """The expert's episode as (observation shown, thought, action, feedback) steps."""
    observation, after, steps = env.reset(task), None, []
    for turn in range(env.max_turns):
        thought, action = env.mistake(rng) if turn == mistake_at else env.expert_step(after)
        fb = env.step(action)
        steps.append((observation, thought, action, fb))
        observation, after = fb.observation, action if turn == mistake_at else None
        if fb.done:
            break
    return steps


def train(name, seed):
    return Task("babyai", name, seed, "train")


def test_render_objects_doors_and_order():
    image = view((2, 4, "ball", "red", "open"), (4, 6, "key", "blue", "open"),
                 (3, 1, "door", "yellow", "closed"), (0, 3, "door", "purple", "locked"),
                 (6, 5, "door", "green", "open"), (5, 2, "wall", "grey", "open"),
                 (1, 1, "floor", "blue", "open"))
    text = render_view(image)
    seen = text.removeprefix("You see ").split(".")[0].split(", ")
    # Nearest rows first, left to right within a row; walls and floor are not objects.
    assert [s.split(" ", 1)[1] for s in seen] == [
        "blue key 1 to your right",
        "open green door 1 step ahead and 3 to your right",
        "red ball 2 steps ahead and 1 to your left",
        "locked purple door 3 steps ahead and 3 to your left",
        "closed yellow door 5 steps ahead"]
    # The door blocks the column ahead before any wall: no wall sentence.
    assert text.endswith("5 steps ahead. You are carrying nothing.") and "wall" not in text


@pytest.mark.parametrize("cells, sentence", [
    ([(3, 2, "wall", "grey", "open")], "There is a wall 4 steps ahead."),
    ([(3, 5, "wall", "grey", "open")], "There is a wall 1 step ahead."),
    ([(3, 0, "wall", "grey", "open")], "There is a wall 6 steps ahead."),
    ([(3, 4, "box", "grey", "open"), (3, 2, "wall", "grey", "open")], None),  # box in the way
    ([(2, 5, "wall", "grey", "open")], None),  # a wall beside the column is not ahead
    ([(3, 4, "unseen", "red", "open"), (3, 2, "wall", "grey", "open")], None),  # hidden
])
def test_render_wall_ahead(cells, sentence):
    text = render_view(view(*cells))
    assert text.count("wall") == (sentence is not None) and (sentence or "") in text


def test_render_empty_and_carrying():
    assert render_view(view()) == "You see no objects. You are carrying nothing."
    assert render_view(view(fill="unseen")) == "You see no objects. You are carrying nothing."
    # minigrid draws the carried object in the agent's own cell: it is carried, not seen.
    image = view((3, 6, "key", "yellow", "open"), (3, 5, "ball", "red", "open"))
    assert render_view(image, Key("yellow")) == ("You see a red ball 1 step ahead. "
                                                 "You are carrying a yellow key.")


@pytest.mark.parametrize("ahead, lateral, text", [
    (2, -1, "2 steps ahead and 1 to your left"), (1, 0, "1 step ahead"),
    (0, 1, "1 to your right"), (0, -3, "3 to your left"), (-2, 0, "2 steps behind"),
    (-1, 2, "1 step behind and 2 to your right"), (0, 0, "here"),
])
def test_where(ahead, lateral, text):
    assert where(ahead, lateral) == text


@pytest.mark.parametrize("text, index", [
    ("turn left", 0), ("Turn Left.", 0), ("'left'", 0), ("turn_right", 1), ("RIGHT!", 1),
    ("forward", 2), ("  Go   Forward ", 2), ("move forward", 2), ("pickup", 3), ("Pick up.", 3),
    ("drop", 4), ("open", 5), ("Open door", 5), ("toggle", 5), ("[toggle]", 5),
    ("dance", None), ("", None), ("go backward", None), ("turn left twice", None),
    ("pick", None),
])
def test_parse_action(text, index):
    assert parse_action(text) == index


def test_invalid_action_does_not_advance_the_engine(env):
    env.reset(train(GOTO, 3))
    env.step(env.expert_step()[1])
    u = env.env.unwrapped
    before = (u.step_count, tuple(u.agent_pos), u.agent_dir)
    fb = env.step("dance")
    assert fb.observation.startswith("Invalid action 'dance'. Valid actions: turn left, ")
    assert not fb.done and fb.score == 0.0 and not fb.success
    assert (u.step_count, tuple(u.agent_pos), u.agent_dir) == before
    # The expert carries on from the unchanged state and solves the episode.
    for _ in range(env.max_turns):
        fb = env.step(env.expert_step()[1])
        if fb.done:
            break
    assert fb.success


def test_sampling_rejected_never_reaches_stdout(env, capsys):
    raw = gym.make(PUTNEXT)
    raw.reset(seed=4)  # a seed whose level generation rejects a sample and prints it
    raw.close()
    assert "Sampling rejected" in capsys.readouterr().out
    observations = [env.reset(train(name, seed)) for name in (PUTNEXT, "BabyAI-OpenDoor-v0")
                    for seed in range(60)]
    assert capsys.readouterr().out == ""
    assert not any("Sampling" in o for o in observations)


@pytest.mark.parametrize("name", ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0",
                                  "BabyAI-OpenDoor-v0", PUTNEXT])
def test_thoughts_state_plan_subgoal_and_target_position(env, name):
    checked = 0
    for seed in range(6):
        steps = play(env, train(name, seed))
        assert steps[-1][3].success
        mission = env.obs["mission"]
        first = steps[0][1]
        assert first.startswith(f"Mission: {mission}. Plan: 1. ")
        # The mission's object (color and type, or type alone) is in the plan.
        obj = re.search(r"(?:(red|green|blue|purple|yellow|grey) )?(ball|key|box|door)", mission)
        assert (f"go next to the {obj[0]}" if obj[1] else f" {obj[2]}") in first
        for observation, thought, _, _ in steps[1:]:
            assert re.match(r"Current subgoal: (go next to the |explore |pick up the object in "
                            r"front\.|drop what I carry\.|open the door\.|unlock )", thought)
        for observation, thought, _, _ in steps:
            said = re.search(r"The (\w+ \w+) is ([\w ]+)\. ", thought)
            if said and said[1] in observation:  # in view now: the rendering agrees
                assert re.search(rf"a (?:\w+ )?{said[1]} {said[2]}[,.]", observation), thought
                checked += 1
    assert checked >= 6


def test_putnext_hand_checked_episode(env):
    """PutNextLocal seed 0, checked step by step against the egocentric geometry."""
    steps = play(env, train(PUTNEXT, 0))
    assert [a for _, _, a, _ in steps] == ["go forward", "go forward", "pick up", "go forward",
                                           "turn right", "drop"]
    assert steps[0][1] == (
        "Mission: put the green ball next to the green key. Plan: 1. go next to the green ball; "
        "2. pick up the object in front; 3. go next to the green key to put it there; "
        "4. drop what I carry. The green ball is 3 steps ahead. Going forward brings me closer.")
    env.reset(train(PUTNEXT, 0))  # the ball is in the agent's column, 3 cells up the view
    assert tuple(env.obs["image"][3, 3]) == (OBJECT_TO_IDX["ball"], COLOR_TO_IDX["green"], 0)
    assert "a green ball 3 steps ahead," in steps[0][0]
    assert steps[2][1].startswith("Current subgoal: pick up the object in front.")
    # Carrying the ball, past the key: it is behind on the right, out of view...
    assert steps[4][1].startswith("Current subgoal: go next to the green key to put it there. "
                                  "The green key is 1 step behind and 1 to your right. I turn "
                                  "right")
    assert "green key" not in steps[4][0] and "carrying a green ball" in steps[4][0]
    # ... so after turning right it is 1 step ahead (old right) and 1 to the right (old behind).
    assert "a green key 1 step ahead and 1 to your right" in steps[5][0]
    fb = steps[-1][3]
    assert fb.success and fb.observation.startswith("Mission complete. You see ")
    assert "a green ball 1 step ahead, a green key 1 step ahead and 1 to your right" in \
        fb.observation


def test_putnext_plan_order(env):
    for seed in range(8):
        env.reset(train(PUTNEXT, seed))
        thought = env.expert_step()[0]
        move, fixed = re.fullmatch(r"put the (\w+ \w+) next to the (\w+ \w+)",
                                   env.obs["mission"]).groups()
        plan = thought.split("Plan: ")[1]
        order = [plan.index(f"go next to the {move};"), plan.index("pick up the object in front"),
                 plan.index(f"go next to the {fixed} to put it there"),
                 plan.index("drop what I carry")]
        assert order == sorted(order), thought


def test_mistake_recovery_and_score(env):
    rng, twin = random.Random(0), make_env("babyai")
    for task in env.tasks("train", 16):
        mistake_at = rng.randint(0, 3)
        observation, twin_observation = env.reset(task), twin.reset(task)
        assert observation == twin_observation
        for turn in range(mistake_at):
            action = env.expert_step()[1]
            assert twin.expert_step()[1] == action
            env.step(action)
            twin.step(action)
        suggested = twin.expert_step()[1]
        thought, wrong = env.mistake(rng)
        assert wrong in MOVES and wrong != suggested and wrong in thought
        fb = env.step(wrong)
        if fb.done:  # a lucky turn that completes a GoTo mission
            continue
        thought, action = env.expert_step(after_mistake=wrong)
        assert thought.startswith(f"'{wrong}' was a mistake: it did not serve my subgoal (")
        for _ in range(env.max_turns):
            fb = env.step(action)
            if fb.done:
                break
            action = env.expert_step()[1]
        u = env.env.unwrapped
        assert fb.success, task.id
        assert fb.score == pytest.approx(1 - 0.9 * u.step_count / u.max_steps)
        assert 0 < fb.score <= 1
    twin.close()


def test_one_instance_across_levels(env):
    first = play(env, train(GOTO, 3))
    putnext = play(env, train(PUTNEXT, 0))
    again = play(env, train(GOTO, 3))
    assert first[-1][3].success and putnext[-1][3].success
    assert putnext[0][0].startswith("Your mission: put the green ball next to the green key.")
    assert [s[:3] for s in again] == [s[:3] for s in first]  # the bot does not leak across


def test_expert_asked_again_after_an_invalid_action_keeps_its_plan():
    """The bot replans once per engine step: an invalid action in between must not be taken
    for a repeated move."""
    from atlas.envs.babyai import BabyAIEnv

    env = BabyAIEnv("babyai", ["BabyAI-PutNextLocal-v0"], max_turns=60)
    for task in env.tasks("test", 8):
        env.reset(task)
        feedback = None
        for _ in range(env.max_turns):
            _, first = env.expert_step()
            env.step("dance")  # invalid: the engine does not move
            _, again = env.expert_step()
            assert again == first
            feedback = env.step(again)
            if feedback.done:
                break
        assert feedback.success, task.id
