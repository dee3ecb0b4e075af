"""TextWorld-Express (Jansen & Côté, 2022): fast text games (coin, twc, cookingworld, ...).

Choices (the rollout loop and the generator rely on them):
    * A task family is a game name; ``game_params`` gives each game's generation parameters
      (small worlds, so gold paths stay short).
    * Split: train tasks use the engine's "train" fold and its seeds (0-999), test tasks the
      "test" fold and its seeds (20000-20999); past 1000 the seeds repeat. No episode (first
      observation and gold path) of 300 seeds per fold and game appears in both folds.
    * Score: the engine's score clipped to [0, 1] (a lost game scores -1 there); success when
      the engine reports the task solved. The episode ends on success, on failure (a wrong
      item in the box, a command Simon did not give, ...) or after ``step_limit`` commands.
    * The engine only accepts the exact commands of its valid-action list; anything else is
      answered "Unknown action: I'm not sure what you mean." and changes nothing.
    * Expert: replays the engine's gold path from its position in it. The engine's gold agent
      is not seeded (coin and twc paths vary between resets of the same game), so ``reset``
      asks ``gold_tries`` times and keeps the shortest path: shorter, and nearly always the
      same path for a task. A mistake is a command outside the valid list (a gold action taken
      too early, a wall, examining what cannot be examined), so nothing changes and the gold
      path still holds.
"""

from __future__ import annotations

import random
import re
from collections import deque

from atlas.envs.base import Environment, Feedback, Task

EXIT = re.compile(r"[Tt]o the (North|South|East|West) you see (?:the )?([^.]+)\.")
ROOM = re.compile(r"^You are in the ([^.]+)\.")
MAP_GOAL = re.compile(r"located in the (.+?), and put it into the box found in the (.+?)\.")
UNITS = {"mg": (1e-3, "g"), "g": (1, "g"), "kg": (1e3, "g"), "ml": (1, "ml"),
         "l": (1e3, "ml"), "mm": (1, "mm"), "cm": (10, "mm"), "m": (1e3, "mm")}
OPS = {"add": lambda a, b: a + b, "subtract": lambda a, b: b - a,  # "subtract A from B"
       "multiply": lambda a, b: a * b, "divide": lambda a, b: a // b}
PLANS = {
    "coin": "search the rooms for the coin, opening doors and exploring exits, and take it "
            "as soon as it is in view",
    "twc": "pick up the misplaced items and put each where it usually belongs",
    "cookingworld": "read the cookbook, gather the ingredients it lists, prepare them as its "
                    "directions say, then prepare the meal and eat it",
    "sorting": "put the items in the box one by one, from the smallest quantity to the largest",
    "arithmetic": "read the math problem, solve it, and put the item whose quantity is the "
                  "answer in the box",
    "mapreader": "read the map, walk to the coin, take it, and bring it back to the box",
    "simonsays": "do exactly what Simon says, one command at a time",
    "peckingorder": "read the instructions book, do what it says, and read it again after "
                    "each step until the game is complete"}


def quantity(item: str) -> str:
    """'15kg of cedar' -> ' (15000 g)': the quantity on the smallest unit of its kind, or ''."""
    m = re.match(r"(\d+)([a-z]+) of ", item)
    factor, unit = UNITS.get(m.group(2), (1, "")) if m else (1, "")
    return f" ({int(m.group(1)) * factor:g} {unit})" if factor != 1 else ""


def route(atlas: str, start: str, goal: str) -> list[str]:
    """Shortest room sequence from ``start`` to ``goal`` on the map text ('A connects to B')."""
    graph: dict[str, set[str]] = {}
    for room, links in re.findall(r"The (.+?) connects to the (.+?)\.", atlas):
        for other in re.split(r", | and ", links):
            graph.setdefault(room, set()).add(other)
            graph.setdefault(other, set()).add(room)
    paths, queue = {start: [start]}, deque([start])
    while queue:
        for nxt in sorted(graph.get(room := queue.popleft(), ())):
            if nxt not in paths:
                paths[nxt] = paths[room] + [nxt]
                queue.append(nxt)
    return paths.get(goal, [])


class TextWorldExpressEnv(Environment):
    """TextWorld-Express games with a gold-path expert (see the module docstring)."""

    instruction = (
        "You play a text game. Complete the task given at the start. One command per turn, "
        "using the game's words exactly, e.g.: look around, move north, open door to east, "
        "take coin, put socks in chest of drawers, open fridge, read cookbook, slice carrot, "
        "cook carrot in stove, prepare meal, eat meal, inventory. A command the game does not "
        "know changes nothing.")

    def __init__(self, name: str = "twx", tasks: list[str] = ("coin",), max_turns: int = 30,
                 game_params: dict[str, str] | None = None, step_limit: int = 100,
                 gold_tries: int = 5):
        super().__init__(name, list(tasks), max_turns)
        from textworld_express import TextWorldExpressEnv as Engine

        self.game_params, self.gold_tries = dict(game_params or {}), max(1, gold_tries)
        self._engine = Engine(envStepLimit=step_limit)  # one JVM, reused by every reset
        self._seeds: dict[str, list[int]] = {}
        self.gold: list[str] = []
        self.valid: list[str] = []
        self.exits: dict[str, str] = {}
        self.visited: set[str] = set()
        self.game = self.goal = self.last = self.room = self.notes = ""
        self.position, self.done, self.score, self.success = 0, True, 0.0, False

    def seeds(self, split: str) -> list[int]:
        """The engine's seeds of the fold ``split`` (the same for every game)."""
        if not self._seeds:
            self._engine.load(self.task_names[0], self.game_params.get(self.task_names[0], ""))
            self._seeds = {"train": self._engine.getValidSeedsTrain(),
                           "test": self._engine.getValidSeedsTest()}
            assert not set(self._seeds["train"]) & set(self._seeds["test"]), "folds overlap"
        return self._seeds[split]

    def seed_for(self, name: str, split: str, index: int) -> int:
        pool = self.seeds(split)
        return pool[index % len(pool)]

    # ---- episode -----------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        if task.seed not in self.seeds(task.split):
            raise ValueError(f"{task.id}: seed {task.seed} is not in the {task.split} fold")
        golds = []
        for _ in range(self.gold_tries):  # the same game each time; only the gold path varies
            observation, info = self._engine.reset(
                seed=task.seed, gameFold=task.split, gameName=task.name,
                gameParams=self.game_params.get(task.name, ""), generateGoldPath=True)
            golds.append(list(self._engine.getGoldActionSequence()))
        self.gold = min(golds, key=lambda g: (len(g), g))
        self.game, self.goal, self.notes = task.name, info["taskDescription"].strip(), ""
        self.position, self.done, self.score, self.success = 0, False, 0.0, False
        self.room, self.exits, self.visited = "", {}, set()
        self._observe(observation, info)
        return f"Task: {self.goal}\n{self.last}"

    def step(self, action: str) -> Feedback:
        if self.done:
            return Feedback("The episode is over.", True, self.score, self.success)
        action = " ".join(str(action or "").split())  # the engine matches exact commands
        observation, _, done, info = self._engine.step(action)
        if self.position < len(self.gold) and action.lower() == self.gold[self.position].lower():
            self.position += 1
        self.score = min(max(float(info["score"]), 0.0), 1.0)
        self.success, self.done = bool(info["tasksuccess"]), bool(done)
        self._observe(observation, info)
        if action.startswith("read ") and action.lower() in {a.lower() for a in self.gold}:
            self.notes = self.last  # the recipe / problem / map / instructions, for later steps
        return Feedback(self.last, self.done, self.score, self.success)

    def _observe(self, observation: str, info: dict) -> None:
        self.last = re.sub(r"\n\s*\n+", "\n", observation.strip())
        self.valid = list(info["validActions"])
        if room := ROOM.match(self.last):
            self.room = room.group(1)
            self.visited.add(self.room)
            self.exits = {d.lower(): w for d, w in EXIT.findall(self.last)}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()  # shuts the JVM down; the wrapper's __del__ repeats it harmlessly
            self._engine = None

    # ---- expert ------------------------------------------------------------------------------
    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        action = self.gold[self.position] if self.position < len(self.gold) else "look around"
        parts = []
        if after_mistake is not None:
            parts.append(f"'{after_mistake}' did not work: the game said \"{self.last}\" "
                         f"{self._why_not(after_mistake)} Back to the plan.")
        if self.position == 0:
            parts.append(f"Plan: {PLANS.get(self.game, 'follow the task')}.{self._plan()}")
        if after_mistake is None:
            parts.append(self._gist())
        parts.append(self._why(action))
        return " ".join(p for p in parts if p), action

    def mistake(self, rng: random.Random) -> tuple[str, str]:
        valid = {a.lower() for a in self.valid}
        nxt = self.gold[self.position] if self.position < len(self.gold) else ""
        objects = sorted({a.split(" ", 1)[1] for a in self.gold
                          if a.startswith(("take ", "read "))})
        # Only commands outside the valid list: the engine rejects them and nothing changes.
        options = [a for a in dict.fromkeys(self.gold[self.position + 1:]) if a != nxt]
        options += [f"move {d}" for d in ("north", "south", "east", "west")]
        options += [f"examine {o}" for o in objects] + ["look around"]
        action = rng.choice([a for a in options if a.lower() not in valid])
        verb, _, rest = action.partition(" ")
        thought = {"take": f"The {rest} should be within reach; I'll take it now.",
                   "move": f"I'll try going {rest} to explore.",
                   "examine": f"Let me examine the {rest} first.",
                   "look": "Let me look around first to see what is here."}
        return thought.get(verb, f"I'll {action} now."), action

    # ---- expert thoughts ---------------------------------------------------------------------
    def _plan(self) -> str:
        if self.game == "twc":
            return " Items and their places: " + "; ".join(
                a[4:].replace(" in ", " -> ", 1) for a in self.gold if a.startswith("put ")) + "."
        if self.game == "sorting":
            return " Order: " + " < ".join(
                f"{a[5:]}{quantity(a[5:])}" for a in self.gold if a.startswith("take ")) + "."
        if m := MAP_GOAL.search(self.goal):
            return f" The coin is in the {m.group(1)}, the box in the {m.group(2)}."
        return ""

    def _answer(self) -> int | None:
        m = re.search(r"problem: (\w+) (\d+) \w+ (\d+)", self.notes)
        if not m or m.group(1) not in OPS:
            return None
        return OPS[m.group(1)](int(m.group(2)), int(m.group(3)))

    def _route(self) -> list[str]:
        m = MAP_GOAL.search(self.goal)
        if not m or "connects to" not in self.notes:
            return []
        holding = "take coin" in self.gold[:self.position]
        return route(self.notes, self.room, m.group(2) if holding else m.group(1))

    def _gist(self) -> str:
        """What the last observation showed, in one short sentence."""
        text = self.last
        if ROOM.match(text):
            exits = "; ".join(f"{d}: {w}" for d, w in self.exits.items())
            coin = (" The coin is here." if " a coin" in text else " No coin in sight.") \
                if self.game in ("coin", "mapreader") else ""
            return f"I am in the {self.room}{f' (exits {exits})' if exits else ''}.{coin}"
        if text.startswith("Simon says"):
            return text
        if "math problem:" in text and (answer := self._answer()) is not None:
            problem = re.search(r"problem: (.+?) \.", text).group(1)
            return f"The problem is '{problem}': the answer is {answer}."
        if text.startswith("Gather all following ingredients"):
            need, how = ([x.strip() for x in p.strip().split("\n")]
                         for p in re.split(r"Ingredients:|Directions:", text)[1:3])
            return f"The recipe needs {', '.join(need)}; directions: {', '.join(how)}."
        if text.startswith("The map reads") and (path := self._route()):
            return f"From the map, the way to the coin is {' -> '.join(path)}."
        first = " ".join(text.split())
        return first if len(first) <= 160 else first[:157] + "..."

    def _why(self, action: str) -> str:
        verb, _, rest = action.partition(" ")
        if action == "look around":
            return "Look around to see what is here."
        if self.game == "simonsays":
            return f"Simon said it, so I {action}."
        if verb == "move":
            to = self.exits.get(rest, "")
            path = self._route()
            reason = (f", next on the route {' -> '.join(path)}" if len(path) > 1 else
                      "" if self.game != "coin" else " to search it for the coin"
                      if to not in self.visited else " to get to rooms I have not searched")
            return f"Move {rest}{' to the ' + to if to and 'door' not in to else ''}{reason}."
        if verb == "open" and rest.startswith("door to "):
            return f"Open the door to the {rest[8:]} so I can go that way."
        if verb in ("open", "close"):
            return (f"Open the {rest} to see what is inside." if verb == "open"
                    else f"Close the {rest} again; I have what I need from it.")
        if verb == "read":
            return f"Read the {rest} to learn what to do."
        if verb == "take":
            return self._why_take(rest)
        if verb == "put":
            item, _, place = rest.partition(" in ")
            reason = {"twc": f"the {place} is where the {item} belongs",
                      "sorting": f"the {item} is the smallest quantity left",
                      "arithmetic": "its quantity is the answer to the problem",
                      "mapreader": "the task is to put the coin in the box"}.get(self.game, "")
            return f"Put the {item} in the {place}" + (f": {reason}." if reason else ".")
        if action == "eat meal":
            return "The meal is ready; eating it completes the task."
        if action == "task":
            return "Check the task description again."
        item, cut = rest.split(" in ")[0], verb in ("chop", "slice", "dice")
        directions = [x.strip() for x in self.notes.partition("Directions:")[2].split("\n")]
        step = next((line for line in directions if line == action or
                     line and item in line and line.startswith(verb) == cut), "")
        return f"The recipe says '{step}', so I {action}." if step else f"Next: {action}."

    def _why_take(self, item: str) -> str:
        if self.game in ("coin", "mapreader") and item == "coin":
            return ("Take the coin to bring it to the box." if self.game == "mapreader"
                    else "Taking the coin finishes the task.")
        if self.game == "sorting":
            return f"The {item}{quantity(item)} has the smallest quantity left."
        if self.game == "arithmetic" and (answer := self._answer()) is not None:
            return f"The answer is {answer}, so the {item} is the item to put in the box."
        if self.game == "peckingorder":
            return f"The instructions book says to take the {item}."
        if self.game == "twc":
            place = next((a.split(" in ", 1)[1] for a in self.gold
                          if a.startswith(f"put {item} in ")), "its place")
            return f"The {item} is out of place; it belongs in the {place}."
        if item in ("cookbook", "math problem", "map", "instructions book"):
            return f"Take the {item} so I can read it."
        if item == "knife":
            cut = re.search(r"^\s*((?:chop|slice|dice) .+)$", self.notes, re.MULTILINE)
            return (f"Take the knife: the recipe says '{cut.group(1)}'." if cut
                    else "Take the knife in case an ingredient has to be cut.")
        if item in self.notes:
            return f"The {item} is an ingredient in the recipe."
        return f"Take the {item}; I will need it."

    def _why_not(self, action: str) -> str:
        verb, _, rest = action.partition(" ")
        return {"move": f"There is no exit to the {rest} here.",
                "take": f"There is no {rest} here to take.",
                "put": f"I cannot do that yet: I do not hold the {rest.split(' in ')[0]}.",
                }.get(verb, "That command is not available here.")
