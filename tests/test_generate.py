"""Expert trajectory generation: structure and provenance of what `generate` returns, mistake
injection, determinism, the Hydra CLI end to end, and the shipped default data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from atlas.data.formats import read_trajectories, trajectory_to_record
from atlas.data.generate import generate
from atlas.envs.base import Task
from tests.helpers import CONF, ROOT, make_env

DEFAULT_FILES = list(OmegaConf.load(CONF / "data" / "default.yaml").files)


def load_env(name):
    return make_env(name)


@pytest.fixture(scope="module", params=["maze", "babyai"])
def env(request):
    env = load_env(request.param)
    yield env
    env.close()


def check_trajectory(t, env, mistake_steps=(1, 4)):
    """The shape and provenance every generated trajectory has."""
    meta = t.meta
    assert meta["source"] == "expert" and meta["split"] == "train" and meta["success"] is True
    assert t.env == env.name and t.system == env.instruction
    assert meta["task"] in env.task_names
    assert t.id == Task(env.name, meta["task"], meta["seed"], "train").id
    assert 0 < meta["score"] <= 1
    roles = [m.role for m in t.messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2)  # ends on the agent's last step
    assert all(m.content.startswith("Observation: ") for m in t.messages[2::2])
    assert not t.messages[0].content.startswith("Observation: ")
    for m in t.messages[1::2]:
        assert re.fullmatch(r"Thought: \S.*\nAction: [^\n]*\S", m.content, re.S), m.content
    mistake, recovery = meta["mistake_step"], meta["recovery_step"]
    if mistake is None:
        assert recovery is None
    else:
        assert mistake_steps[0] <= mistake <= mistake_steps[1] and recovery == mistake + 1
        assert recovery < t.num_steps  # the recovery step is in the trajectory
        wrong = t.steps[mistake].message.content.split("\nAction: ")[1]
        words = set(re.findall(r"[a-z]{3,}", wrong.lower())) - {"move"}
        assert any(w in t.steps[recovery].message.content.lower() for w in words)


def records(trajectories):
    return [trajectory_to_record(t) for t in trajectories]


def test_generate_structure_provenance_and_mistakes(env):
    n = 16
    kept, failed = generate(env, n, mistake_fraction=0.5, seed=0)
    assert failed == 0 and len(kept) == n
    assert [t.id for t in kept] == [t.id for t in env.tasks("train", n)]
    for t in kept:
        check_trajectory(t, env)
    assert 0 < sum(t.meta["mistake_step"] is not None for t in kept) < n

    none, _ = generate(env, n, mistake_fraction=0.0, seed=0)
    assert all(t.meta["mistake_step"] is None for t in none)
    every, _ = generate(env, n, mistake_fraction=1.0, seed=0, mistake_steps=(0, 2))
    for t in every:
        check_trajectory(t, env, (0, 2))
        # Only an episode the expert finishes before the drawn step escapes its mistake.
        assert t.meta["mistake_step"] is not None or t.num_steps <= 2, t.id
    assert sum(t.meta["mistake_step"] is not None for t in every) >= n // 2


def test_generate_is_deterministic(env):
    first, _ = generate(env, 12, mistake_fraction=0.5, seed=0)
    assert records(generate(env, 12, mistake_fraction=0.5, seed=0)[0]) == records(first)
    other, _ = generate(env, 12, mistake_fraction=0.5, seed=1)
    assert [t.id for t in other] == [t.id for t in first]
    assert [t.meta["mistake_step"] for t in other] != [t.meta["mistake_step"] for t in first]
    # Without mistakes the seed has nothing to decide.
    assert records(generate(env, 6, seed=0)[0]) == records(generate(env, 6, seed=1)[0])


@pytest.mark.parametrize("name, cap", [("maze", 7), ("babyai", 5)])
def test_generate_keeps_only_solved_episodes(name, cap):
    env = make_env(name, max_turns=cap)
    kept, failed = generate(env, 24, mistake_fraction=0.5)
    env.close()
    assert 0 < len(kept) < 24 and len(kept) + failed == 24  # the turn cap fails the long ones
    for t in kept:
        check_trajectory(t, env)
        assert t.num_steps <= cap


@pytest.mark.parametrize("fraction", [1.5, -0.1])
def test_generate_rejects_a_bad_mistake_fraction(fraction):
    with pytest.raises(ValueError, match="mistake_fraction"):
        generate(load_env("maze"), 1, mistake_fraction=fraction)


def test_cli_end_to_end(tmp_path):
    def cli(*overrides):
        run = subprocess.run([sys.executable, "-m", "atlas.data.generate", "env=maze", "n=6",
                              "mistake_fraction=0.5", f"hydra.run.dir={tmp_path}/logs",
                              *overrides], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run

    run = cli(f"output={tmp_path}/maze.jsonl")
    assert "wrote 6 trajectories" in run.stderr + run.stdout
    env = load_env("maze")
    data = read_trajectories(tmp_path / "maze.jsonl")
    assert len({t.id for t in data}) == len(data) == 6
    for t in data:
        check_trajectory(t, env)
    test = env.tasks("test", 500)
    assert not {t.id for t in data} & {t.id for t in test}
    assert not {(t.meta["task"], t.meta["seed"]) for t in data} & {(t.name, t.seed) for t in test}

    cli(f"output={tmp_path}/maze_openai.jsonl", "format=openai")
    openai = read_trajectories(tmp_path / "maze_openai.jsonl")
    assert [(t.system, t.chat()) for t in openai] == [(t.system, t.chat()) for t in data]


def test_default_data_lists_every_shipped_file():
    shipped = sorted((ROOT / "atlas" / "data" / "default").glob("*.jsonl"))
    assert sorted(f.removeprefix("pkg://") for f in DEFAULT_FILES) == \
        [str(p.relative_to(ROOT)) for p in shipped]


@pytest.mark.parametrize("file", DEFAULT_FILES)
def test_default_data_is_solved_train_data(file):
    name = Path(file).stem  # each file is named after the environment config it comes from
    env = load_env(name)
    try:
        train = {t.id for t in env.tasks("train", 500)}
        test = {(t.name, t.seed) for t in env.tasks("test", 500)}
        data = read_trajectories(file)
        assert len(data) >= 50
        for t in data:
            check_trajectory(t, env)
            assert t.id in train and (t.meta["task"], t.meta["seed"]) not in test, t.id
    finally:
        env.close()
