"""BabyAI (minigrid) as a text game, with the BabyAI bot as the expert.

The agent sees a text rendering of its 7x7 egocentric view ("a purple key 2 steps ahead and 1
to your left") and acts with text commands. The expert is ``minigrid``'s ``BabyAIBot``; its
subgoal stack is the plan the thoughts state.
"""

from __future__ import annotations

import contextlib
import io
import random

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)
import numpy as np
from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT
from minigrid.envs.babyai.core.verifier import ObjDesc
from minigrid.utils.baby_ai_bot import (BabyAIBot, DropSubgoal, ExploreSubgoal, GoNextToSubgoal,
                                        OpenSubgoal, PickupSubgoal)

from atlas.envs.base import Environment, Feedback, Task, tool

#: Text command -> minigrid action index (``MiniGridEnv.Actions``).
ACTIONS = {"turn left": 0, "turn right": 1, "go forward": 2, "pick up": 3, "drop": 4,
           "toggle": 5, "done": 6}
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}
SYNONYMS = {"left": "turn left", "right": "turn right", "forward": "go forward",
            "move forward": "go forward", "pickup": "pick up", "open": "toggle",
            "open door": "toggle", "toggle door": "toggle"}
STATES = {0: "open", 1: "closed", 2: "locked"}
VIEW_X, VIEW_Y = 3, 6  # the agent's cell in the egocentric image, facing "up"


def where(ahead: int, lateral: int) -> str:
    """'2 steps ahead and 1 to your left' for a view offset (lateral > 0 is right)."""
    parts = []
    if ahead:
        n = abs(ahead)
        parts.append(f"{n} step{'s' * (n > 1)} {'ahead' if ahead > 0 else 'behind'}")
    if lateral:
        parts.append(f"{abs(lateral)} to your {'right' if lateral > 0 else 'left'}")
    return " and ".join(parts) or "here"


def render_view(image: np.ndarray, carrying=None) -> str:
    """Describe the objects, doors and the wall ahead in an egocentric 7x7x3 view."""
    things = []
    for j in range(VIEW_Y, -1, -1):  # nearest rows first
        for i in range(image.shape[0]):
            kind, color, state = (int(v) for v in image[i, j])
            name = IDX_TO_OBJECT[kind]
            if name in ("unseen", "empty", "wall", "floor", "agent") or (i, j) == (VIEW_X, VIEW_Y):
                continue
            label = f"{IDX_TO_COLOR[color]} {name}"
            if name == "door":
                label = f"{STATES[state]} {label}"
            article = "an" if label[0] in "aeiou" else "a"
            things.append(f"{article} {label} {where(VIEW_Y - j, i - VIEW_X)}")
    ahead = 1
    while ahead <= VIEW_Y and IDX_TO_OBJECT[int(image[VIEW_X, VIEW_Y - ahead, 0])] in ("empty",
                                                                                        "floor"):
        ahead += 1
    front = IDX_TO_OBJECT[int(image[VIEW_X, VIEW_Y - ahead, 0])] if ahead <= VIEW_Y else "unseen"
    lines = [f"You see {', '.join(things)}." if things else "You see no objects."]
    if front == "wall":
        lines.append(f"There is a wall {where(ahead, 0)}.")
    lines.append(f"You are carrying {'a ' + carrying.color + ' ' + carrying.type if carrying else 'nothing'}.")
    return " ".join(lines)


def parse_action(text: str) -> int | None:
    """A minigrid action index for a text command, or None."""
    key = " ".join(text.lower().replace("_", " ").strip(" .!\"'`[]").split())
    key = SYNONYMS.get(key, key)
    return ACTIONS.get(key)


class BabyAIEnv(Environment):
    """BabyAI levels as a text game.

    Args:
        name: Registry name.
        tasks: BabyAI level ids (e.g. "BabyAI-GoToLocal-v0").
        max_turns: Turn cap.
    """

    instruction = (
        "You are an agent in a grid world. You see what is in front of you and to your sides. "
        "Complete the mission. Each turn, answer with your reasoning and one action:\n"
        "Thought: <reasoning>\nAction: <one of: turn left, turn right, go forward, pick up, drop, "
        "toggle>\n'toggle' opens the door in front of you; 'pick up' takes the object in front of "
        "you.")

    tools_instruction = (
        "You are an agent in a grid world. You see what is in front of you and to your sides. "
        "Complete the mission. 'toggle' opens the door in front of you; 'pick_up' takes the "
        "object in front of you.")
    tools = [tool(a.replace(" ", "_"), f"{a.capitalize()}.") for a in ACTIONS if a != "done"]

    @classmethod
    def action_to_call(cls, action: str) -> tuple[str, dict] | None:
        index = parse_action(action)
        return None if index is None else (ACTION_NAMES[index].replace(" ", "_"), {})

    @classmethod
    def call_to_action(cls, name: str, args: dict) -> str | None:
        action = name.replace("_", " ")
        return action if action in ACTIONS else None

    def __init__(self, name: str, tasks: list[str], max_turns: int = 30):
        super().__init__(name, tasks, max_turns)
        self._envs: dict[str, gym.Env] = {}
        self.env = self.bot = self.obs = None

    @classmethod
    def canonical_action(cls, action: str | None) -> str | None:
        index = parse_action(action or "")  # "forward", "move forward" and "go forward" agree
        return None if index is None else ACTION_NAMES[index]

    def reset(self, task: Task) -> str:
        if task.name not in self._envs:
            self._envs[task.name] = gym.make(task.name)
        self.env = self._envs[task.name]
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints "Sampling rejected"
            self.obs, _ = self.env.reset(seed=task.seed)
        self.bot, self.last_action, self.done = None, None, False
        return f"Your mission: {self.obs['mission']}.\n{self._describe()}"

    def _describe(self) -> str:
        return render_view(self.obs["image"], self.env.unwrapped.carrying)

    def step(self, action: str) -> Feedback:
        if self.done:
            return Feedback("The episode is over.", done=True)
        index = parse_action(action)
        if index is None:
            return Feedback(f"Invalid action {action!r}. Valid actions: "
                            f"{', '.join(list(ACTIONS)[:-1])}.")
        self.obs, reward, terminated, truncated, _ = self.env.step(index)
        self.last_action, self.done = index, terminated or truncated
        success = terminated and reward > 0
        observation = self._describe()
        if success:
            observation = "Mission complete. " + observation
        return Feedback(observation, done=self.done, score=float(reward), success=success)

    # ---- expert ------------------------------------------------------------------------------
    def _replan(self) -> int:
        # The bot must replan exactly once per engine step: asked again without a step (after an
        # invalid action), it would take the last action as repeated.
        if self.bot is None:
            self.bot = BabyAIBot(self.env)
            self.suggestion = self.bot.replan()
        elif self.last_action is not None:
            self.suggestion = self.bot.replan(self.last_action)
            self.last_action = None
        return self.suggestion

    def _target(self, subgoal) -> tuple[str, str | None] | None:
        """The object a subgoal is about, and where the bot knows it to be (None: not seen)."""
        datum = getattr(subgoal, "datum", None)
        if isinstance(datum, ObjDesc):
            obj, pos = self.bot._find_obj_pos(datum, adjacent=subgoal.reason == "PutNext")
            if obj is None:
                return " ".join(x for x in (datum.color, datum.type or "object") if x), None
        elif hasattr(datum, "color"):  # an object the bot holds a reference to (a door)
            obj, pos = datum, datum.cur_pos
        else:
            return None
        u = self.env.unwrapped
        delta = np.asarray(pos) - np.asarray(u.agent_pos)
        return (f"{obj.color} {obj.type}",
                where(int(delta @ u.dir_vec), int(delta @ u.right_vec)))

    def _describe_subgoal(self, subgoal) -> str:
        target = self._target(subgoal)
        target = target and target[0]
        if isinstance(subgoal, GoNextToSubgoal):
            if subgoal.reason == "Explore":
                return "explore the unseen part of the room"
            if target:
                return f"go next to the {target}" + (" to put it there" if subgoal.reason ==
                                                     "PutNext" else "")
            return f"move to cell {tuple(int(v) for v in subgoal.datum)}"
        if isinstance(subgoal, OpenSubgoal):
            return "unlock the door in front" if subgoal.reason == "Unlock" else "open the door"
        if isinstance(subgoal, PickupSubgoal):
            return "pick up the object in front"
        if isinstance(subgoal, DropSubgoal):
            return "drop what I carry"
        if isinstance(subgoal, ExploreSubgoal):
            return "explore to find what I need"
        return type(subgoal).__name__

    def _why(self, action: int, subgoal) -> str:
        target, seen = self._target(subgoal) or (None, None)
        there = (f"The {target} is {seen}. " if seen else
                 f"I have not seen the {target} yet. " if target else "")
        way = "the way to it" if target else "unexplored cells"
        reason = {0: f"I turn left to face {way}.", 1: f"I turn right to face {way}.",
                  2: "Going forward brings me closer.", 3: "It is right in front of me: pick it up.",
                  4: "The spot in front is free: drop it here.",
                  5: "The door is right in front of me: open it.",
                  6: "The mission should be complete."}[action]
        return there + reason

    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        action = self._replan()
        stack = list(reversed(self.bot.stack))
        current = self._describe_subgoal(stack[0]) if stack else "finish"
        if after_mistake is not None:
            head = (f"'{after_mistake}' was a mistake: it did not serve my subgoal "
                    f"({current}). Correcting course.")
        elif self.env.unwrapped.step_count == 0:
            plan = "; ".join(f"{k + 1}. {self._describe_subgoal(s)}" for k, s in enumerate(stack))
            head = f"Mission: {self.obs['mission']}. Plan: {plan}."
        else:
            head = f"Current subgoal: {current}."
        return f"{head} {self._why(action, stack[0] if stack else None)}", ACTION_NAMES[action]

    def mistake(self, rng: random.Random) -> tuple[str, str]:
        suggested = self._replan()  # keeps the bot in step with the episode
        # Only moves and turns: the bot can plan around them (picking up or toggling a box can
        # make a mission unsolvable).
        action = rng.choice([a for a in (0, 1, 2) if a != suggested])
        return (f"I am not sure where to go; I will try to {ACTION_NAMES[action]}.",
                ACTION_NAMES[action])

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
