"""Padding share of training batches, shuffled vs length-grouped (`data.loader.group_by_length`).

    python bench/padding.py                  # 40 BabyAI + 40 Wordle default trajectories

Prints, per batch size, the share of padded positions over one epoch of each order.
"""

from __future__ import annotations

import torch

from atlas.data import read_trajectories
from atlas.data.datamodule import TrajectoryDataModule
from atlas.model import load_tokenizer


def padding_share(trajectories, tokenizer, batch_size: int, group_by_length: bool) -> float:
    data = TrajectoryDataModule(trajectories, [], tokenizer, batch_size=batch_size,
                                group_by_length=group_by_length, seed=0)
    data.setup("fit")
    torch.manual_seed(0)  # the shuffled order's generator
    pad = total = 0
    for batch in data.train_dataloader():
        pad += int((batch["attention_mask"] == 0).sum())
        total += batch["attention_mask"].numel()
    return pad / total


def main() -> None:
    tokenizer = load_tokenizer("pkg://atlas/assets/smollm2_tokenizer")
    trajectories = [t.with_selection(range(t.num_steps)) for t in
                    read_trajectories("pkg://atlas/data/default/babyai.jsonl")[:40] +
                    read_trajectories("pkg://atlas/data/default/wordle.jsonl")[:40]]
    print(f"{'batch':>5} {'shuffled':>9} {'grouped':>8}")
    for batch_size in (2, 4, 8):
        shuffled, grouped = (padding_share(trajectories, tokenizer, batch_size, g)
                             for g in (False, True))
        print(f"{batch_size:>5} {100 * shuffled:>8.1f}% {100 * grouped:>7.1f}%")


if __name__ == "__main__":
    main()
