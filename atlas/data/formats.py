"""Readers and writers of trajectory files.

Formats (``format=`` in configs and functions):

- ``atlas``: the project's own JSONL, one trajectory per line::

      {"id": ..., "env": ..., "system": null, "meta": {...},
       "messages": [{"role": "user", "content": ...},
                    {"role": "assistant", "content": ..., "selected": true,
                     "criterion": "Plan Creation", "reason": ...}]}

- ``agentgym``: AgentGym / AgentInstruct (AgentTraj) records, a JSON array or JSONL:
  ``{"item_id"|"id", "conversations": [{"from": "human"|"gpt", "value", "loss"}]}``.
  ``loss`` on a gpt turn is the step's ``selected`` flag (null reads as true).
- ``openai``: OpenAI chat fine-tuning JSONL, ``{"messages": [{"role", "content", "weight"}]}``;
  ``weight`` (0/1) on an assistant turn is its ``selected`` flag (absent reads as 1).
- ``sharegpt``: ``{"id"?, "system"?, "conversations": [{"from", "value"}]}``. It has no way to
  record a selection: every step reads as selected, and writing a partial selection warns.

A record without an id (``openai`` always, ``sharegpt`` often) gets ``t-<hash of its text>``, so
its id, and the validation split chosen by hashing ids, do not move when the file is renamed or
re-exported. Every reader names the file, the line (or record) and the field of malformed input;
every writer writes atomically, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from atlas.data.trajectory import Message, Trajectory
from atlas.utils import ConfigError, UserError, atomic_write, resolve_path

log = logging.getLogger(__name__)

FORMATS = ("atlas", "agentgym", "openai", "sharegpt")


class DataFormatError(UserError, ValueError):
    """Malformed trajectory input, located by file, line (or record) and field."""

    def __init__(self, path: str | Path, where: str | None, field: str | None, message: str):
        self.path, self.where, self.field = str(path), where, field
        loc = f"{path}" + (f":{where}" if where else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{loc}: {message}")


class _FieldError(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def _req(record: dict, key: str, types: type | tuple, field: str | None = None) -> Any:
    field = field or key
    if key not in record:
        raise _FieldError(field, "missing")
    value = record[key]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _FieldError(field, f"expected {names}, got {type(value).__name__}")
    return value


def _opt(record: dict, key: str, types: type | tuple, default: Any = None, field: str | None = None):
    if record.get(key) is None:
        return default
    return _req(record, key, types, field)


def _objects(record: dict, key: str):
    """Yield (index, field name, object) for a list-of-objects field."""
    for i, item in enumerate(_req(record, key, list)):
        field = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _FieldError(field, "expected an object")
        yield i, field, item


def _conversations(record: dict, roles: dict[str, str], with_loss: bool,
                   system: str | None = None) -> tuple[str | None, list[Message]]:
    """The system prompt and messages of a ``conversations: [{"from", "value"}]`` record."""
    messages = []
    for i, f, turn in _objects(record, "conversations"):
        who = _req(turn, "from", str, f + ".from")
        value = _req(turn, "value", str, f + ".value")
        loss = _opt(turn, "loss", bool, field=f + ".loss") if with_loss else None
        if who == "system" and i == 0 and system is None:
            system = value
            continue
        if who not in roles:
            raise _FieldError(f + ".from", f"expected one of {sorted(roles)}, got {who!r}")
        messages.append(_message(roles[who], value, True if loss is None else loss, f))
    return system, messages


def _message(role: str, content: str, selected: bool | None, field: str, **extra) -> Message:
    try:
        return Message(role=role, content=content,
                       selected=selected if role == "assistant" else None, **extra)
    except ValueError as e:
        raise _FieldError(field, str(e)) from None


def _trajectory(**kwargs) -> Trajectory:
    try:
        t = Trajectory(**kwargs)
    except ValueError as e:
        raise _FieldError(None, str(e)) from None
    for step in t.steps:  # caught here, with the file and line, not mid-run in the masks
        if not step.message.content.strip():
            raise _FieldError(None, f"step {step.index} (message {step.message_index}) is an "
                                    f"empty assistant turn: it has no tokens to supervise")
    return t


def _content_id(ctx: dict, system: str | None, messages: list[Message]) -> str:
    """The id of a record that gives none: a hash of its text (system prompt and turns, not
    which steps are selected), so renaming or re-exporting a file, or selecting other steps,
    keeps it, and the validation split (a hash of the ids) stays put. Identical records in
    one file get ``-2``, ``-3``... in file order."""
    payload = json.dumps([system, [(m.role, m.content) for m in messages]], ensure_ascii=False)
    tid = "t-" + hashlib.sha256(payload.encode()).hexdigest()[:12]
    n = ctx["content_ids"][tid] = ctx["content_ids"].get(tid, 0) + 1
    return tid if n == 1 else f"{tid}-{n}"


# --------------------------------------------------------------------------------------- atlas


def _from_atlas(rec: dict, ctx: dict) -> Trajectory:
    messages = []
    for _, f, m in _objects(rec, "messages"):
        messages.append(_message(
            _req(m, "role", str, f + ".role"), _req(m, "content", str, f + ".content"),
            _opt(m, "selected", bool, field=f + ".selected"), f + ".role",
            criterion=_opt(m, "criterion", str, field=f + ".criterion"),
            reason=_opt(m, "reason", str, field=f + ".reason")))
    return _trajectory(id=str(_req(rec, "id", (str, int))), env=_req(rec, "env", str),
                       messages=messages, system=_opt(rec, "system", str),
                       meta=_opt(rec, "meta", dict, {}))


def _to_atlas(t: Trajectory) -> dict:
    messages = []
    for m in t.messages:
        d = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            d["selected"] = bool(m.selected)
            if m.criterion is not None:
                d["criterion"] = m.criterion
            if m.reason is not None:
                d["reason"] = m.reason
        messages.append(d)
    return {"id": t.id, "env": t.env, "system": t.system, "messages": messages, "meta": t.meta}


# ------------------------------------------------------------------------------------ agentgym

_GYM_ROLES = {"human": "user", "gpt": "assistant"}


def _from_agentgym(rec: dict, ctx: dict) -> Trajectory:
    id_key = "item_id" if "item_id" in rec else "id"
    tid = str(_req(rec, id_key, (str, int)))
    system, messages = _conversations(rec, _GYM_ROLES, with_loss=True)
    env = ctx["env"] or (tid.rsplit("_", 1)[0] if "_" in tid else ctx["stem"])
    return _trajectory(id=tid, env=env, messages=messages, system=system,
                       meta={"id_key": id_key} if id_key != "id" else {})


def _to_agentgym(t: Trajectory) -> dict:
    conv = [{"from": "system", "loss": None, "value": t.system}] if t.system is not None else []
    for m in t.messages:
        conv.append({"from": "gpt" if m.role == "assistant" else "human",
                     "loss": bool(m.selected) if m.role == "assistant" else None,
                     "value": m.content})
    return {"conversations": conv, t.meta.get("id_key", "id"): t.id}


# -------------------------------------------------------------------------------------- openai


def _from_openai(rec: dict, ctx: dict) -> Trajectory:
    system, messages = None, []
    for i, f, m in _objects(rec, "messages"):
        role = _req(m, "role", str, f + ".role")
        content = _req(m, "content", str, f + ".content")
        weight = _opt(m, "weight", int, field=f + ".weight")
        if weight not in (None, 0, 1) or isinstance(weight, bool):
            raise _FieldError(f + ".weight", f"expected 0 or 1, got {weight!r}")
        if role == "system" and i == 0:
            system = content
            continue
        messages.append(_message(role, content, None if weight is None else bool(weight), f + ".role"))
    return _trajectory(id=_content_id(ctx, system, messages), env=ctx["env"] or ctx["stem"],
                       messages=messages, system=system)


def _to_openai(t: Trajectory) -> dict:
    msgs = [{"role": "system", "content": t.system}] if t.system is not None else []
    for m in t.messages:
        d = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            d["weight"] = int(bool(m.selected))
        msgs.append(d)
    return {"messages": msgs}


# ------------------------------------------------------------------------------------ sharegpt

_SHAREGPT_ROLES = {"human": "user", "user": "user", "observation": "user",
                   "gpt": "assistant", "assistant": "assistant"}


def _from_sharegpt(rec: dict, ctx: dict) -> Trajectory:
    system, messages = _conversations(rec, _SHAREGPT_ROLES, with_loss=False,
                                      system=_opt(rec, "system", str))
    tid = _opt(rec, "id", (str, int))
    return _trajectory(id=str(tid) if tid is not None else _content_id(ctx, system, messages),
                       env=ctx["env"] or ctx["stem"], messages=messages, system=system)


def _to_sharegpt(t: Trajectory) -> dict:
    conv = [{"from": "gpt" if m.role == "assistant" else "human", "value": m.content}
            for m in t.messages]
    rec: dict[str, Any] = {"id": t.id, "conversations": conv}
    if t.system is not None:
        rec["system"] = t.system
    return rec


_READERS: dict[str, Callable[[dict, dict], Trajectory]] = {
    "atlas": _from_atlas, "agentgym": _from_agentgym, "openai": _from_openai,
    "sharegpt": _from_sharegpt}
_WRITERS: dict[str, Callable[[Trajectory], dict]] = {
    "atlas": _to_atlas, "agentgym": _to_agentgym, "openai": _to_openai, "sharegpt": _to_sharegpt}


def detect_format(record: dict) -> str:
    """Guess the format of one record (``auto``)."""
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        gym = "item_id" in record or any(isinstance(t, dict) and "loss" in t for t in turns)
        return "agentgym" if gym else "sharegpt"
    if "messages" in record:
        return "atlas" if "env" in record and "id" in record else "openai"
    raise _FieldError(None, "cannot tell the format: no 'messages' or 'conversations' field "
                            "(pass format=atlas|agentgym|openai|sharegpt)")


def _records(path: Path) -> Iterable[tuple[str, int, Any]]:
    """Yield (location, index, record) from a JSONL file or a JSON array file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, None, None, "no such file") from None
    except IsADirectoryError:
        raise DataFormatError(path, None, None, "is a directory, not a trajectory file") from None
    except OSError as e:
        raise DataFormatError(path, None, None, f"cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"byte {e.start}", None, "not UTF-8 text (a binary file?); "
                              "expected JSONL or a JSON array of trajectories") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, str(e.lineno), None, f"invalid JSON: {e.msg}") from None
        for i, rec in enumerate(data):
            yield f"record {i}", i, rec
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, str(lineno), None,
                                  f"invalid JSON at column {e.colno}: {e.msg}") from None
        yield str(lineno), index, rec
        index += 1


def read_trajectories(path: str | Path, format: str = "auto", env: str | None = None) -> list[Trajectory]:
    """Read every trajectory of a file.

    Args:
        path: A file path, or ``pkg://atlas/...`` for data shipped inside the package.
        format: One of ``FORMATS`` or ``auto`` (decided per record).
        env: Environment name to give trajectories whose format does not record one.

    Raises:
        DataFormatError: naming the file, line (or record) and field of the first bad input.
    """
    path = resolve_path(path)
    if format != "auto" and format not in _READERS:
        raise ConfigError(f"data.format: unknown trajectory format {format!r}; expected auto or "
                          f"one of {', '.join(FORMATS)}")
    out, seen, content_ids = [], {}, {}
    for where, index, rec in _records(path):
        try:
            if not isinstance(rec, dict):
                raise _FieldError(None, f"expected a JSON object, got {type(rec).__name__}")
            fmt = detect_format(rec) if format == "auto" else format
            t = _READERS[fmt](rec, {"stem": path.stem, "index": index, "env": env,
                                    "content_ids": content_ids})
        except _FieldError as e:
            raise DataFormatError(path, where, e.field, str(e)) from None
        except ValueError as e:  # a Message / Trajectory invariant (no steps, a bad role...)
            raise DataFormatError(path, where, None, str(e)) from None
        if t.id in seen:
            raise DataFormatError(path, where, "id", f"duplicate trajectory id {t.id!r} "
                                                     f"(first at {seen[t.id]})")
        seen[t.id] = where
        t.meta.setdefault("source", f"{path.name}:{where}")
        out.append(t)
    if not out:
        raise DataFormatError(path, None, None, "no trajectories in file")
    return out


def trajectory_to_record(trajectory: Trajectory, format: str = "atlas") -> dict:
    """One trajectory as the JSON record of ``format``."""
    if format not in _WRITERS:
        raise ValueError(f"unknown trajectory format {format!r}; expected one of {FORMATS}")
    return _WRITERS[format](trajectory)


def write_trajectories(path: str | Path, trajectories: Iterable[Trajectory], format: str = "atlas") -> Path:
    """Write trajectories atomically; returns the path written."""
    if format not in _WRITERS:
        raise ValueError(f"unknown trajectory format {format!r}; expected one of {FORMATS}")
    trajectories = list(trajectories)
    if format == "sharegpt":
        partial = sum(t.num_steps != len(t.selected_steps) for t in trajectories)
        if partial:
            log.warning("sharegpt cannot record step selection: %d trajectories with unselected "
                        "steps are written as fully supervised (use agentgym or openai)", partial)
    lines = [json.dumps(trajectory_to_record(t, format), ensure_ascii=False) for t in trajectories]
    return atomic_write(path, "".join(line + "\n" for line in lines))
