"""Evaluate an agent on the held-in and held-out test tasks.

    python evaluate.py                                          # the base model
    python evaluate.py checkpoint=logs/train/runs/<run>/model   # a model trained by train.py
    python evaluate.py eval.episodes=20 eval.batch_size=32
"""

import sys

import hydra
from omegaconf import DictConfig

from atlas.utils import one_line_errors, refuse_secret_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from atlas.jobs.evaluate import evaluate

    with one_line_errors():
        evaluate(cfg)


if __name__ == "__main__":
    refuse_secret_overrides(sys.argv[1:])
    main()
