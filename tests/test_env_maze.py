"""Maze environment: observation on hand-made maps, parsing, BFS optimality, expert and mistakes."""

from __future__ import annotations

import random

import pytest

from atlas.data.generate import expert_turns
from atlas.envs.maze import parse, shortest_distances
from tests.helpers import make_env

# The goal (2,0) is two cells below the start, but holes force a detour round the east side.
DETOUR = ["S...",
          "HHH.",
          "G...",
          "...."]
# The start is boxed in: holes north and west, shortest-path cells east and south.
BOXED = [".H..",
         "HS..",
         "....",
         "...G"]


@pytest.fixture()
def env():
    return make_env("maze")


def test_observation_on_hand_made_map(env):
    obs = env.load(DETOUR)
    assert obs == ("Goal: reach the goal without falling into a hole.\n"
                   "You are at (0, 0); the goal is at (2, 0). "
                   "Around you: north: edge, east: free, south: hole, west: edge.\n"
                   "Map (@ you, G goal, H hole, . ice):\n"
                   "@...\nHHH.\nG...\n....")
    env.step("move[east]")
    assert "You are at (0, 1);" in env.view() and env.view().endswith(".@..\nHHH.\nG...\n....")
    env.show_map = False
    assert env.view() == ("You are at (0, 1); the goal is at (2, 0). "
                          "Around you: north: edge, east: free, south: hole, west: free.")


def test_bfs_is_optimal_on_hand_made_map(env):
    dist = shortest_distances(DETOUR)
    assert dist[(0, 0)] == 8 and dist[(2, 0)] == 0 and dist[(3, 0)] == 1 and (1, 0) not in dist
    env.load(DETOUR)
    assert env.shortest_path() == ["east"] * 3 + ["south"] * 2 + ["west"] * 3
    thought, action = env.expert_step()
    assert action == "move[east]"
    assert "Shortest path: east, east, east, south, south, west, west, west (8 moves)" in thought
    assert "6 extra moves" in thought and "the hole at (1, 0) to the south" in thought
    for turn in range(8):
        fb = env.step(env.expert_step()[1])
        assert fb.done == (turn == 7)
    assert fb.success and fb.score == 1.0 and env.pos == (2, 0)


@pytest.mark.parametrize("text, direction", [
    ("move[north]", "north"), ("move[EAST]", "east"), ("north", "north"), ("go south", "south"),
    ("Move West.", "west"), ("move to west", "west"), ("up", "north"), ("left", "west"),
    ("s", "south"), ("move [down]", "south"), ("move(east)", "east"),
    ("move[northeast]", None), ("jump", None), ("", None), (None, None), ("north east", None),
])
def test_parse(text, direction):
    assert parse(text) == direction


def test_invalid_actions_edges_holes_and_turn_cap(env):
    env.load(DETOUR)
    for action in [None, "", "fly", "ünïcödé", "x" * 10_000, "move[northeast]"]:
        fb = env.step(action)
        assert "Invalid action" in fb.observation and not fb.done and env.pos == (0, 0)
    fb = env.step("move[north]")
    assert "edge" in fb.observation and env.pos == (0, 0) and not fb.done
    fb = env.step("move[south]")
    assert fb.done and not fb.success and fb.score == 0.0 and "hole at (1, 0)" in fb.observation
    assert env.step("move[east]").done  # over stays over

    env.load(DETOUR)
    fbs = [env.step("move[north]") for _ in range(env.max_turns)]
    assert not any(fb.done for fb in fbs[:-1]) and fbs[-1].done and not fbs[-1].success


def test_mistakes_are_safe_detours_and_recovered(env):
    env.load(DETOUR)
    thought, action = env.mistake(random.Random(0))
    assert action in ("move[north]", "move[west]")  # only the edges are off-path and safe
    env.step(action)
    thought = env.expert_step(after_mistake=action)[0]
    assert thought.startswith(f"Moving {parse(action)} hit the edge")
    env.step("move[east]")
    thought, action = env.mistake(random.Random(0))
    assert action == "move[west]"  # back to the start: safe, but one move farther
    env.step(action)
    thought, action = env.expert_step(after_mistake="move[west]")
    assert thought.startswith("Moving west was a detour off the shortest path: from (0, 0) the "
                              "goal is 8 moves away instead of 6.") and action == "move[east]"


def test_boxed_in_mistake_is_an_invalid_diagonal(env):
    env.load(BOXED)
    thought, action = env.mistake(random.Random(0))
    assert action == "move[southeast]"
    fb = env.step(action)
    assert "Invalid action" in fb.observation and env.pos == (1, 1)
    thought, action = env.expert_step(after_mistake="move[southeast]")
    assert thought.startswith("'move[southeast]' is not a move") and action == "move[east]"


def test_splits_and_determinism(env):
    train, test = env.tasks("train", 3000), env.tasks("test", 3000)
    assert not {(t.name, t.seed) for t in train} & {(t.name, t.seed) for t in test}
    assert {t.name for t in test} == {"maze-4x4", "maze-6x6", "maze-8x8"}
    other = make_env("maze")
    for task in test[:12]:
        assert env.reset(task) == other.reset(task)
    assert len(env.board) == 8 and env.reset(test[0]) != env.reset(test[3])
    # Rotations vary the start corner; the goal is always the opposite corner.
    starts = set()
    for task in test[:24]:
        env.reset(task)
        starts.add(tuple(x > 0 for x in env.pos))
        assert env.goal == tuple(len(env.board) - 1 - x for x in env.pos)
    assert len(starts) == 4


@pytest.mark.parametrize("mistake_at", [None, 0, 1, 2])
def test_expert_solves_test_tasks(env, mistake_at):
    rng = random.Random(0)
    for task in env.tasks("test", 90):
        env.reset(task)
        optimal = env.dist[env.pos]
        turns = list(expert_turns(env, mistake_at, rng))
        assert not any("fell into" in fb.observation for _, _, fb in turns)
        assert turns[-1][2].success, task.id
        if mistake_at is None:
            assert len(turns) == optimal
        else:
            assert optimal < len(turns) <= optimal + 2  # an edge bump costs 1 move, a detour 2
