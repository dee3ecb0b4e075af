"""The interface every environment implements, for the expert generator and the rollout loop.

An environment is a text game: ``reset(task)`` returns the goal and the first observation,
``step(action)`` returns what the action did. It also carries an *expert* that knows the
game's internal state: ``expert_step()`` returns the expert's (thought, action) for the current
state, with a thought that states real information (plan, what was observed, why the action
matters), so that a step selector has something to judge. ``mistake()`` returns a plausible
wrong action, used to build trajectories with a genuine self-correction step.

With ``action_format=tools`` the same games are played by function calling: each environment
lists its actions as ``tools`` (JSON schemas) and maps a call to the action text it stands for
(``call_to_action``) and back (``action_to_call``). The default is one tool, ``act``, that takes
the game's command as text (TextWorld-Express, ScienceWorld); BabyAI, Maze and Wordle have one
tool per action or a typed argument.

Environments never raise on a bad action string: an unknown or invalid action is answered with
an observation saying so. A crash of the engine itself is an exception, which the rollout loop
records as a failed episode.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import random
import re
from dataclasses import dataclass

from atlas.utils import Choice


class Split(Choice):
    """Which tasks: those the expert data comes from, or the test tasks (never the same)."""

    TRAIN = "train"
    TEST = "test"


# ScienceWorld and TextWorld-Express talk to their JVMs through py4j, which logs every socket
# it opens at INFO level into the job's log.
for _name in ("py4j", "scienceworld"):  # (and ScienceWorld every task load)
    logging.getLogger(_name).setLevel(logging.WARNING)


ACTION = re.compile(r"\baction[ \t]*:", re.IGNORECASE)


def parse_action(text: str) -> str | None:
    """The action of an agent turn ("Thought: ...\\nAction: go north"), or None.

    The last line with a non-empty ``Action:`` wins (a model may restate the format before
    answering), and within a line the text after its last ``Action:``: "Thought: Action: go
    forward" is "go forward", as AgentGym's clients read it (they search for "Action:"
    anywhere, not at the start of a line).
    """
    for line in reversed(text.splitlines()):
        ends = [m.end() for m in ACTION.finditer(line)]
        if ends and (action := line[ends[-1]:].strip()):
            return action
    return None


def action_start(text: str) -> int | None:
    """Where the action of an agent turn begins in ``text`` (None: it has none): the last
    ``Action:`` followed by any text, on its line (as :func:`parse_action` reads it) or on the
    next ones (AgentGym's "Action:\\n<action>"); or a tool call written into the text
    (``<tool_call>``, :meth:`Trajectory.as_text`)."""
    call = text.find("<tool_call>")
    if call >= 0:
        return call
    for m in reversed(list(ACTION.finditer(text))):
        if text[m.end():].strip():
            return m.start()
    return None


@dataclass(frozen=True)
class Task:
    """One episode's task: which game, which variant, which seed, which split.

    Attributes:
        env: Environment name ("babyai", "scienceworld", ...).
        name: Task family within the environment (a BabyAI level, a ScienceWorld task, ...).
        seed: Seed or variation index that fixes the episode.
        split: "train" (expert data) or "test" (evaluation). The two never share (name, seed).
    """

    env: str
    name: str
    seed: int
    split: str

    @property
    def id(self) -> str:
        return f"{self.env}/{self.name}/{self.split}/{self.seed}"


@dataclass(frozen=True)
class Feedback:
    """What one action did.

    Attributes:
        observation: Text shown to the agent.
        done: Whether the episode is over (solved, failed, or out of moves in the engine).
        score: The episode's score so far, in [0, 1].
        success: Whether the task is solved.
    """

    observation: str
    done: bool = False
    score: float = 0.0
    success: bool = False


def tool(name: str, description: str, properties: dict | None = None) -> dict:
    """A function-calling tool schema (OpenAI / Hugging Face layout)."""
    properties = properties or {}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": sorted(properties)}}}


TOOLS_NOTE = "Each turn, write your reasoning, then call exactly one tool."


class Environment(abc.ABC):
    """A text environment with an expert.

    Args:
        name: Registry name, used in task ids and results ("babyai").
        tasks: Task families to draw episodes from.
        max_turns: Turn cap for an episode (expert generation and evaluation).
    """

    #: Rules and action format, used as the system prompt of every episode.
    instruction: str = ""
    #: The actions as function-calling tools (``action_format=tools``).
    tools: list[dict] = [tool("act", "Send one command to the game, in the game's words.",
                              {"command": {"type": "string"}})]
    #: The rules without the text action format, for ``action_format=tools`` (None:
    #: ``instruction``); :data:`TOOLS_NOTE` is appended.
    tools_instruction: str | None = None
    #: How the agent may act here (``action_format``).
    action_formats: tuple[str, ...] = ("text", "tools")
    #: Put before every observation after the first (a user turn).
    observation_prefix: str = "Observation: "
    #: Whether ``expert_step`` works (step-level evaluation writes test trajectories with it).
    has_expert: bool = True
    #: Whether ``step`` waits on I/O (a server): the rollout loop then steps episodes in threads.
    remote: bool = False

    @classmethod
    def opening(cls) -> list[tuple[str, str]]:
        """(role, text) turns of every episode before its first observation (AgentGym's
        clients open with the instruction and the model's "OK"); none by default."""
        return []

    @classmethod
    def read_action(cls, text: str) -> str | None:
        """The action written in an agent turn of the text format (None: none)."""
        return parse_action(text)

    @classmethod
    def system_prompt(cls, action_format: str = "text") -> str:
        if action_format == "text":
            return cls.instruction
        return f"{cls.tools_instruction or cls.instruction}\n\n{TOOLS_NOTE}"

    @classmethod
    def action_to_call(cls, action: str) -> tuple[str, dict] | None:
        """The tool call that stands for a text action (None: it stands for none)."""
        return "act", {"command": action}

    @classmethod
    def call_to_action(cls, name: str, args: dict) -> str | None:
        """The text action a tool call stands for, or None (an unknown tool, bad arguments)."""
        command = args.get("command") if name == "act" else None
        return command.strip() or None if isinstance(command, str) else None

    def __init__(self, name: str, tasks: list[str], max_turns: int = 30):
        if not tasks:
            raise ValueError(f"environment {name}: 'tasks' is empty")
        self.name = name
        self.task_names = list(tasks)
        self.max_turns = max_turns

    # ---- tasks -------------------------------------------------------------------------------
    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        """``n`` tasks of ``split``, cycling through the task families (deterministic)."""
        Split.of(split, "split")
        out = []
        for i in range(offset, offset + n):
            name = self.task_names[i % len(self.task_names)]
            out.append(Task(self.name, name, self.seed_for(name, split, i // len(self.task_names)),
                            split))
        return out

    def seed_for(self, name: str, split: str, index: int) -> int:
        """The ``index``-th seed of ``split`` for task family ``name``.

        The default keeps train seeds below 1,000,000 and test seeds at or above it, so the two
        splits never overlap. Engines with their own split (ScienceWorld variations,
        TextWorld-Express folds) override this.
        """
        return index if split == "train" else 1_000_000 + index

    # ---- episode -----------------------------------------------------------------------------
    @abc.abstractmethod
    def reset(self, task: Task) -> str:
        """Start ``task``; return the goal and the first observation."""

    @abc.abstractmethod
    def step(self, action: str) -> Feedback:
        """Apply ``action`` (free text); never raises for a bad action."""

    @classmethod
    def canonical_action(cls, action: str | None) -> str | None:
        """``action`` as the engine understands it, or None where the engine would reject its
        form: two actions with the same canonical form do the same thing. Step-level
        evaluation compares a model's action with the expert's this way. The default (the
        engines that match exact commands, case-insensitively): lower case, single spaces."""
        text = " ".join((action or "").split()).lower()
        return text or None

    # ---- expert ------------------------------------------------------------------------------
    @abc.abstractmethod
    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        """The expert's (thought, action) for the current state.

        Args:
            after_mistake: The wrong action just taken, when the previous step was an injected
                mistake: the thought then says what went wrong and how the plan resumes.
        """

    @abc.abstractmethod
    def mistake(self, rng: random.Random) -> tuple[str, str]:
        """A plausible but wrong (thought, action) for the current state."""

    def close(self) -> None:
        """Release engine resources (JVMs, subprocesses)."""


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)
