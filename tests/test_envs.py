"""The contract every environment config in conf/env keeps: disjoint splits, deterministic
tasks, an expert that solves test tasks (also after an injected mistake), and no exception for a
bad action. Environment-specific behaviour is tested in tests/test_env_<name>.py."""

from __future__ import annotations

import random
import re

import pytest
from omegaconf import OmegaConf

from atlas.data.generate import expert_episode
from tests.helpers import CONF, make_env

# the environments played in process (remote.yaml and agentgym_*.yaml are played over HTTP:
# tests/test_env_remote.py)
ENV_CONFIGS = sorted(p.stem for p in (CONF / "env").glob("*.yaml")
                     if p.stem != "remote" and not p.stem.startswith("agentgym_"))


@pytest.fixture(scope="module", params=ENV_CONFIGS)
def env(request):
    env = make_env(request.param)
    yield env
    env.close()


def test_every_environment_is_in_the_default_evaluation():
    suite = OmegaConf.load(CONF / "eval" / "default.yaml")
    named = {value for d in suite.defaults if OmegaConf.is_dict(d)
             for key, value in d.items() if key.startswith("/env@")}
    assert named == set(ENV_CONFIGS)


def test_splits_are_disjoint_and_deterministic(env):
    train = env.tasks("train", 300)
    test = env.tasks("test", 300)
    assert not {(t.name, t.seed) for t in train} & {(t.name, t.seed) for t in test}
    assert env.tasks("test", 300) == test
    assert {t.name for t in test} == set(env.task_names)
    with pytest.raises(ValueError, match="split"):
        env.tasks("validation", 1)


def test_expert_solves_test_tasks(env):
    for task in env.tasks("test", 2 * len(env.task_names)):
        t = expert_episode(env, task)
        assert t.meta["success"], (task.id, t.meta)
        assert t.meta["score"] == pytest.approx(1.0) or env.name == "babyai"  # BabyAI: 1 - 0.9 * steps/max
        assert all(m.content.startswith(("Thought: ", "Observation: ")) for m in t.messages[1:])


def test_expert_recovers_from_an_injected_mistake(env):
    solved = 0
    tasks = env.tasks("test", 2 * len(env.task_names))
    for task in tasks:
        t = expert_episode(env, task, mistake_at=1, rng=random.Random(task.id))
        solved += t.meta["success"]
        if t.meta["mistake_step"] is not None:
            steps = [s.message.content for s in t.steps]
            mistaken = steps[1].split("Action: ")[-1]
            if len(steps) > 2:  # the recovery thought refers to what went wrong
                assert steps[2] != steps[1]
                words = {w for w in re.findall(r"[a-z]{3,}", mistaken.lower()) if w != "move"}
                thought = steps[2].lower()
                assert "mistake" in thought or any(w in thought for w in words), steps[2]
    assert solved >= len(tasks) / 2


@pytest.mark.parametrize("action", ["", "fly to the moon", "Action: ???", "x" * 500, "\n\n"])
def test_bad_actions_never_raise(env, action):
    env.reset(env.tasks("test", 1)[0])
    feedback = env.step(action)
    assert isinstance(feedback.observation, str) and feedback.observation
    assert 0.0 <= feedback.score <= 1.0
