"""From trajectory files to batches: loading, the train/val split, and the LightningDataModule."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections import Counter
from typing import Iterable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from transformers.trainer_pt_utils import get_length_grouped_indices

from atlas.data.formats import read_trajectories
from atlas.data.masking import (IGNORE_INDEX, Example, MaskingError, NothingToSuperviseError,
                                 Overflow, StepOverflowError, encode)
from atlas.data.trajectory import Trajectory
from atlas.utils import ConfigError, names

log = logging.getLogger(__name__)


def load_trajectories(files: Sequence[str], format: str = "auto", env: str | None = None,
                      limit: int | None = None, tasks: Sequence[str] | None = None
                      ) -> list[Trajectory]:
    """Read trajectory files; keep those of the task families ``tasks`` (``meta.task``; None:
    all), then the first ``limit``.

    Several files are interleaved round-robin (first of each file, then second, ...), so a
    ``limit`` over per-environment files keeps a balanced mix.
    """
    if isinstance(files, str):
        files = [files]
    if not files:
        raise ConfigError("data.files is empty: give at least one trajectory file")
    per_file = [read_trajectories(f, format=format, env=env) for f in files]
    if tasks is not None:
        tasks = set(names(tasks, "data.tasks"))
        families = {t.meta["task"] for group in per_file for t in group if t.meta.get("task")}
        if not families:
            raise ConfigError("data.tasks needs trajectories that record their task family "
                              "(meta.task, as atlas's generator writes it); data.files have none")
        missing = sorted(tasks - families)
        if missing:
            raise ConfigError(f"data.tasks: no trajectory of task family {missing[0]!r} in "
                              f"data.files (their families: {', '.join(sorted(families))})")
        per_file = [[t for t in group if t.meta.get("task") in tasks] for group in per_file]
    out = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
    dup = [i for i, n in Counter(t.id for t in out).items() if n > 1]
    if dup:
        raise ConfigError(f"data.files: trajectory ids repeat across files: {dup[:5]}")
    return out if limit is None else out[:limit]


def split_trajectories(trajectories: Sequence[Trajectory], val_fraction: float
                       ) -> tuple[list[Trajectory], list[Trajectory]]:
    """Hold out ``val_fraction`` of the trajectories, chosen by a hash of their id.

    The split depends on the ids only, not on the seed or the file order, so every selector,
    ratio and seed of a sweep is validated on the same trajectories.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    n_val = int(round(len(trajectories) * val_fraction))
    order = sorted(trajectories, key=lambda t: hashlib.sha1(t.id.encode()).hexdigest())
    val_ids = {t.id for t in order[:n_val]}
    return ([t for t in trajectories if t.id not in val_ids],
            [t for t in trajectories if t.id in val_ids])


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch."""
    width = max(len(e.input_ids) for e in examples)

    def pad(rows: Iterable[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    return {
        "input_ids": pad((e.input_ids for e in examples), pad_token_id),
        "attention_mask": pad(([1] * len(e.input_ids) for e in examples), 0),
        "labels": pad((e.labels for e in examples), IGNORE_INDEX),
        "step_ids": pad((e.step_ids for e in examples), -1),
    }


def pack(examples: Sequence[Example], capacity: int) -> list[list[Example]]:
    """Bins of examples whose lengths sum to at most ``capacity`` (first-fit decreasing).

    Deterministic: the same examples always give the same bins; an example longer than the
    capacity gets a bin of its own.
    """
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        i = next((i for i, r in enumerate(room) if r >= n), None)
        if i is None:
            bins.append([ex])
            room.append(capacity - n)
        else:
            bins[i].append(ex)
            room[i] -= n
    return bins


def collate_packed(bins: list[list[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each bin's examples laid end to end in one row, with ``position_ids`` restarting at 0 for
    each example. Transformers reads the restarts as sequence boundaries (no attention across
    them) when no ``attention_mask`` is passed; ``attention_mask`` here only marks the padding
    for statistics. Step ids are offset per example, so a step average keeps steps apart."""
    rows = []
    for examples in bins:
        ids, labels, steps, positions = [], [], [], []
        offset = 0
        for ex in examples:
            ids += ex.input_ids
            # the first token of an example is never predicted from the previous example's last
            labels += [IGNORE_INDEX] + ex.labels[1:]
            steps += [-1] + [k + offset if k >= 0 else -1 for k in ex.step_ids[1:]]
            positions += list(range(len(ex.input_ids)))
            offset += ex.num_steps
        rows.append((ids, labels, steps, positions))
    width = max(len(r[0]) for r in rows)
    batch = collate([Example("packed", r[0], r[1], r[2], 0, []) for r in rows], pad_token_id)
    # padding continues as a segment of its own, which attends only to itself
    batch["position_ids"] = torch.tensor([r[3] + list(range(width - len(r[3]))) for r in rows],
                                         dtype=torch.long)
    return batch


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which each run of ``batch_size`` items has similar lengths, so a batch
    carries little padding (transformers' ``get_length_grouped_indices``: random mega-batches
    of up to 50 batches, sorted by length inside, the longest batch first so an out-of-memory
    error shows at the first step).

    The order depends only on ``seed`` and the epoch (Lightning calls :meth:`set_epoch`), so a
    run resumed mid-epoch replays the same order and skips what it already trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class TrajectoryDataModule(L.LightningDataModule):
    """Masked examples of the selected training trajectories, and validation examples.

    Validation examples supervise every candidate step of the held-out trajectories (every step
    the source file marks trainable), whatever the selector, so ``val/loss`` is comparable across
    selectors and ratios.

    Args:
        train: Training trajectories, with the selection applied.
        val: Validation trajectories as read (all their candidate steps are scored).
        tokenizer: Tokenizer with the model's chat template.
        max_length: Longest sequence; see :func:`atlas.data.masking.encode` for ``overflow``.
        overflow: ``drop_steps`` or ``error``.
        special_tokens_in_text: ``error``, ``warn`` or ``allow``: see
            :func:`atlas.data.masking.tokenize_steps`.
        tools_as_text: Write tool calls, results and schemas into the text
            (:meth:`Trajectory.as_text`) instead of passing them to the chat template, for
            models whose template cannot render tools.
        batch_size: Examples per batch (rows of packed examples under ``packing``).
        packing: Lay several training examples end to end in one row of up to
            ``pack_length`` tokens (position ids restart per example; no attention across
            examples), so a batch carries no padding and fewer, fuller rows.
        pack_length: Tokens per packed row (None: ``max_length``, or 4096 without one).
        group_by_length: Batch training examples (or packed rows) of similar lengths together
            (:class:`LengthGroupedSampler`), so ``batch_size > 1`` pays for little padding.
        seed: Seed of the shuffled order (None: torch's initial seed, which
            ``L.seed_everything`` sets to the run's ``seed``).
        num_workers: DataLoader workers.
        granularity: Which part of each selected training step is supervised: ``step``,
            ``action`` or ``thought`` (``selector.granularity``; :func:`encode`). Validation
            always scores whole steps, so ``val/loss`` stays comparable across granularities.
    """

    def __init__(self, train: list[Trajectory], val: list[Trajectory], tokenizer,
                 max_length: int | None = 1024, overflow: str = "drop_steps", batch_size: int = 1,
                 num_workers: int = 0, packing: bool = False, pack_length: int | None = None,
                 group_by_length: bool = False, seed: int | None = None,
                 special_tokens_in_text: str = "warn", tools_as_text: bool = False,
                 granularity: str = "step"):
        super().__init__()
        self.granularity = granularity  # checked by encode()
        self.tools_as_text = tools_as_text
        self.train_trajectories, self.val_trajectories = train, val
        self.tokenizer = tokenizer
        self.max_length, self.overflow = max_length, Overflow.of(overflow, "data.loader.overflow")
        self.special_tokens_in_text = special_tokens_in_text
        self.batch_size, self.num_workers = batch_size, num_workers
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"data.loader.pack_length must be >= 1 (or null), got {pack_length}")
        self.packing = packing
        self.pack_length = pack_length or max_length or 4096
        self.group_by_length = group_by_length
        self.seed = torch.initial_seed() if seed is None else seed
        self.train_examples: list[Example] | None = None
        self.val_examples: list[Example] = []
        self.stats: dict[str, float] = {}

    def _encode_all(self, trajectories: list[Trajectory], split: str,
                    granularity: str = "step") -> list[Example]:
        examples, unselected, overflowed, dropped_steps = [], [], [], 0
        for t in trajectories:
            if not t.selected_steps:
                unselected.append(t.id)
                continue
            try:
                ex = encode(t.as_text() if self.tools_as_text else t, self.tokenizer,
                            self.max_length, self.overflow, self.special_tokens_in_text,
                            granularity)
            except NothingToSuperviseError:
                unselected.append(t.id)
                continue
            except StepOverflowError:
                if self.overflow == "error":
                    raise
                overflowed.append(t.id)
                dropped_steps += len(t.selected_steps)
                continue
            dropped_steps += len(ex.dropped_steps)
            examples.append(ex)
        if unselected:
            log.warning("%s: %d trajectories have no selected step%s and are left out (e.g. %s)",
                        split, len(unselected), "" if granularity == "step" else
                        f" with a {granularity}", unselected[:3])
        if dropped_steps:
            log.warning("%s: %d selected steps end past max_length=%s and are not supervised",
                        split, dropped_steps, self.max_length)
        if overflowed:
            log.warning("%s: %d trajectories lost every selected step to max_length and are left "
                        "out (e.g. %s)", split, len(overflowed), overflowed[:3])
        if not examples:
            raise MaskingError(f"{split}: no example has a supervised token "
                               f"({len(trajectories)} trajectories)")
        self.stats.update({f"{split}/trajectories_skipped": len(unselected) + len(overflowed),
                           f"{split}/steps_dropped_max_length": dropped_steps})
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        self.train_examples = self._encode_all(self.train_trajectories, "train", self.granularity)
        if self.val_trajectories:  # as read: every candidate step of the source is scored
            self.val_examples = self._encode_all(self.val_trajectories, "val")
        ex = self.train_examples
        n_steps = sum(t.num_steps for t in self.train_trajectories)
        n_sel = sum(len(e.selected_steps) for e in ex)
        self.stats.update({
            "train/examples": len(ex),
            "train/steps": n_steps,
            "train/supervised_steps": n_sel,
            "train/supervised_step_fraction": n_sel / n_steps if n_steps else 0.0,
            "train/tokens": sum(len(e.input_ids) for e in ex),
            "train/supervised_tokens": sum(e.num_supervised_tokens for e in ex),
            "val/examples": len(self.val_examples),
        })

    def _loader(self, items: list, shuffle: bool, packed: bool = False) -> DataLoader:
        # Stateful: a checkpoint taken mid-epoch resumes at the next unseen batch of the same
        # shuffled order, instead of replaying the epoch from its start.
        fn = collate_packed if packed else collate
        sampler = None
        if shuffle and self.group_by_length:
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:
                log.warning("data.loader.group_by_length has no effect under DDP: Lightning's "
                            "distributed sampler shuffles the order it is given")
            lengths = [sum(len(e.input_ids) for e in i) if packed else len(i.input_ids)
                       for i in items]
            sampler, shuffle = LengthGroupedSampler(lengths, self.batch_size, self.seed), False
            # Lightning sets the epoch at each epoch's start, but a run resumed mid-epoch draws
            # its order before that: start from the trainer's epoch
            sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return StatefulDataLoader(items, batch_size=self.batch_size, shuffle=shuffle,
                                  sampler=sampler, num_workers=self.num_workers,
                                  collate_fn=functools.partial(
                                      fn, pad_token_id=self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        if self.packing:
            return self._loader(pack(self.train_examples, self.pack_length), shuffle=True,
                                packed=True)
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []
