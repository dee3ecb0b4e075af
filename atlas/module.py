"""The Lightning module: a Hugging Face causal LM trained on the selected steps only."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from atlas.data.masking import IGNORE_INDEX

LOSS_AVERAGES = ("token", "step")


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, step_ids: torch.Tensor,
               average: str = "token") -> tuple[torch.Tensor, int, int]:
    """Mean next-token NLL over supervised tokens.

    Args:
        logits: ``(batch, seq, vocab)`` model outputs.
        labels: ``(batch, seq)`` token ids, ``IGNORE_INDEX`` where not supervised.
        step_ids: ``(batch, seq)`` step index of each supervised token, -1 elsewhere.
        average: ``token``: every supervised token of the batch weighs the same (long steps
            weigh more; the usual SFT loss). ``step``: the NLL is first averaged within each
            step, then over the batch's steps, so a short critical action weighs as much as a
            long plan.

    Returns:
        (loss, supervised tokens, supervised steps).

    Raises:
        ValueError: the batch has no supervised token (never a silent zero loss).
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"loss average must be one of {LOSS_AVERAGES}, got {average!r}")
    # position t predicts token t+1
    logits, labels, step_ids = logits[:, :-1], labels[:, 1:], step_ids[:, 1:]
    mask = labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        raise ValueError("batch has no supervised token")
    nll = F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    keys = rows * (int(step_ids.max()) + 1) + step_ids[mask]
    groups, inverse = torch.unique(keys, return_inverse=True)
    if average == "token":
        return nll.mean(), n_tokens, len(groups)
    per_step = torch.zeros(len(groups), dtype=nll.dtype, device=nll.device).index_add_(0, inverse, nll)
    counts = torch.bincount(inverse, minlength=len(groups)).to(nll.dtype)
    return (per_step / counts).mean(), n_tokens, len(groups)


class AtlasLM(L.LightningModule):
    """Wraps an ``AutoModelForCausalLM`` (optionally PEFT-wrapped) with per-step loss masks.

    Args:
        model: The causal LM (built by :func:`atlas.model.load_model`).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_ratio: Fraction of optimizer steps of linear warmup before the cosine decay.
        loss_average: ``token`` or ``step``; see :func:`masked_nll`.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 2e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.1,
                 loss_average: str = "token"):
        super().__init__()
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"module.loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
        self.model = model
        # plain Python values: checkpoints load with torch's weights_only unpickler
        self.save_hyperparameters({"lr": float(lr), "weight_decay": float(weight_decay),
                                   "betas": tuple(float(b) for b in betas),
                                   "warmup_ratio": float(warmup_ratio), "loss_average": loss_average})
        self._total_steps: int | None = None

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _shared_step(self, batch, split: str):
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, n_tok, n_steps = masked_nll(logits, batch["labels"], batch["step_ids"],
                                          self.hparams.loss_average)
        bs = batch["input_ids"].shape[0]
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=bs, on_step=split == "train",
                 on_epoch=split != "train", sync_dist=split != "train")
        if split == "train":
            self.log_dict({"train/supervised_tokens": float(n_tok),
                           "train/supervised_steps": float(n_steps),
                           "train/tokens": float(batch["attention_mask"].sum())},
                          on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def on_train_start(self):
        # Read here, not in configure_optimizers: asking Lightning for it there builds the train
        # dataloader before a checkpoint's dataloader state is restored, and a mid-epoch resume
        # would then replay the epoch from its start.
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("training has no end: set trainer.max_epochs or trainer.max_steps")
        self._total_steps = max(1, int(total))
        # LambdaLR applied lr_factor(0) when it was built, before the total was known
        scheduler = self.lr_schedulers()
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * self.lr_factor(scheduler.last_epoch)

    def lr_factor(self, step: int) -> float:
        """Linear warmup over ``warmup_ratio`` of the optimizer steps, then cosine decay to 0."""
        if self._total_steps is None:  # only when the scheduler is built, before training
            return 0.0 if self.hparams.warmup_ratio > 0 else 1.0
        warmup = int(self.hparams.warmup_ratio * self._total_steps)
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, self._total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
