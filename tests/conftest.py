"""Shared fixtures: real data from ../shared/data, the shipped tokenizer, tiny models (a random
Llama with large weights, saved as train.py saves one), private caches. Helpers that are not
fixtures live in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CONF, SHARED, TOKENIZER

# Keep every test off the network and out of the user's W&B and model cache.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` stay in the suite and are skipped, saying so, without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(autouse=True)
def _private_selection_caches(tmp_path, monkeypatch):
    """Oracle answers and step scores go to the test's directory, not the user's cache."""
    import atlas.oracle.cache

    monkeypatch.setattr(atlas.oracle.cache, "default_cache_dir",
                        lambda kind="oracle": tmp_path / "atlas-cache" / kind)


@pytest.fixture(scope="module")
def chatty_model():
    """A tiny random Llama with large weights, so that its greedy text varies."""
    import torch
    from omegaconf import OmegaConf

    from atlas.model import load_model

    torch.manual_seed(0)
    model = load_model(config=OmegaConf.load(CONF / "model" / "tiny_llama.yaml").config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoint(chatty_model, tokenizer, tmp_path_factory):
    """The chatty model saved as train.py saves one (model/ with its tokenizer)."""
    path = tmp_path_factory.mktemp("run") / "model"
    chatty_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny Llama of conf/model/tiny_llama.yaml, seeded, in eval mode."""
    import torch
    from omegaconf import OmegaConf

    from atlas.model import load_model

    cfg = OmegaConf.load(CONF / "model" / "tiny_llama.yaml")
    torch.manual_seed(0)
    model = load_model(**OmegaConf.to_container(cfg))
    model.eval()
    return model
