"""Shared fixtures: real data from ../shared/data, the shipped tokenizer, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("ATLAS_SHARED_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = ROOT / "atlas" / "assets" / "smollm2_tokenizer"

# Keep every test off the network and out of the user's W&B and model cache.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real trajectories in ../shared/data (see its README). CI always has them."""
    if not SHARED.is_dir():
        msg = f"real data not found at {SHARED} (set ATLAS_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED


@pytest.fixture(scope="session")
def tokenizer():
    from atlas.model import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


def compose_train(tmp_path: Path, *overrides: str):
    """Compose conf/train.yaml the way `python train.py` does, with a tiny model by default."""
    from hydra import compose, initialize_config_dir

    base = ["model=tiny_llama", "logger=csv", "data.limit=8", "data.val_fraction=0.25",
            "eval_after_training=false",
            f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=base + list(overrides))


def compose_select(tmp_path: Path, *overrides: str):
    """Compose conf/select.yaml the way `python select.py` does, with a tiny model by default."""
    from hydra import compose, initialize_config_dir

    base = ["model=tiny_llama", "data.limit=6", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("select", overrides=base + list(overrides))


def play_gold_path(env, task, mistake_at: float | None = None, rng=None):
    """An expert episode of a gold-path environment (ScienceWorld, TextWorld-Express), with a
    mistake injected ``mistake_at`` (a fraction) of the way along the gold path, which is known
    only after the reset. Returns (last feedback, [(thought, action, feedback), ...])."""
    from atlas.data.generate import expert_turns

    env.reset(task)
    at = int(mistake_at * (len(env.gold) - 1)) if mistake_at is not None else None
    turns = list(expert_turns(env, at, rng))
    if not turns[-1][2].done:
        raise AssertionError(f"{task.id}: no end within max_turns")
    return turns[-1][2], turns


def check_recovery(env, task, rejection: str) -> None:
    """A gold-path expert with one mistake at a random point still solves ``task``: the engine
    rejects the mistake with ``rejection`` without changing the state, and the next thought
    quotes the wrong action and the engine's answer and resumes the plan."""
    import random

    rng = random.Random(task.id)
    fb, turns = play_gold_path(env, task, rng.random(), rng)
    assert fb.success and fb.score == 1.0, (task.id, turns)
    wrong_turns = [i for i, (_, _, f) in enumerate(turns) if f.observation == rejection]
    assert len(wrong_turns) == 1, (task.id, turns)  # the mistake, and only the mistake
    at = wrong_turns[0]
    _, wrong, wrong_fb = turns[at]
    before = turns[at - 1][2].score if at else 0.0
    assert not wrong_fb.done and wrong_fb.score == before  # the mistake changed nothing
    recovery, action, _ = turns[at + 1]
    assert wrong in recovery and rejection in recovery and "plan" in recovery, recovery
    assert action != wrong


@pytest.fixture(autouse=True)
def _private_selection_caches(tmp_path, monkeypatch):
    """Oracle answers and step scores go to the test's directory, not the user's cache."""
    import atlas.oracle

    monkeypatch.setattr(atlas.oracle, "default_cache_dir",
                        lambda kind="oracle": tmp_path / "atlas-cache" / kind)
