"""Expert trajectories and their steps.

A trajectory is a task followed by alternating observations (user turns) and agent turns
(assistant turns, "Thought: ...\\nAction: ..."). A *step* is one assistant turn, with everything
before it as its context. Selection marks steps; training supervises only the marked ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("user", "assistant")


@dataclass
class Message:
    """One turn of a trajectory.

    Attributes:
        role: "user" (task or observation) or "assistant" (the agent's step).
        content: The text of the turn.
        selected: Assistant turns only: whether the step is supervised.
        criterion: Optional label of why the step was selected (e.g. "Plan Creation").
        reason: Optional one-line justification of the selection.
    """

    role: str
    content: str
    selected: bool | None = None
    criterion: str | None = None
    reason: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be a string, got {type(self.content).__name__}")
        if self.role == "assistant" and self.selected is None:
            self.selected = True  # unmarked expert data: every step is a training target
        if self.role == "user" and self.selected is not None:
            raise ValueError("only assistant turns can be selected")


@dataclass(frozen=True)
class Step:
    """A view of one assistant turn: its index among the steps and in the message list."""

    index: int
    message_index: int
    message: Message

    @property
    def selected(self) -> bool:
        return bool(self.message.selected)


@dataclass
class Trajectory:
    """An expert trajectory.

    Attributes:
        id: Unique id within its dataset.
        env: Environment or task family the trajectory comes from ("hotpotqa", "babyai", ...).
        messages: User and assistant turns, task first.
        system: Optional system prompt.
        meta: Free-form provenance (source file, seed, split, ...), kept through round trips.
    """

    id: str
    env: str
    messages: list[Message]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.messages:
            raise ValueError("a trajectory needs at least one message")
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("a trajectory needs at least one assistant turn (step)")

    @property
    def steps(self) -> list[Step]:
        return [
            Step(index=k, message_index=i, message=m)
            for k, (i, m) in enumerate(
                (i, m) for i, m in enumerate(self.messages) if m.role == "assistant"
            )
        ]

    @property
    def num_steps(self) -> int:
        return sum(m.role == "assistant" for m in self.messages)

    @property
    def selected_steps(self) -> list[int]:
        return [s.index for s in self.steps if s.selected]

    def fingerprint(self) -> str:
        """A hash of the content a selection depends on: system prompt, turns, and which steps
        the source marks as candidates (not the id, the provenance or an earlier selection's
        criteria)."""
        payload = [self.system, [(m.role, m.content, m.selected) for m in self.messages]]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages (system prompt first when present)."""
        chat = [{"role": "system", "content": self.system}] if self.system is not None else []
        return chat + [{"role": m.role, "content": m.content} for m in self.messages]

    def with_selection(
        self,
        indices: Iterable[int],
        criteria: dict[int, str] | None = None,
        reasons: dict[int, str] | None = None,
    ) -> "Trajectory":
        """A copy whose selected steps are exactly ``indices`` (step indices, not message ones)."""
        chosen = set(indices)
        bad = [i for i in chosen if not 0 <= i < self.num_steps]
        if bad:
            raise ValueError(f"trajectory {self.id}: step indices {sorted(bad)} out of range "
                             f"0..{self.num_steps - 1}")
        criteria, reasons = criteria or {}, reasons or {}
        messages, k = [], 0
        for m in self.messages:
            if m.role == "assistant":
                m = dataclasses.replace(m, selected=k in chosen, criterion=criteria.get(k),
                                        reason=reasons.get(k))
                k += 1
            else:
                m = dataclasses.replace(m)
            messages.append(m)
        return dataclasses.replace(self, messages=messages, meta=dict(self.meta))

