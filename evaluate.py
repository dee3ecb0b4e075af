"""Evaluate an agent on the held-in and held-out test tasks.

    python evaluate.py                                          # the base model
    python evaluate.py checkpoint=logs/train/runs/<run>/model   # a model trained by train.py
    python evaluate.py eval.episodes=20 eval.batch_size=32
"""

import sys

import hydra
from omegaconf import DictConfig

from atlas.utils import secret_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from atlas.evaluation import run

    run(cfg)


if __name__ == "__main__":
    if bad := secret_overrides(sys.argv[1:]):
        sys.exit(f"refusing to start: {', '.join(bad)} would put a secret on the command line, and "
                 f"Hydra saves overrides to disk. Set it in the environment instead.")
    main()
