"""Wordle environment: feedback semantics, parsing, splits, and the expert on every test word."""

from __future__ import annotations

import random

import pytest

from atlas.data.generate import expert_turns
from atlas.envs import wordle
from atlas.envs.base import Task
from atlas.envs.wordle import GREEN, GREY, YELLOW, feedback
from tests.helpers import make_env


@pytest.fixture(scope="module")
def env():
    return make_env("wordle")


def start(env, word: str) -> str:
    seed = wordle.INDEX[word]
    return env.reset(Task("wordle", "wordle", seed, wordle._split_of(word)))


def play(env, task: Task, mistake_at: int | None = None, rng=None):
    """Expert episode, with the mistake injected at action ``mistake_at``; (feedback, steps)."""
    env.reset(task)
    steps = list(expert_turns(env, mistake_at, rng))
    if not steps[-1][2].done:
        raise AssertionError("episode did not end within max_turns")
    return steps[-1][2], steps


@pytest.mark.parametrize("guess, answer, marks", [
    ("crane", "crane", (GREEN,) * 5),
    # Two Es guessed, one in the answer (not at a guessed spot): the first E is yellow only.
    ("speed", "abide", (GREY, GREY, YELLOW, GREY, YELLOW)),
    # The green L uses the answer's only L, so the earlier L is grey, not yellow.
    ("hello", "world", (GREY, GREY, GREY, GREEN, YELLOW)),
    # Answer THERE has two Es: one green (last), one left over for the first guessed E.
    ("eerie", "there", (YELLOW, GREY, YELLOW, GREY, GREEN)),
    ("geese", "these", (GREY, GREY, GREEN, GREEN, GREEN)),
    # Four guessed As, three in the answer: two green, one yellow, the fourth grey.
    ("aaaba", "bbaaa", (YELLOW, GREY, GREEN, YELLOW, GREEN)),
])
def test_feedback_repeated_letters(guess, answer, marks):
    assert feedback(guess, answer) == marks
    code = sum(m * 3 ** i for i, m in enumerate(marks))
    assert wordle.pattern_codes([guess], [answer])[0, 0] == code


def test_vectorised_feedback_matches_reference():
    rng = random.Random(0)
    guesses = rng.sample(sorted(wordle.GUESSES), 150)
    answers = rng.sample(wordle.ANSWERS, 150)
    codes = wordle.pattern_codes(guesses, answers)
    for i, g in enumerate(guesses):
        for j, a in enumerate(answers):
            assert codes[i, j] == sum(m * 3 ** k for k, m in enumerate(feedback(g, a)))


def test_observation_text(env):
    start(env, "abide")
    obs = env.step("guess[speed]").observation
    assert obs.startswith("Guess 1/6: SPEED. S: not in word, P: not in word, "
                          "E: in word but wrong position, E: no more E in word, "
                          "D: in word but wrong position. Pattern: --Y-Y.")
    assert "5 guesses left" in obs


@pytest.mark.parametrize("action", ["guess[crane]", "guess crane", "guess[CRANE]", "Guess: Crane",
                                    "crane", " guess [crane]. ", "guess 'crane'"])
def test_lenient_actions_use_a_guess(env, action):
    start(env, "abide")
    fb = env.step(action)
    assert fb.observation.startswith("Guess 1/6: CRANE.") and not fb.done


@pytest.mark.parametrize("action", ["guess", "", None, "guess[cranes]", "move[north]",
                                    "guess[zzzzz]", "guess[cr4ne]", "ünïcödé", "x" * 10_000])
def test_invalid_actions_explain_and_use_no_guess(env, action):
    start(env, "abide")
    fb = env.step(action)
    assert "No guess was used" in fb.observation and not fb.done
    assert env.history == []
    assert env.step("guess[abide]").observation.startswith("Guess 1/6: ABIDE.")


def test_episode_end_and_turn_cap(env):
    start(env, "abide")
    for _ in range(5):
        assert not env.step("guess[crane]").done
    fb = env.step("guess[crane]")
    assert fb.done and not fb.success and fb.score == 0.0 and "the word was ABIDE" in fb.observation
    assert env.step("guess[abide]").done  # over stays over

    start(env, "abide")
    fb = env.step("guess[abide]")
    assert fb.done and fb.success and fb.score == 1.0

    start(env, "abide")
    fbs = [env.step("nonsense") for _ in range(env.max_turns)]
    assert not any(fb.done for fb in fbs[:-1]) and fbs[-1].done and not fbs[-1].success


def test_splits_disjoint_and_deterministic(env):
    train = env.tasks("train", 5000)
    test = env.tasks("test", 2000)
    train_words = {wordle.ANSWERS[t.seed] for t in train}
    test_words = {wordle.ANSWERS[t.seed] for t in test}
    assert not train_words & test_words
    assert len(train_words) + len(test_words) == len(wordle.ANSWERS)
    assert 0.15 < len(test_words) / len(wordle.ANSWERS) < 0.25
    assert env.tasks("test", 30, offset=7) == test[7:37]
    other = make_env("wordle")
    assert other.tasks("train", 50) == train[:50]
    first = env.reset(test[0]), env.secret
    assert (env.reset(test[0]), env.secret) == first
    with pytest.raises(ValueError):  # a test word's seed is not a train task
        env.reset(Task("wordle", "wordle", test[0].seed, "train"))


def test_expert_solves_every_test_word(env):
    tasks = env.tasks("test", len(wordle._split_seeds("test")))
    results = [play(env, task) for task in tasks]
    assert all(fb.success and fb.score == 1.0 for fb, _ in results)
    guesses = [len(steps) for _, steps in results]
    assert max(guesses) <= 6 and sum(guesses) / len(guesses) < 3.8
    thought, action, _ = results[0][1][1]
    assert any(s in thought for s in ("words still fit", "fits all the feedback", "Two words fit"))


@pytest.mark.parametrize("turn", [1, 2])
def test_mistake_then_recovery(env, turn):
    rng = random.Random(turn)
    tasks = env.tasks("test", 150)
    solved = 0
    for task in tasks:
        fb, steps = play(env, task, mistake_at=turn, rng=rng)
        solved += fb.success
        if turn < len(steps) - 1:
            _, wrong, _ = steps[turn]
            word = wordle.ACTION.match(wrong).group(1)
            earlier = [(w, feedback(w, env.secret)) for w, _ in env.history[:turn]]
            assert word != env.secret and wordle.INDEX[word] not in env._candidates(earlier)
            assert steps[turn + 1][0].startswith(f"Guessing {word.upper()} wasted a guess")
    assert solved / len(tasks) > 0.9


def test_weak_opener_mistake(env):
    start(env, "abide")
    thought, action = env.mistake(random.Random(0))
    word = wordle.ACTION.match(action).group(1)
    assert word != "abide" and wordle._opener()[2][wordle.INDEX[word]] < wordle._opener()[1] / 2
    env.step(action)
    thought = env.expert_step(after_mistake=action)[0]
    assert thought.startswith(f"Opening with {word.upper()} wasted")
