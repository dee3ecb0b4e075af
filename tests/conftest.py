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
