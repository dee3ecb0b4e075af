"""Expert trajectories from the environments' experts.

    python -m atlas.data.generate env=babyai n=500
    python -m atlas.data.generate env=wordle n=200 mistake_fraction=0.3 output=wordle.jsonl
    python -m atlas.data.generate env=maze n=50 action_format=tools format=openai   # function calls

Each trajectory is the episode as the agent sees it (the environment's instruction as system
prompt, the goal and observations as user turns, "Thought: ...\\nAction: ..." as assistant
turns), with its provenance in ``meta`` (env, task, seed, split, score, where a mistake was
injected). A ``mistake_fraction`` of the episodes contain one injected wrong action followed by
the expert's recovery, so the data holds genuine self-correction steps. Only episodes the
expert solved are written; the others are counted and logged.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Iterator

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from atlas.console import progress
from atlas.data.formats import write_trajectories
from atlas.data.trajectory import Message, Trajectory
from atlas.envs.base import Environment, Feedback, Task
from atlas.utils import refuse_secret_overrides

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def agent_turn(thought: str, action: str) -> str:
    """The assistant-turn text: the same format the rollout loop parses."""
    return f"Thought: {thought}\nAction: {action}"


def observation_turn(observation: str) -> str:
    return f"{Environment.observation_prefix}{observation}"


def expert_turns(env: Environment, mistake_at: int | None = None,
                 rng: random.Random | None = None) -> Iterator[tuple[str, str, Feedback]]:
    """Play the episode ``env`` was just reset to with its expert, turn by turn.

    Yields (thought, action, feedback) until the episode ends or ``env.max_turns`` is reached;
    at turn ``mistake_at`` the action is ``env.mistake`` and the next turn the expert's recovery.
    """
    rng = rng or random.Random(0)
    mistake = None
    for turn in range(env.max_turns):
        if turn == mistake_at:
            thought, action = env.mistake(rng)
        else:
            thought, action = env.expert_step(after_mistake=mistake)
        feedback = env.step(action)
        mistake = action if turn == mistake_at else None
        yield thought, action, feedback
        if feedback.done:
            return


def expert_episode(env: Environment, task: Task, mistake_at: int | None = None,
                   rng: random.Random | None = None) -> Trajectory:
    """Play ``task`` with the environment's expert; inject a wrong action at step ``mistake_at``.

    Returns the episode as a trajectory; ``meta`` says whether the expert solved it.
    """
    messages = [Message("user", env.reset(task))]
    feedback, turns = None, 0
    for thought, action, feedback in expert_turns(env, mistake_at, rng or random.Random(task.id)):
        messages.append(Message("assistant", agent_turn(thought, action)))
        messages.append(Message("user", observation_turn(feedback.observation)))
        turns += 1
    # The final observation only closes the episode: a trajectory ends on the agent's last step.
    messages.pop()
    injected = mistake_at if mistake_at is not None and mistake_at < turns else None
    meta = {"source": "expert", "task": task.name, "seed": task.seed, "split": task.split,
            "success": bool(feedback and feedback.success),
            "score": float(feedback.score) if feedback else 0.0,
            "final_observation": feedback.observation if feedback else None,
            "mistake_step": injected,
            "recovery_step": injected + 1 if injected is not None else None}
    return Trajectory(id=task.id, env=env.name, messages=messages, system=env.instruction,
                      meta=meta)


def generate(env: Environment, n: int, split: str = "train", offset: int = 0,
             mistake_fraction: float = 0.0, seed: int = 0,
             mistake_steps: tuple[int, int] = (1, 4)) -> tuple[list[Trajectory], int]:
    """Solved expert trajectories for the first ``n`` tasks of ``split`` (and the failures)."""
    if not 0.0 <= mistake_fraction <= 1.0:
        raise ValueError(f"mistake_fraction must be in [0, 1], got {mistake_fraction}")
    kept, failed = [], 0
    for task in progress(iterable=env.tasks(split, n, offset), desc=f"expert {env.name}",
                         unit="episode"):
        rng = random.Random(f"{seed}:{task.id}")
        mistake_at = rng.randint(*mistake_steps) if rng.random() < mistake_fraction else None
        trajectory = expert_episode(env, task, mistake_at, rng)
        if trajectory.meta["success"]:
            kept.append(trajectory)
        else:
            failed += 1
            log.warning("expert failed %s (score %.2f); not written", task.id,
                        trajectory.meta["score"])
    return kept, failed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    env = instantiate(cfg.env)
    try:
        trajectories, failed = generate(env, cfg.n, cfg.split, cfg.offset, cfg.mistake_fraction,
                                        cfg.seed, tuple(cfg.mistake_steps))
    finally:
        env.close()
    if cfg.get("action_format", "text") != "text":  # the same episodes, acted by function calls
        from atlas.rollout import ActionFormat

        actions = ActionFormat(cfg.action_format)
        trajectories = [actions.convert(t, type(env)) for t in trajectories]
    write_trajectories(cfg.output, trajectories, cfg.format)
    mistakes = sum(t.meta["mistake_step"] is not None for t in trajectories)
    steps = sum(t.num_steps for t in trajectories)
    log.info("wrote %d trajectories (%d steps, %d with a corrected mistake) to %s; "
             "%d expert failures skipped", len(trajectories), steps, mistakes,
             Path(cfg.output).resolve(), failed)


if __name__ == "__main__":
    refuse_secret_overrides(sys.argv[1:])
    sys.exit(main())
