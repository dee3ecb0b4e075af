"""Expert trajectories and their steps.

A trajectory is a task followed by alternating observations (user turns) and agent turns
(assistant turns, "Thought: ...\\nAction: ..."). A *step* is one assistant turn, with everything
before it as its context. Selection marks steps; training supervises only the marked ones.

Function-calling trajectories: an assistant turn may hold text, tool calls (:class:`ToolCall`:
name, JSON arguments, id), or both; a tool's result is a ``tool`` message (context, never
supervised) tied to its call by ``tool_call_id``; the trajectory carries the JSON schemas of
its ``tools``. Templates render these structures themselves (``chat()``); where a template
cannot, :meth:`Trajectory.as_text` writes them into the text in one documented form::

    <thought or text of the turn>
    <tool_call>{"name": "get_order", "arguments": {"order_id": "A1"}}</tool_call>

with tool results as user turns ``<tool_response>...</tool_response>`` and the schemas in the
system prompt between ``<tools>`` and ``</tools>``, one per line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("user", "assistant", "tool")


@dataclass
class ToolCall:
    """One function call of an assistant turn.

    Attributes:
        name: The function's name.
        arguments: As the source gave them: a JSON object, or its JSON text (kept verbatim, so
            a file written back is the file read).
        id: The call's id (``tool_call_id`` of its result), when the source has one.
        extra: Fields of the source's call object no reader understands, written back.
    """

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a tool call needs a function name, got {self.name!r}")
        self.args  # arguments must be a JSON object (or its text)

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as a JSON object (what chat templates render)."""
        if isinstance(self.arguments, dict):
            return self.arguments
        if not self.arguments.strip():  # "" : a function without parameters
            return {}
        try:
            value = json.loads(self.arguments)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"arguments of the call to {self.name!r} are not JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"arguments of the call to {self.name!r} must be a JSON object, got "
                             f"{type(value).__name__}")
        return value

    def as_text(self) -> str:
        """The call in atlas's text form (``data.tools_as_text``)."""
        return "<tool_call>" + json.dumps({"name": self.name, "arguments": self.args},
                                          ensure_ascii=False) + "</tool_call>"


@dataclass
class Message:
    """One turn of a trajectory.

    Attributes:
        role: "user" (task or observation), "assistant" (the agent's step) or "tool" (a tool's
            result: context, like an observation).
        content: The text of the turn ("" for an assistant turn that only calls tools).
        selected: Assistant turns only: whether the step is supervised.
        criterion: Optional label of why the step was selected (e.g. "Plan Creation").
        reason: Optional one-line justification of the selection.
        tool_calls: Assistant turns only: the functions it calls.
        tool_call_id: Tool turns only: the id of the call this is the result of.
        name: Tool turns only: the function's name.
        extra: Fields of the source record no reader understands, written back as they were.
    """

    role: str
    content: str
    selected: bool | None = None
    criterion: str | None = None
    reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be a string, got {type(self.content).__name__}")
        if self.role == "assistant" and self.selected is None:
            self.selected = True  # unmarked expert data: every step is a training target
        if self.role != "assistant" and self.selected is not None:
            raise ValueError("only assistant turns can be selected")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant turns can call tools")
        if (self.tool_call_id is not None or self.name is not None) and self.role != "tool":
            raise ValueError("tool_call_id and name belong to tool turns")

    def as_text(self) -> str:
        """The turn's text with its tool calls written in (atlas's text form)."""
        if self.role == "tool":
            return f"<tool_response>{self.content}</tool_response>"
        return "\n".join([self.content] * bool(self.content) + [c.as_text() for c in self.tool_calls])


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
        tools: JSON schemas of the functions its steps may call (as the source gives them).
        extra: Fields of the source record no reader understands, written back as they were.
    """

    id: str
    env: str
    messages: list[Message]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.messages:
            raise ValueError("a trajectory needs at least one message")
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("a trajectory needs at least one assistant turn (step)")
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            calls.update(c.id for c in m.tool_calls if c.id is not None)
            if m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in calls:
                raise ValueError(f"message {i}: tool result for call id {m.tool_call_id!r}, "
                                 f"which no earlier assistant turn makes")

    @property
    def has_tool_calls(self) -> bool:
        """Whether the trajectory holds structure a plain chat cannot: calls, results, tools."""
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)

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
        """The steps whose ``selected`` flag is set: once a selection is applied, the chosen ones."""
        return [s.index for s in self.steps if s.selected]

    @property
    def candidate_steps(self) -> list[int]:
        """The steps a selector may choose: before a selection is applied, the same flags mark
        the steps the source file lets train (all of them, unless it says otherwise)."""
        return self.selected_steps

    def fingerprint(self) -> str:
        """A hash of the content a selection depends on: system prompt, turns, and which steps
        the source marks as candidates (not the id, the provenance or an earlier selection's
        criteria)."""
        payload: list[Any] = [self.system, [(m.role, m.content, m.selected) for m in self.messages]]
        if self.has_tool_calls:  # unchanged for plain trajectories: their caches stay valid
            payload.append([self.tools, [([(c.name, c.args) for c in m.tool_calls], m.tool_call_id,
                                          m.name) for m in self.messages]])
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def chat(self) -> list[dict[str, Any]]:
        """The conversation as chat-template messages (system prompt first when present), tool
        calls and results in the structure Hugging Face chat templates read (pass ``tools`` to
        the template beside them)."""
        chat: list[dict[str, Any]] = (
            [{"role": "system", "content": self.system}] if self.system is not None else [])
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.args},
                     **({"id": c.id} if c.id is not None else {})} for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            chat.append(d)
        return chat

    def as_text(self) -> "Trajectory":
        """The same trajectory with its tool calls, results and schemas written into plain
        text (the form in the module docstring), for templates that cannot render tools."""
        if not self.has_tool_calls:
            return self
        system = self.system
        if self.tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
            system = ((system + "\n\n") if system else "") + (
                "You can call these tools:\n<tools>\n" + listing + "\n</tools>\nCall one as "
                '<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>.')
        messages: list[Message] = []
        for i, m in enumerate(self.messages):
            text = m.as_text()
            if m.role == "tool" and i and self.messages[i - 1].role == "tool":  # results of one turn
                messages[-1] = dataclasses.replace(messages[-1],
                                                   content=messages[-1].content + "\n" + text)
                continue
            messages.append(dataclasses.replace(m, role="user" if m.role == "tool" else m.role,
                                                content=text, tool_calls=[], tool_call_id=None,
                                                name=None))
        out = copy.copy(self)  # not replace(): an episode's trajectory may have no step yet
        out.messages, out.system, out.tools, out.meta = messages, system, None, dict(self.meta)
        return out

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
                                        reason=reasons.get(k), tool_calls=list(m.tool_calls))
                k += 1
            else:
                m = dataclasses.replace(m)
            messages.append(m)
        return dataclasses.replace(self, messages=messages, meta=dict(self.meta))

