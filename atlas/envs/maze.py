"""Maze: walk a FrozenLake grid from the start to the goal without falling into a hole.

Choices (the rollout loop and the generator rely on them):
    * Maps come from gymnasium's ``generate_random_map(size, p, seed)`` (a path always exists),
      rotated by ``seed % 4`` quarter turns so the start and goal corners vary. Not slippery.
    * Holes end the episode as a failure (FrozenLake's rule), so avoiding them is part of the
      task; a move off the grid leaves the agent in place. Score 1.0 at the goal, else 0.0.
    * Actions ``move[north|south|east|west]``; also "north", "go north", "move east", "up",
      "left", "n". Anything else is answered with the valid actions. Every action, valid or
      not, counts toward ``max_turns``, where the episode ends as a failure.
    * Positions are (row, column), row 0 at the north edge, column 0 at the west edge.
    * Expert: BFS shortest path from the goal over safe cells.
"""

from __future__ import annotations

import random
import re
from collections import deque

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from atlas.envs.base import Environment, Feedback, Task, tool

MOVES = {"north": (-1, 0), "east": (0, 1), "south": (1, 0), "west": (0, -1)}
ALIASES = {"n": "north", "up": "north", "s": "south", "down": "south", "e": "east",
           "right": "east", "w": "west", "left": "west", **{d: d for d in MOVES}}
ACTION = re.compile(r"^\s*(?:(?:move|go|walk|step)\b\s*(?:to\s+)?)?[\[(:]?\s*([a-z]+)\s*[\])]?"
                    r"\s*\.?\s*$", re.IGNORECASE)
SYMBOLS = {"S": ".", "F": ".", ".": ".", "H": "H", "G": "G"}


def parse(action: str | None) -> str | None:
    """The compass direction named by ``action``, or None."""
    match = ACTION.match(action or "")
    return ALIASES.get(match.group(1).lower()) if match else None


def find(board: list[str], letter: str) -> tuple[int, int]:
    return next((r, c) for r, row in enumerate(board) for c, x in enumerate(row) if x == letter)


def shortest_distances(board: list[str]) -> dict[tuple[int, int], int]:
    """Moves from every cell that can reach the goal without crossing a hole (BFS from the goal)."""
    goal = find(board, "G")
    dist, queue = {goal: 0}, deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nxt = (r + dr, c + dc)
            if (0 <= nxt[0] < len(board) and 0 <= nxt[1] < len(board)
                    and board[nxt[0]][nxt[1]] != "H" and nxt not in dist):
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


class MazeEnv(Environment):
    """FrozenLake as a text maze with a BFS expert (see the module docstring for the rules)."""

    instruction = (
        "You walk on a frozen lake laid out as a grid, from your start to the goal G. Positions "
        "are (row, column): row 0 is the north edge, column 0 the west edge. Act with "
        "move[north], move[south], move[east] or move[west]. Stepping into a hole (H) ends the "
        "episode as a failure; walking into the edge leaves you where you are.")

    tools_instruction = (
        "You walk on a frozen lake laid out as a grid, from your start to the goal G. Positions "
        "are (row, column): row 0 is the north edge, column 0 the west edge. Move one cell per "
        "turn with the move tool. Stepping into a hole (H) ends the episode as a failure; "
        "walking into the edge leaves you where you are.")
    tools = [tool("move", "Move one cell.", {"direction": {
        "type": "string", "enum": ["north", "south", "east", "west"]}})]

    @classmethod
    def action_to_call(cls, action: str) -> tuple[str, dict] | None:
        direction = parse(action)
        return None if direction is None else ("move", {"direction": direction})

    @classmethod
    def call_to_action(cls, name: str, args: dict) -> str | None:
        direction = args.get("direction")
        return f"move[{direction}]" if name == "move" and isinstance(direction, str) else None

    def __init__(self, name: str = "maze", tasks: list[str] = ("maze-4x4",), max_turns: int = 40,
                 p: float = 0.8, show_map: bool = True):
        super().__init__(name, list(tasks), max_turns)
        self.p, self.show_map = p, show_map
        self.board: list[str] = []
        self.pos = self.prev = (0, 0)
        self.turns, self.done, self.success = 0, True, False

    # ---- episode -----------------------------------------------------------------------------
    @classmethod
    def canonical_action(cls, action: str | None) -> str | None:
        return parse(action)  # "move[north]", "go north", "up" and "n" are one move

    def reset(self, task: Task) -> str:
        size = re.fullmatch(r"maze-(\d+)x(\d+)", task.name)
        if not size or size.group(1) != size.group(2):
            raise ValueError(f"{task.id}: task name must look like 'maze-6x6'")
        rows = generate_random_map(int(size.group(1)), self.p, task.seed)
        grid = np.rot90(np.array([list(r) for r in rows]), task.seed % 4)
        return self.load(["".join(r) for r in grid])

    def load(self, board: list[str]) -> str:
        """Start an episode on ``board``: rows of FrozenLake letters S, F (or .), H, G."""
        self.board = board
        self.pos = self.prev = find(board, "S")
        self.goal = find(board, "G")
        self.dist = shortest_distances(board)
        self.turns, self.done, self.success = 0, False, False
        return f"Goal: reach the goal without falling into a hole.\n{self.view()}"


    def _cell(self, pos: tuple[int, int]) -> str:
        """'edge', 'hole', 'goal' or 'free' for the cell at ``pos``."""
        r, c = pos
        if not (0 <= r < len(self.board) and 0 <= c < len(self.board)):
            return "edge"
        return {"H": "hole", "G": "goal"}.get(self.board[r][c], "free")

    def _next(self, direction: str) -> tuple[int, int]:
        dr, dc = MOVES[direction]
        return self.pos[0] + dr, self.pos[1] + dc

    def view(self) -> str:
        """Position, goal, the four neighbours and, with ``show_map``, the map."""
        around = ", ".join(f"{d}: {self._cell(self._next(d))}" for d in MOVES)
        text = f"You are at {self.pos}; the goal is at {self.goal}. Around you: {around}."
        if self.show_map:
            rows = ["".join("@" if (r, c) == self.pos else SYMBOLS[x] for c, x in enumerate(row))
                    for r, row in enumerate(self.board)]
            text += "\nMap (@ you, G goal, H hole, . ice):\n" + "\n".join(rows)
        return text

    def step(self, action: str) -> Feedback:
        if self.done:
            return self._feedback("The episode is over.")
        self.turns += 1
        self.prev = self.pos
        direction = parse(action)
        if direction is None:
            obs = (f"Invalid action {action!r}: use move[north], move[south], move[east] or "
                   f"move[west].\n{self.view()}")
        elif self._cell(self._next(direction)) == "edge":
            obs = f"You bump into the edge of the lake and stay put.\n{self.view()}"
        else:
            self.pos = self._next(direction)
            cell = self._cell(self.pos)
            if cell == "hole":
                self.done, obs = True, f"You fell into the hole at {self.pos}. Episode over."
            elif cell == "goal":
                self.done = self.success = True
                obs = f"You reached the goal at {self.pos}!"
            else:
                obs = f"You move {direction}.\n{self.view()}"
        if not self.done and self.turns >= self.max_turns:
            self.done, obs = True, obs + "\nTurn limit reached."
        return self._feedback(obs)

    def _feedback(self, obs: str) -> Feedback:
        return Feedback(obs, done=self.done, score=float(self.success), success=self.success)

    # ---- expert ------------------------------------------------------------------------------
    def shortest_path(self) -> list[str]:
        """The expert's route from here: at each cell, the first direction that gets closer."""
        path, pos = [], self.pos
        while self.dist.get(pos, 0) > 0:
            d = next(d for d, (dr, dc) in MOVES.items()
                     if self.dist.get((pos[0] + dr, pos[1] + dc), -1) == self.dist[pos] - 1)
            path.append(d)
            pos = (pos[0] + MOVES[d][0], pos[1] + MOVES[d][1])
        return path

    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        thought = self._recovery(after_mistake) + " " if after_mistake else ""
        if self.pos not in self.dist:  # only an agent's own walk gets here: holes cut it off
            back = next((d for d in MOVES if self._cell(self._next(d)) == "free"), "north")
            return (thought + f"From {self.pos} no safe path reaches the goal at {self.goal}: "
                    f"holes cut this area off. Move {back} and look again.", f"move[{back}]")
        path = self.shortest_path()
        thought += (f"I am at {self.pos}; the goal is at {self.goal}. Shortest path: "
                    f"{', '.join(path)} ({len(path)} move{'s' if len(path) != 1 else ''}).")
        holes = [f"the hole at {self._next(d)} to the {d}" for d in MOVES
                 if self._cell(self._next(d)) == "hole"]
        extra = len(path) - abs(self.goal[0] - self.pos[0]) - abs(self.goal[1] - self.pos[1])
        if extra:
            thought += (f" Holes block the direct route, so it takes {extra} extra "
                        f"move{'s' if extra > 1 else ''}.")
        if holes:
            thought += f" Avoiding {' and '.join(holes)}."
        return thought + f" Move {path[0]}.", f"move[{path[0]}]"

    def _recovery(self, action: str) -> str:
        direction = parse(action)
        if direction is None:
            return f"{action!r} is not a move: only north, south, east and west work."
        if self.pos == self.prev:
            return f"Moving {direction} hit the edge and wasted a turn."
        return (f"Moving {direction} was a detour off the shortest path: from {self.pos} the goal "
                f"is {self.dist.get(self.pos, '?')} moves away instead of "
                f"{self.dist.get(self.prev, 1) - 1}.")

    def mistake(self, rng: random.Random) -> tuple[str, str]:
        here = self.dist[self.pos]
        # Safe detours: free cells from which the goal is still reachable, but not closer.
        detours = [d for d in MOVES if self.dist.get(self._next(d), -1) >= here]
        if detours:
            d = rng.choice(detours)
            return f"The ice to the {d} is open; going {d} may lead around faster.", f"move[{d}]"
        edges = [d for d in MOVES if self._cell(self._next(d)) == "edge"]
        if edges:
            d = rng.choice(edges)
            return f"Try {d} to see what lies that way.", f"move[{d}]"
        # Boxed in by holes and shortest-path cells: a diagonal "shortcut", which is not a move.
        vertical = "north" if self.goal[0] < self.pos[0] else "south"
        horizontal = "west" if self.goal[1] < self.pos[1] else "east"
        return (f"The goal lies {vertical}{horizontal}; cut straight across.",
                f"move[{vertical}{horizontal}]")
