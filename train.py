"""Fine-tune an LLM agent on the selected steps of expert trajectories.

    python train.py                                    # defaults: conf/train.yaml
    python train.py selector=random ratio=0.3
    python train.py -m selector=full,random ratio=0.1,0.3
"""

import sys

import hydra
from omegaconf import DictConfig

from atlas.utils import secret_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from atlas.training import train

    train(cfg)


if __name__ == "__main__":
    if bad := secret_overrides(sys.argv[1:]):
        sys.exit(f"refusing to start: {', '.join(bad)} would put a secret on the command line, and "
                 f"Hydra saves overrides to disk. Set it in the environment instead "
                 f"(OPENAI_API_KEY, ANTHROPIC_API_KEY, WANDB_API_KEY).")
    main()
