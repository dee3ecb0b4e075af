"""The Lightning module: a Hugging Face causal LM trained on the selected steps only."""

from __future__ import annotations

import importlib
import math

import lightning as L
import torch
import torch.nn.functional as F

from atlas.data.masking import IGNORE_INDEX
from atlas.utils import Choice, ConfigError

class LossAverage(Choice):
    """How the loss averages its supervised tokens: over all of them, or per step first."""

    TOKEN = "token"
    STEP = "step"
LOSS_IMPLS = ("gathered", "full")
# config attributes of models whose logits are a function of the LM head's output
# (Gemma-2 softcapping; Cohere, MiniCPM, Granite, Falcon-H1 scales): the full path handles them
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                    "lm_head_multiplier", "logits_scaling")
# module.optimizer: AdamW with fp32 moments, or torchao's low-bit AdamW (moments quantised
# block-wise: 1/4 or 1/8 of the fp32 states' memory; compiled with torch.compile, so on a CPU
# they need a C++ compiler and are slower per step, docs/benchmarks.md)
OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw8bit": "torchao.optim.AdamW8bit",
              "adamw4bit": "torchao.optim.AdamW4bit"}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of ``module.optimizer``."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"module.optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    module, cls = OPTIMIZERS[name].rsplit(".", 1)
    try:  # (atlas/__init__.py quiets torchao's import-time logging)
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ConfigError(f"module.optimizer={name} needs {module.split('.')[0]} "
                          f"(pip install -e .): {e}") from None


# the tensor subclasses of low-bit optimizer states that a checkpoint may rebuild
STATE_SUBCLASSES = ("torchao.optim.subclass_8bit.OptimState8bit",
                    "torchao.optim.subclass_4bit.OptimState4bit",
                    "torchao.optim.subclass_fp8.OptimStateFp8")


def plain_states(obj):
    """``obj`` (an optimizer state dict) with tensor subclasses (torchao's quantised states)
    taken apart into plain tensors: Lightning loads checkpoints with a callable
    ``map_location``, which cannot rebuild a subclass. :func:`rebuilt_states` undoes it."""
    if isinstance(obj, dict):
        return {k: plain_states(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_states(v) for v in obj)
    if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, ctx = obj.__tensor_flatten__()
        return {"__tensor_subclass__": f"{type(obj).__module__}.{type(obj).__qualname__}",
                "tensors": {n: getattr(obj, n) for n in names}, "ctx": ctx,
                "size": tuple(obj.shape), "stride": tuple(obj.stride())}
    return obj


def rebuilt_states(obj):
    """The inverse of :func:`plain_states` (only the classes of ``STATE_SUBCLASSES``)."""
    if isinstance(obj, dict) and "__tensor_subclass__" in obj:
        name = obj["__tensor_subclass__"]
        if name not in STATE_SUBCLASSES:
            raise ValueError(f"checkpoint holds optimizer state of unknown type {name}")
        module, cls = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls).__tensor_unflatten__(
            obj["tensors"], obj["ctx"], torch.Size(obj["size"]), obj["stride"])
    if isinstance(obj, dict):
        return {k: rebuilt_states(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rebuilt_states(v) for v in obj)
    return obj


def set_lr(group: dict, lr: float) -> None:
    """Set a parameter group's learning rate (torchao's optimizers keep it in a tensor, to be
    updated in place so that their compiled step is not rebuilt)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(lr))
    else:
        group["lr"] = lr


class InBackwardOptimizer(torch.optim.Optimizer):
    """An optimizer stepped inside the backward pass, one parameter at a time.

    Each parameter gets its own ``cls`` optimizer (``settings`` and its group's weight decay), and a
    ``register_post_accumulate_grad_hook`` steps it and frees the gradient as soon as the
    backward pass has accumulated it (as torchtune's ``optimizer_in_bwd``): the gradients of the
    whole model never exist at once. The update is plain AdamW's, so it excludes what needs all
    gradients before any update: accumulation over several batches and clipping by the global
    norm (:meth:`AtlasLM.check_trainer` refuses both).

    To Lightning and the learning-rate schedule this is one optimizer with the usual parameter
    groups: each hook reads its group's current learning rate; :meth:`step` has nothing left to
    do. Its state dict holds every per-parameter optimizer's, so checkpoints resume.
    """

    def __init__(self, groups: list[dict], cls: type[torch.optim.Optimizer], **settings):
        super().__init__(groups, settings)
        self.per_parameter: list[torch.optim.Optimizer] = []
        self._hooks = []
        for group in self.param_groups:
            for p in group["params"]:
                opt = cls([p], **{**settings, "weight_decay": group["weight_decay"]})
                self.per_parameter.append(opt)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(opt, group)))

    @staticmethod
    def _hook(opt: torch.optim.Optimizer, group: dict):
        def step(p: torch.Tensor) -> None:
            set_lr(opt.param_groups[0], group["lr"])
            opt.step()
            p.grad = None
        return step

    @torch.no_grad()
    def step(self, closure=None):
        """The parameters were updated during the backward pass; only ``closure`` runs."""
        return closure() if closure is not None else None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {**super().state_dict(), "per_parameter": [o.state_dict() for o in self.per_parameter]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        for opt, s in zip(self.per_parameter, state_dict.pop("per_parameter"), strict=True):
            opt.load_state_dict(s)
        super().load_state_dict(state_dict)


def _reduce(nll: torch.Tensor, labels: torch.Tensor, step_ids: torch.Tensor, mask: torch.Tensor,
            average: str) -> tuple[torch.Tensor, int, int]:
    """Average per-token NLLs (of the ``mask`` positions of shifted ``labels``) by token or step."""
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    keys = rows * (int(step_ids.max()) + 1) + step_ids[mask]
    groups, inverse = torch.unique(keys, return_inverse=True)
    if average == "token":
        return nll.mean(), len(nll), len(groups)
    per_step = torch.zeros(len(groups), dtype=nll.dtype, device=nll.device).index_add_(0, inverse, nll)
    counts = torch.bincount(inverse, minlength=len(groups)).to(nll.dtype)
    return (per_step / counts).mean(), len(nll), len(groups)


def _supervised(labels: torch.Tensor, step_ids: torch.Tensor, average: str):
    """Shifted labels and step ids (position t predicts token t+1) and their supervised mask."""
    LossAverage.of(average, "loss average")
    labels, step_ids = labels[:, 1:], step_ids[:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        raise ValueError("batch has no supervised token")
    return labels, step_ids, mask


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, step_ids: torch.Tensor,
               average: str = "token") -> tuple[torch.Tensor, int, int]:
    """Mean next-token NLL over supervised tokens, from full logits.

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
    labels, step_ids, mask = _supervised(labels, step_ids, average)
    nll = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="none")
    return _reduce(nll, labels, step_ids, mask, average)


def supervised_nll(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   step_ids: torch.Tensor, average: str = "token", chunk_size: int = 256
                   ) -> tuple[torch.Tensor, int, int]:
    """:func:`masked_nll` from the decoder's hidden states, paying only for supervised tokens.

    The hidden states of the supervised positions are gathered first; the LM head and the
    cross-entropy run on those alone, ``chunk_size`` positions at a time, each chunk
    checkpointed so that its ``(chunk, vocab)`` logits are rebuilt in the backward pass rather
    than kept. With SmolLM2's 49k vocabulary the full logits of a 2k-token sequence are 400 MB
    in fp32 (twice that with their gradient); here at most one chunk's exist at a time
    (256 positions: 50 MB).
    """
    from torch.utils.checkpoint import checkpoint

    labels, step_ids, mask = _supervised(labels, step_ids, average)
    states, targets = hidden[:, :-1][mask], labels[mask]

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="none")

    nll = torch.cat([checkpoint(chunk_nll, states[i:i + chunk_size], targets[i:i + chunk_size],
                                use_reentrant=False)
                     if torch.is_grad_enabled() else chunk_nll(states[i:i + chunk_size],
                                                               targets[i:i + chunk_size])
                     for i in range(0, len(targets), chunk_size)])
    return _reduce(nll, labels, step_ids, mask, average)


class AtlasLM(L.LightningModule):
    """Wraps an ``AutoModelForCausalLM`` (optionally PEFT-wrapped) with per-step loss masks.

    Args:
        model: The causal LM (built by :func:`atlas.model.load_model`).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_ratio: Fraction of optimizer steps of linear warmup before the cosine decay.
        loss_average: ``token`` or ``step``; see :func:`masked_nll`.
        loss_impl: ``gathered`` (default): the LM head and cross-entropy only at supervised
            positions, in checkpointed chunks (:func:`supervised_nll`); ``full``: the model's
            full logits, as a plain SFT trainer computes them. Both give the same loss; models
            whose logits are more than the head's output (softcapping or a logit scale, see
            ``LOGIT_TRANSFORMS``) always use ``full``.
        loss_chunk_size: Supervised positions per LM-head chunk under ``gathered``.
        optimizer: ``adamw`` (fp32 moments), ``adamw8bit`` or ``adamw4bit`` (torchao's
            block-quantised moments); see ``OPTIMIZERS``.
        optimizer_in_backward: Step each parameter inside the backward pass and free its
            gradient there (:class:`InBackwardOptimizer`): no full set of gradients is ever
            held. Needs ``trainer.accumulate_grad_batches=1`` and no gradient clipping.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 2e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.1,
                 loss_average: str = "token", loss_impl: str = "gathered",
                 loss_chunk_size: int = 256, optimizer: str = "adamw",
                 optimizer_in_backward: bool = False):
        super().__init__()
        optimizer_class(optimizer)  # a wrong name or a missing library fails before training
        self.optimizer, self.optimizer_in_backward = optimizer, bool(optimizer_in_backward)
        self.automatic_optimization = not self.optimizer_in_backward
        loss_average = LossAverage.of(loss_average, "module.loss_average")
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"module.loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        if loss_chunk_size < 1:
            raise ValueError(f"module.loss_chunk_size must be >= 1, got {loss_chunk_size}")
        config = getattr(model, "config", None)
        if loss_impl == "gathered" and any(getattr(config, a, None) for a in LOGIT_TRANSFORMS):
            loss_impl = "full"  # the head's output is not yet the logits
        self.loss_impl, self.loss_chunk_size = loss_impl, loss_chunk_size
        self.model = model
        # plain Python values: checkpoints load with torch's weights_only unpickler
        self.save_hyperparameters({"lr": float(lr), "weight_decay": float(weight_decay),
                                   "betas": tuple(float(b) for b in betas),
                                   "warmup_ratio": float(warmup_ratio), "loss_average": loss_average.value})
        self._total_steps: int | None = None

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(**self._inputs(input_ids, attention_mask, position_ids)).logits

    @staticmethod
    def _inputs(input_ids, attention_mask=None, position_ids=None) -> dict:
        # packed rows: the position ids mark the examples, and an attention mask would hide that
        if position_ids is not None:
            return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    def loss(self, batch) -> tuple[torch.Tensor, int, int]:
        """(loss, supervised tokens, supervised steps) of a batch."""
        average = self.hparams.loss_average
        inputs = self._inputs(batch["input_ids"], batch.get("attention_mask"),
                              batch.get("position_ids"))
        if self.loss_impl == "full":
            logits = self.model(**inputs).logits
            return masked_nll(logits, batch["labels"], batch["step_ids"], average)
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        return supervised_nll(hidden, self.model.get_output_embeddings(), batch["labels"],
                              batch["step_ids"], average, self.loss_chunk_size)

    def _shared_step(self, batch, split: str):
        loss, n_tok, n_steps = self.loss(batch)
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
        loss = self._shared_step(batch, "train")
        if self.optimizer_in_backward:
            self.manual_backward(loss)  # every parameter is updated here, as its gradient is ready
            self.optimizers().step()  # nothing left to update: counts the optimizer step
            self.lr_schedulers().step()
        return loss

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse trainer settings that ``optimizer_in_backward`` cannot honour (one line each)."""
        if not self.optimizer_in_backward:
            return
        why = "updates each parameter as soon as its gradient is ready"
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(f"module.optimizer_in_backward=true {why}, so it cannot accumulate "
                              f"gradients: set trainer.accumulate_grad_batches=1 (got "
                              f"{trainer.accumulate_grad_batches}; a larger data.loader.batch_size "
                              f"gives larger batches)")
        if trainer.gradient_clip_val:
            raise ConfigError(f"module.optimizer_in_backward=true {why}, before the global norm "
                              f"of all gradients exists: set trainer.gradient_clip_val=null "
                              f"(got {trainer.gradient_clip_val})")
        if trainer.world_size > 1 or type(trainer.strategy).__name__ != "SingleDeviceStrategy":
            raise ConfigError(f"module.optimizer_in_backward=true {why}, before the ranks have "
                              f"averaged it or a sharding strategy has taken it: use it on one "
                              f"device without trainer.strategy (trainer=cpu or trainer=gpu)")
        if str(trainer.precision).startswith("16"):
            raise ConfigError(f"module.optimizer_in_backward=true {why}, while fp16 gradients are "
                              f"still scaled: use trainer.precision=bf16-mixed or 32-true")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = plain_states(checkpoint["optimizer_states"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = rebuilt_states(checkpoint["optimizer_states"])

    def on_fit_end(self):
        optimizer = self.optimizers(use_pl_optimizer=False) if self.trainer.optimizers else None
        if isinstance(optimizer, InBackwardOptimizer):
            optimizer.remove_hooks()  # later backward passes (another trainer) update nothing

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def on_fit_start(self):
        # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode;
        # left so, dropout and gradient checkpointing (HF applies it only in training mode)
        # would be silently off
        self.model.train()

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
            set_lr(group, base * self.lr_factor(scheduler.last_epoch))

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
        cls = optimizer_class(self.optimizer)
        settings = {"lr": hp.lr, "betas": tuple(hp.betas)}
        if cls is torch.optim.AdamW:
            # fused: one kernel over all parameters, without foreach's full-size temporaries
            # (CPU and CUDA float tensors; other devices fall back to the default)
            settings["fused"] = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
        groups = [{"params": decay, "weight_decay": hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_in_backward:
            optimizer = InBackwardOptimizer(groups, cls, **settings)
        else:
            optimizer = cls(groups, **settings)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
