"""Fine-tune an LLM agent on the selected steps of expert trajectories.

    python train.py                                    # defaults: conf/train.yaml
    python train.py selector=random ratio=0.3
    python train.py -m selector=full,random ratio=0.1,0.3
"""

import sys

import hydra
from omegaconf import DictConfig

from atlas.utils import ddp_child_argv, one_line_errors, refuse_secret_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from atlas.jobs.train import train

    with one_line_errors():
        train(cfg)


if __name__ == "__main__":
    refuse_secret_overrides(sys.argv[1:])
    sys.argv = ddp_child_argv(sys.argv)  # a DDP child runs its parent's job, not the sweep
    main()
