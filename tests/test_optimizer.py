"""module.optimizer and module.optimizer_in_backward: the memory-saving optimizer options.

Each is checked against plain AdamW on the tiny model: the in-backward step must give the same
weights (it is the same update, only earlier), the low-bit states a loss curve close to it.
"""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from atlas.data.datamodule import TrajectoryDataModule
from atlas.data.formats import read_trajectories
from atlas.model import load_model, load_tokenizer
from atlas.module import AtlasLM, InBackwardOptimizer
from atlas.jobs.train import train
from atlas.utils import ConfigError
from tests.helpers import compose_train


def _fit(tmp_path, steps: int = 4, ckpt_path=None, checkpoint=False, data: int | None = None,
         **module_kw):
    """Train the tiny model of the train config for ``steps`` batches of one default trajectory;
    returns (per-step losses, final weights, trainer)."""
    cfg = compose_train(tmp_path, "model.gradient_checkpointing=true")
    torch.manual_seed(0)
    model = load_model(**cfg.model)
    trajectories = [t.with_selection(range(t.num_steps))
                    for t in read_trajectories("pkg://atlas/data/default/babyai.jsonl")[:data or steps]]
    data = TrajectoryDataModule(trajectories, [], load_tokenizer(cfg.model.tokenizer or cfg.model.name),
                                seed=0)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    module = AtlasLM(model, lr=1e-3, weight_decay=0.1, warmup_ratio=0.25, **module_kw)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=checkpoint, default_root_dir=tmp_path,
                        enable_model_summary=False, callbacks=[Losses()])
    module.check_trainer(trainer)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def test_optimizer_in_backward_is_adamw_updated_earlier(tmp_path):
    """Same losses and weights as AdamW stepped after the backward pass (gradient checkpointing
    on, tied embeddings, two weight-decay groups, warmup then cosine)."""
    losses, weights, _ = _fit(tmp_path / "a")
    in_bwd_losses, in_bwd_weights, trainer = _fit(tmp_path / "b", optimizer_in_backward=True)
    assert trainer.global_step == 4 and len(in_bwd_losses) == 4
    assert in_bwd_losses == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0] - 0.05  # it trained
    for name, w in weights.items():
        torch.testing.assert_close(in_bwd_weights[name], w, atol=1e-5, rtol=1e-4, msg=name)
    assert not trainer.optimizers[0]._hooks  # removed at the end of fit: later backwards update nothing


def test_optimizer_in_backward_frees_each_gradient_during_backward(tmp_path):
    """No parameter still holds a gradient when the backward pass ends."""
    cfg = compose_train(tmp_path)
    model = load_model(**cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = InBackwardOptimizer([{"params": params, "weight_decay": 0.0}], torch.optim.AdamW, lr=1e-3)
    before = [p.detach().clone() for p in params]
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))  # each one was updated
    assert len(opt.state_dict()["per_parameter"]) == len(params)
    opt.remove_hooks()


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_low_bit_optimizer_states_follow_adamw(tmp_path, name):
    """torchao's low-bit AdamW, alone and stepped in the backward pass: the loss curve stays
    within 0.05 of fp32 AdamW's over the first steps (the tiny model's larger matrices are
    quantised; the rest stay fp32)."""
    losses, _, _ = _fit(tmp_path / "a")
    for in_backward in (False, True):
        low, _, trainer = _fit(tmp_path / str(in_backward), optimizer=name,
                               optimizer_in_backward=in_backward)
        assert low == pytest.approx(losses, abs=0.05)
        states = trainer.optimizers[0].per_parameter if in_backward else [trainer.optimizers[0]]
        kinds = {type(s["exp_avg"]).__name__ for o in states for s in o.state.values()}
        assert any(k.startswith("OptimState") for k in kinds), kinds


def test_optimizer_in_backward_resumes_from_a_checkpoint(tmp_path):
    """The per-parameter 8-bit states travel in Lightning's checkpoint and load back. (Losses are
    not compared with an uninterrupted run: a 2-step run has its own cosine schedule.)"""
    kw = {"optimizer": "adamw8bit", "optimizer_in_backward": True, "data": 4}
    _, _, trainer = _fit(tmp_path / "a", steps=2, checkpoint=True, **kw)
    [ckpt] = (tmp_path / "a").rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert len(state["per_parameter"]) == len(trainer.optimizers[0].per_parameter)
    losses, _, resumed = _fit(tmp_path / "a", steps=4, ckpt_path=str(ckpt), **kw)
    assert resumed.global_step == 4 and len(losses) == 2
    moved = resumed.optimizers[0].per_parameter[0].state
    assert int(next(iter(moved.values()))["step"]) == 4  # counted on from the checkpoint's 2


@pytest.mark.parametrize("overrides, message", [
    (["trainer.accumulate_grad_batches=4"], "set trainer.accumulate_grad_batches=1 (got 4"),
    (["trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=1.0"],
     "set trainer.gradient_clip_val=null (got 1.0)"),
])
def test_optimizer_in_backward_refuses_accumulation_and_clipping(tmp_path, overrides, message):
    cfg = compose_train(tmp_path, "module.optimizer_in_backward=true", *overrides,
                        "eval_after_training=false")
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "model").exists()


def test_unknown_optimizer_names_the_key(tmp_path):
    cfg = compose_train(tmp_path, "module.optimizer=lion")
    with pytest.raises(ConfigError, match=r"module.optimizer must be one of \['adamw', 'adamw4bit', "
                                          r"'adamw8bit'\], got 'lion'"):
        train(cfg)
