"""ScienceWorld (Wang et al., 2022): elementary-science tasks in a simulated house, on its JVM.

Choices (the rollout loop and the generator rely on them):
    * Actions go straight to the server's ``step``: the wrapper's ``step`` also lists every
      valid action (400-3000 strings) on each call, 36 ms a step on average on the default
      tasks (p95 100 ms, far more on tasks with more objects) against 5 ms (p95 14 ms).
    * Split: a task's seed IS the engine's variation index, the ``index``-th of
      ``get_variations_train()`` or ``get_variations_test()`` (disjoint lists); past a family's
      count the variations repeat.
    * Observations: room listings are folded onto one line, without "the agent" and "air" (in
      every room), doors as "door to kitchen (closed)" (the words the actions use).
    * Score: the engine's score clipped to [0, 1]; success when the engine completes the task.
      The episode ends on completion, on failure (engine score below 0, e.g. focusing on a
      wrong object) or after ``step_limit`` engine moves ("wait" takes 10).
    * Unparseable actions are answered "No known action matches that input." and take no
      time. "Ambiguous request: ..." lists numbered options; the agent answers with a number.
    * Expert: replays the engine's gold path from its position in it, with a "look around"
      (free) on arriving where it focuses on or picks up something. A mistake is a gold
      action taken too early, or a trip to a room not in reach, naming something not visible
      from here, so the engine rejects it without time passing and the gold path still holds.
"""

from __future__ import annotations

import random
import re

from atlas.envs.base import Environment, Feedback, Task

NO_MATCH = "No known action matches that input."
ROOMS = ("kitchen", "bathroom", "workshop", "art studio", "greenhouse", "hallway", "bedroom",
         "living room", "foundry", "outside")
VERBS = ("open door to", "go to", "focus on", "pick up", "move", "connect", "look around",
         "wait1", "wait")
ROOM_LINE = re.compile(r"^This (?:room|outside location) is called the (.+?)\.")
MOVED = re.compile(r"^You (?:move|teleport) to the (.+?)\.")


def compact(observation: str) -> str:
    """Fold the engine's tab-indented listings onto their heading line."""
    lines: list[str] = []
    for line in observation.strip().split("\n"):
        item = line.strip()
        if not line.startswith("\t") or not lines:
            lines.append(item)
        elif item not in ("the agent", "a substance called air"):
            item = re.sub(r"^A door to the (.+?) \(that is (\w+)\)$", r"door to \1 (\2)", item)
            lines[-1] += (" " if lines[-1].endswith(":") else ", ") + item
    return "\n".join(lines)


def parse(action: str) -> tuple[str, str, str]:
    """(verb, object, second object) of a gold action; other verbs give (action, "", "")."""
    verb = next((v for v in VERBS if action == v or action.startswith(v + " ")), None)
    if verb is None:
        return action, "", ""
    rest = action[len(verb):].strip()
    if verb in ("move", "connect") and " to " in rest:
        first, second = rest.rsplit(" to ", 1) if verb == "move" else rest.split(" to ", 1)
        return verb, first.removesuffix(" in inventory"), second
    return verb, rest, ""


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


class ScienceWorldEnv(Environment):
    """ScienceWorld tasks with a gold-path expert (see the module docstring for the rules)."""

    instruction = (
        "You are an agent in ScienceWorld, a simulated house with rooms, objects, living things "
        "and devices. Complete the task given at the start. One action per turn, e.g.: look "
        "around, open door to kitchen, go to kitchen, pick up OBJ, move OBJ to CONTAINER, focus "
        "on OBJ, look at OBJ, connect OBJ to OBJ, activate OBJ, wait1, inventory. Focus on an "
        "object only when it is the one the task asks for: focusing on a wrong object fails the "
        "task. If the game answers 'Ambiguous request', reply with the number of the option "
        "you meant.")

    def __init__(self, name: str = "scienceworld", tasks: list[str] = ("find-animal",),
                 max_turns: int = 30, simplifications: str = "", step_limit: int = 200):
        super().__init__(name, list(tasks), max_turns)
        from scienceworld import ScienceWorldEnv as Engine

        self.simplifications, self.step_limit = simplifications, step_limit
        self._engine = Engine("", envStepLimit=step_limit)  # one JVM, reused by every reset
        self._server = self._engine.server
        self._variations: dict[tuple[str, str], list[int]] = {}
        self.gold: list[str] = []
        self.position, self.done = 0, True
        self.goal = self.description = self.last = self.room = ""
        self.score, self.success = 0.0, False

    def variations(self, name: str, split: str) -> list[int]:
        """The engine's variation indices of family ``name`` for ``split`` (cached)."""
        if (name, split) not in self._variations:
            self._engine.load(name, 0, self.simplifications)
            train = self._engine.get_variations_train()
            test = self._engine.get_variations_test()
            assert not set(train) & set(test), f"{name}: engine train/test variations overlap"
            self._variations[(name, "train")], self._variations[(name, "test")] = train, test
        return self._variations[(name, split)]

    def seed_for(self, name: str, split: str, index: int) -> int:
        pool = self.variations(name, split)
        return pool[index % len(pool)]

    # ---- episode -----------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        if task.seed not in self.variations(task.name, task.split):
            raise ValueError(f"{task.id}: variation {task.seed} is not in the {task.split} split")
        self._engine.load(task.name, task.seed, self.simplifications, generateGoldPath=True)
        self._server.reset()
        self.gold = []
        for action in self._engine.get_gold_action_sequence():
            if action.startswith(("focus on ", "pick up ")) and self.gold and \
                    self.gold[-1].startswith("go to "):
                self.gold.append("look around")  # see the room before choosing (free: no time)
            self.gold.append(action)
        self.position, self.done, self.score, self.success = 0, False, 0.0, False
        description = self._server.getTaskDescription()
        match = re.search(r"Your task is to (.+?)\.", description)
        self.goal = match.group(1) if match else description
        self.description = description
        self.last = compact(self._server.freeActionLook())
        self.room = self._where(self.last, "hallway")
        return f"Task: {description.strip()}\n{self.last}"

    def step(self, action: str) -> Feedback:
        if self.done:
            return Feedback("The episode is over.", True, self.score, self.success)
        action = " ".join(str(action or "").split())  # the engine reads one line
        observation = compact(self._server.step(action))
        raw = float(self._server.getScore())
        completed = bool(self._server.getCompleted())
        if self.position < len(self.gold) and action.lower() == self.gold[self.position].lower():
            self.position += 1
        self.score = min(max(raw, 0.0), 1.0)
        self.success = completed and raw >= 1.0
        self.done = completed or raw < 0 or self._server.getNumMoves() >= self.step_limit
        self.last, self.room = observation, self._where(observation, self.room)
        return Feedback(observation, self.done, self.score, self.success)

    @staticmethod
    def _where(observation: str, room: str) -> str:
        match = ROOM_LINE.match(observation) or MOVED.match(observation)
        return match.group(1) if match else room

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()  # shuts the JVM down; the wrapper's __del__ repeats it harmlessly
            self._engine = None

    # ---- expert ------------------------------------------------------------------------------
    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        parts = []
        if after_mistake is not None:
            first = parse(after_mistake)[1] or after_mistake
            parts.append(f"'{after_mistake}' did not work: the game said \"{self.last}\" The "
                         f"{first} is not in reach from the {self.room}. Back to the plan.")
        if self.position == 0:
            parts.append(f"Plan to {self.goal}: {self._plan()}.")
        elif after_mistake is None:
            parts.append(self._gist(self.last))
        parts.append(self._why(self.position))
        return " ".join(parts), self._next() or "look around"

    def mistake(self, rng: random.Random) -> tuple[str, str]:
        seen = words(self._server.freeActionLook() + self._server.freeActionInventory()
                     + " ".join(self._server.getPossibleObjects()))
        # Only actions naming something out of sight: the parser rejects them and no time passes.
        hidden = [a for a in dict.fromkeys(self.gold[self.position + 1:])
                  if parse(a)[1] and a != self._next()
                  and any(o and not words(o) & seen for o in parse(a)[1:])]
        hidden += [f"go to {r}" for r in ROOMS if not words(r) & seen]
        action = rng.choice(hidden)
        verb, first, second = parse(action)
        thought = {"go to": f"The {first} is where I need to be; I'll go there directly.",
                   "open door to": f"I'll open the door to the {first} to go on.",
                   "focus on": f"The {first} is what the task asks about; I'll focus on it now.",
                   "pick up": f"I need the {first}; I'll pick it up now.",
                   "move": f"I'll put the {first} in the {second} now.",
                   "connect": f"I'll connect the {first} to the {second} now."}
        return thought.get(verb, f"I'll {action} now."), action

    # ---- expert thoughts ---------------------------------------------------------------------
    def _next(self) -> str:
        return self.gold[self.position] if self.position < len(self.gold) else ""

    def _key(self, i: int) -> tuple[str, str]:
        """The first gold action from ``i`` on that acts on an object, and the room it is in."""
        room = self.room
        for action in self.gold[i:]:
            verb, first, second = parse(action)
            if verb == "go to":
                room = first
            elif verb not in ("open door to", "look around", "wait", "wait1"):
                return (f"{verb} the {first}" + (f" to the {second}" if second else ""), room)
        return "", ""

    def _asks(self, i: int) -> str:
        """The task's words for the ``i``-th gold action, a focus: its own sentence if any."""
        sentences = re.findall(r"(?:^|\. +)(?:First, |Then, )?([Ff]ocus on the [^.]+)",
                               self.description)
        focuses = [j for j, a in enumerate(self.gold) if a.startswith("focus on ")]
        if len(sentences) == len(focuses) and "the thing" not in " ".join(sentences):
            return sentences[focuses.index(i)].lower()
        return self.goal

    def _why(self, i: int) -> str:
        if i >= len(self.gold):
            return "The plan is done; look around to check the result."
        verb, first, second = parse(self.gold[i])
        key, room = self._key(i)
        if verb in ("open door to", "go to"):
            goal = (f" on the way to the {room}" if room != first else f": there I will {key}"
                    ) if key else ""
            return (f"Open the door to the {first} so I can go through{goal}."
                    if verb == "open door to" else f"Go to the {first}{goal}.")
        if verb == "look around":
            return f"Look around the {self.room} to see what is here" + (
                f" before I {key}." if key else ".")
        if verb == "focus on":
            seen = "right here and is " if words(first) <= words(self.last) else ""
            return f"The {first} is {seen}what the task asks for ({self._asks(i)}), so I focus " \
                   "on it."
        if verb == "pick up":
            put = next((parse(a)[2] for a in self.gold[i + 1:] if a.startswith("move ")), "")
            return f"Pick up the {first}" + (f" to carry it to the {put}." if put else ".")
        if verb == "move":
            return f"Put the {first} in the {second}, as the task requires."
        if verb == "connect":
            wires = [a for a in self.gold if a.startswith("connect ")]
            return (f"Connect the {first} to the {second}: connection "
                    f"{wires.index(self.gold[i]) + 1} of {len(wires)} of the circuit.")
        if verb.startswith("wait"):
            return "Wait a moment so that the change takes effect."
        return f"Next step of the plan: {self.gold[i]}."

    def _plan(self) -> str:
        steps = [a for a in self.gold if parse(a)[0] not in ("open door to", "look around")]
        while steps and steps[-1].startswith("wait"):
            steps.pop()  # the gold path idles after the task is done
        wires = sum(a.startswith("connect ") for a in steps)
        steps = [a for a in steps if not a.startswith("connect ")] + (
            [f"connect the circuit ({wires} connections)"] if wires else [])
        steps = [a for j, a in enumerate(steps) if j == 0 or a != steps[j - 1]]
        return ", then ".join(steps) if steps else "look around"

    @staticmethod
    def _gist(observation: str) -> str:
        """What the last observation showed, in one short sentence."""
        first = observation.split("\n")[0].strip()
        if room := ROOM_LINE.match(first):
            items = re.sub(r"^.*?you see: ?", "", first).rstrip(". ")
            if len(items) > 150:
                items = items[:150].rsplit(", ", 1)[0].rstrip(". ") + " and more"
            return f"The {room.group(1)} contains {items}."
        if moved := MOVED.match(first):
            return f"I am in the {moved.group(1)} now."
        first = first if len(first) <= 120 else first[:117] + "..."
        return f"The game says: {first}" + ("" if first.endswith((".", "!", "?")) else ".")
