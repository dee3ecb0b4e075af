"""Readers and writers of trajectory files.

Formats (``format=`` in configs and functions):

- ``atlas``: the project's own JSONL, one trajectory per line::

      {"id": ..., "env": ..., "system": null, "meta": {...}, "tools": [...],
       "messages": [{"role": "user", "content": ...},
                    {"role": "assistant", "content": ..., "selected": true,
                     "criterion": "Plan Creation", "reason": ...,
                     "tool_calls": [{"name", "arguments", "id"}]},
                    {"role": "tool", "content": ..., "tool_call_id": ..., "name": ...}]}

- ``agentgym``: AgentGym / AgentInstruct (AgentTraj) records, a JSON array or JSONL:
  ``{"item_id"|"id", "conversations": [{"from": "human"|"gpt", "value", "loss"}]}``.
  ``loss`` on a gpt turn is the step's ``selected`` flag (null reads as true).
- ``openai``: OpenAI chat fine-tuning JSONL, ``{"messages": [{"role", "content", "weight",
  "tool_calls", "tool_call_id"}], "tools"}``; ``weight`` (0/1) on an assistant turn is its
  ``selected`` flag (absent reads as 1); ``content`` is null on a turn that only calls tools.
- ``sharegpt``: ``{"id"?, "system"?, "tools"?, "conversations": [{"from", "value"}]}``, with
  LLaMA-Factory's ``function_call`` turns (the JSON text of ``{"name", "arguments"}`` or of a
  list of them) and ``observation`` turns (a call's result). It has no way to record a
  selection: every step reads as selected, and writing a partial selection warns.
- ``anthropic``: Anthropic Messages, ``{"system"?, "tools"?, "messages": [{"role", "content":
  str | [{"type": "text"|"tool_use"|"tool_result", ...}]}]}``; no selection field.
- ``adp`` (read only): the Agent Data Protocol's standardized trajectories (see ``_from_adp``).

Fields a reader does not use are kept (``extra``) and written back by the same format's writer;
the reader warns once per file with their counts.

A record without an id (``openai`` always, ``sharegpt`` often) gets ``t-<hash of its text>``, so
its id, and the validation split chosen by hashing ids, do not move when the file is renamed or
re-exported. Every reader names the file, the line (or record) and the field of malformed input;
every writer writes atomically, so a crash never leaves a half-written file.

Size: one reader and one writer per format (atlas, AgentGym, OpenAI, ShareGPT, Anthropic, ADP)
stay in one module because they share the record checks and the file:line:field errors; a
format is a pair of functions, not a module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from atlas.data.trajectory import Message, ToolCall, Trajectory
from atlas.utils import ConfigError, UserError, atomic_write, resolve_path

log = logging.getLogger(__name__)

FORMATS = ("atlas", "agentgym", "openai", "sharegpt", "anthropic", "adp")
WRITABLE = ("atlas", "agentgym", "openai", "sharegpt", "anthropic")


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


def _objects(record: dict, key: str, prefix: str = ""):
    """Yield (index, field name, object) for a list-of-objects field (``prefix``: where
    ``record`` itself is, for field names)."""
    prefix = prefix + "." if prefix else ""
    for i, item in enumerate(_req(record, key, list, prefix + key)):
        field = f"{prefix}{key}[{i}]"
        if not isinstance(item, dict):
            raise _FieldError(field, "expected an object")
        yield i, field, item


def _conversations(record: dict, roles: dict[str, str], with_loss: bool, ctx: dict,
                   system: str | None = None) -> tuple[str | None, list[Message]]:
    """The system prompt and messages of a ``conversations: [{"from", "value"}]`` record.
    A ``function_call`` turn (where ``roles`` has one) is a step that calls tools, and an
    ``observation`` right after calls is their result."""
    messages: list[Message] = []
    known = {"from", "value", "loss"} if with_loss else {"from", "value"}
    for i, f, turn in _objects(record, "conversations"):
        who = _req(turn, "from", str, f + ".from")
        value = _req(turn, "value", str, f + ".value")
        loss = _opt(turn, "loss", bool, field=f + ".loss") if with_loss else None
        if who == "system" and i == 0 and system is None:
            system = value
            continue
        if who not in roles:
            raise _FieldError(f + ".from", f"expected one of {sorted(roles)}, got {who!r}")
        extra = _unknown(turn, known, ctx, "conversations[]")
        selected = True if loss is None else loss
        if roles[who] == "function_call":
            messages.append(_message("assistant", "", selected, f, extra=extra,
                                     tool_calls=_sharegpt_calls(value, f + ".value")))
        elif who == "observation" and messages and (messages[-1].tool_calls
                                                    or messages[-1].role == "tool"):
            messages.append(_message("tool", value, None, f, extra=extra))
        else:
            messages.append(_message(roles[who], value, selected, f, extra=extra))
    return system, messages


def _sharegpt_calls(value: str, field: str) -> list[ToolCall]:
    """LLaMA-Factory's ``function_call`` value: the JSON text of ``{"name", "arguments"}``, or
    of a list of them (parallel calls)."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise _FieldError(field, f"a function_call must be the JSON text of "
                                 f'{{"name", "arguments"}}: {e.msg}') from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for k, c in enumerate(calls):
        g = f"{field}[{k}]" if len(calls) > 1 else field
        if not isinstance(c, dict):
            raise _FieldError(g, f'expected {{"name", "arguments"}}, got {type(c).__name__}')
        out.append(_call(_req(c, "name", str, g + ".name"), c.get("arguments"), c.get("id"), g))
    if not out:
        raise _FieldError(field, "a function_call with no call")
    return out


def _message(role: str, content: str, selected: bool | None, field: str, **extra) -> Message:
    try:
        return Message(role=role, content=content,
                       selected=selected if role == "assistant" else None, **extra)
    except ValueError as e:
        raise _FieldError(field, str(e)) from None


def _call(name: Any, arguments: Any, id: Any, field: str, extra: dict | None = None) -> ToolCall:
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, (dict, str)):
        raise _FieldError(field + ".arguments", f"expected a JSON object or its text, got "
                                                f"{type(arguments).__name__}")
    if id is not None and not isinstance(id, str):
        raise _FieldError(field + ".id", f"expected str, got {type(id).__name__}")
    try:
        return ToolCall(name=name, arguments=arguments, id=id, extra=extra or {})
    except ValueError as e:
        raise _FieldError(field, str(e)) from None


def _unknown(obj: dict, known: set[str], ctx: dict, field: str) -> dict:
    """The fields of ``obj`` a reader does not understand: kept (written back by the same
    format's writer) and counted, so the reader can say what it carried without using."""
    extra = {k: v for k, v in obj.items() if k not in known}
    for k in extra:
        ctx["unknown"][f"{field}.{k}"] = ctx["unknown"].get(f"{field}.{k}", 0) + 1
    return extra


def _with(d: dict, extra: dict, t: Trajectory, fmt: str) -> dict:
    """``d`` plus the fields of its source object no reader understood: only when writing the
    format they were read from (another format's field could mean something else there, e.g. a
    ShareGPT turn's ``weight`` in an OpenAI file), and never over a field the writer sets."""
    if t.meta.get("fields_from") != fmt:
        return d
    return {**d, **{k: v for k, v in extra.items() if k not in d}}


def _has_extra(t: Trajectory) -> bool:
    return bool(t.extra) or any(m.extra or any(c.extra for c in m.tool_calls) for m in t.messages)


def _trajectory(**kwargs) -> Trajectory:
    try:
        t = Trajectory(**kwargs)
    except ValueError as e:
        raise _FieldError(None, str(e)) from None
    for step in t.steps:  # caught here, with the file and line, not mid-run in the masks
        if not step.message.content.strip() and not step.message.tool_calls:
            raise _FieldError(None, f"step {step.index} (message {step.message_index}) is an "
                                    f"empty assistant turn: it has no tokens to supervise")
    return t


def _tools(rec: dict) -> list[dict] | None:
    tools = _opt(rec, "tools", (list, str))
    if isinstance(tools, str):  # ShareGPT (LLaMA-Factory) stores the list as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise _FieldError("tools", f"not JSON: {e.msg}") from None
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) for t in tools)):
        raise _FieldError("tools", "expected a list of JSON schemas (objects)")
    return tools or None


def _content_id(ctx: dict, system: str | None, messages: list[Message]) -> str:
    """The id of a record that gives none: a hash of its text (system prompt and turns, not
    which steps are selected), so renaming or re-exporting a file, or selecting other steps,
    keeps it, and the validation split (a hash of the ids) stays put. Identical records in
    one file get ``-2``, ``-3``... in file order."""
    payload = json.dumps([system, [(m.role, m.as_text()) for m in messages]], ensure_ascii=False)
    tid = "t-" + hashlib.sha256(payload.encode()).hexdigest()[:12]
    n = ctx["content_ids"][tid] = ctx["content_ids"].get(tid, 0) + 1
    return tid if n == 1 else f"{tid}-{n}"


# --------------------------------------------------------------------------------------- atlas


_ATLAS_MESSAGE = {"role", "content", "selected", "criterion", "reason", "tool_calls", "tool_call_id",
                  "name", "extra"}
_ATLAS_RECORD = {"id", "env", "system", "messages", "meta", "tools", "extra"}


def _from_atlas(rec: dict, ctx: dict) -> Trajectory:
    messages = []
    for _, f, m in _objects(rec, "messages"):
        calls = [_call(_req(c, "name", str, g + ".name"), c.get("arguments"), c.get("id"), g,
                       _opt(c, "extra", dict, {}, g + ".extra"))
                 for _, g, c in _objects(m, "tool_calls", f)] if m.get("tool_calls") else []
        _check_result(messages, _opt(m, "tool_call_id", str, field=f + ".tool_call_id"), f)
        messages.append(_message(
            _req(m, "role", str, f + ".role"), _req(m, "content", str, f + ".content"),
            _opt(m, "selected", bool, field=f + ".selected"), f + ".role",
            criterion=_opt(m, "criterion", str, field=f + ".criterion"),
            reason=_opt(m, "reason", str, field=f + ".reason"), tool_calls=calls,
            tool_call_id=_opt(m, "tool_call_id", str, field=f + ".tool_call_id"),
            name=_opt(m, "name", str, field=f + ".name"),
            extra={**_opt(m, "extra", dict, {}, field=f + ".extra"),
                   **_unknown(m, _ATLAS_MESSAGE, ctx, "messages[]")}))
    return _trajectory(id=str(_req(rec, "id", (str, int))), env=_req(rec, "env", str),
                       messages=messages, system=_opt(rec, "system", str),
                       meta=_opt(rec, "meta", dict, {}), tools=_tools(rec),
                       extra={**_opt(rec, "extra", dict, {}), **_unknown(rec, _ATLAS_RECORD, ctx, "record")})


def _to_atlas(t: Trajectory) -> dict:
    messages = []
    for m in t.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            d["selected"] = bool(m.selected)
            if m.criterion is not None:
                d["criterion"] = m.criterion
            if m.reason is not None:
                d["reason"] = m.reason
        if m.tool_calls:
            d["tool_calls"] = [{"name": c.name, "arguments": c.arguments,
                                **({"id": c.id} if c.id is not None else {}),
                                **({"extra": c.extra} if c.extra else {})} for c in m.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        inline = t.meta.get("fields_from") == "atlas"  # an atlas file's own fields stay put
        if m.extra and not inline:
            d["extra"] = m.extra
        messages.append(_with(d, m.extra, t, "atlas"))
    rec = {"id": t.id, "env": t.env, "system": t.system, "messages": messages, "meta": t.meta}
    if t.tools:
        rec["tools"] = t.tools
    if t.extra and t.meta.get("fields_from") != "atlas":
        rec["extra"] = t.extra
    return _with(rec, t.extra, t, "atlas")


# ------------------------------------------------------------------------------------ agentgym

_GYM_ROLES = {"human": "user", "gpt": "assistant"}


def _from_agentgym(rec: dict, ctx: dict) -> Trajectory:
    id_key = "item_id" if "item_id" in rec else "id"
    tid = str(_req(rec, id_key, (str, int)))
    system, messages = _conversations(rec, _GYM_ROLES, with_loss=True, ctx=ctx)
    env = ctx["env"] or (tid.rsplit("_", 1)[0] if "_" in tid else ctx["stem"])
    return _trajectory(id=tid, env=env, messages=messages, system=system,
                       meta={"id_key": id_key} if id_key != "id" else {})


def _to_agentgym(t: Trajectory) -> dict:
    t = t.as_text()  # AgentGym's layout has no tool calls: they are written into the text
    conv = [{"from": "system", "loss": None, "value": t.system}] if t.system is not None else []
    for m in t.messages:
        conv.append({"from": "gpt" if m.role == "assistant" else "human",
                     "loss": bool(m.selected) if m.role == "assistant" else None,
                     "value": m.content})
        conv[-1] = _with(conv[-1], m.extra, t, "agentgym")
    return _with({"conversations": conv, t.meta.get("id_key", "id"): t.id}, t.extra, t, "agentgym")


# -------------------------------------------------------------------------------------- openai


_OPENAI_MESSAGE = {"role", "content", "weight", "tool_calls", "tool_call_id", "name"}


def _from_openai(rec: dict, ctx: dict) -> Trajectory:
    system, messages = None, []
    for i, f, m in _objects(rec, "messages"):
        role = _req(m, "role", str, f + ".role")
        calls = []
        if m.get("tool_calls") is not None:
            for _, g, c in _objects(m, "tool_calls", f):
                fn = _req(c, "function", dict, g + ".function")
                calls.append(_call(_req(fn, "name", str, g + ".function.name"),
                                   fn.get("arguments"), c.get("id"), g + ".function",
                                   _unknown(c, {"id", "type", "function"}, ctx, "tool_calls[]")))
        # content is null on an assistant turn that only calls tools
        content = (_opt(m, "content", str, "", f + ".content") if calls
                   else _req(m, "content", str, f + ".content"))
        weight = _opt(m, "weight", int, field=f + ".weight")
        if weight not in (None, 0, 1) or isinstance(weight, bool):
            raise _FieldError(f + ".weight", f"expected 0 or 1, got {weight!r}")
        if role == "system" and i == 0:
            system = content
            continue
        if role == "tool" and m.get("tool_call_id") is None and any(x.id for x in
                                                                    _last_calls(messages)):
            raise _FieldError(f + ".tool_call_id", "missing: the calls it answers have ids")
        _check_result(messages, _opt(m, "tool_call_id", str, field=f + ".tool_call_id"), f)
        messages.append(_message(
            role, content, None if weight is None else bool(weight), f + ".role", tool_calls=calls,
            tool_call_id=_opt(m, "tool_call_id", str, field=f + ".tool_call_id"),
            name=_opt(m, "name", str, field=f + ".name") if role == "tool" else None,
            extra=_unknown(m, _OPENAI_MESSAGE if role == "tool" else _OPENAI_MESSAGE - {"name"},
                           ctx, "messages[]")))
    return _trajectory(id=_content_id(ctx, system, messages), env=ctx["env"] or ctx["stem"],
                       messages=messages, system=system, tools=_tools(rec),
                       extra=_unknown(rec, {"messages", "tools"}, ctx, "record"))


def _check_result(messages: list[Message], call_id: Any, field: str) -> None:
    """A tool result's ``tool_call_id`` must name a call made before it."""
    if call_id is not None and not any(c.id == call_id for m in messages for c in m.tool_calls):
        raise _FieldError(field + ".tool_call_id", f"{call_id!r} matches no earlier tool call")


def _last_calls(messages: list[Message]) -> list[ToolCall]:
    return next((m.tool_calls for m in reversed(messages) if m.role == "assistant"), [])


def _openai_call(c: ToolCall, t: Trajectory) -> dict:
    return _with({**({"id": c.id} if c.id is not None else {}), "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                               else json.dumps(c.arguments, ensure_ascii=False)}}, c.extra, t, "openai")


def _to_openai(t: Trajectory) -> dict:
    msgs: list[dict] = [{"role": "system", "content": t.system}] if t.system is not None else []
    for m in t.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or (None if m.tool_calls else "")}
        if m.tool_calls:
            d["tool_calls"] = [_openai_call(c, t) for c in m.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.role == "assistant":
            d["weight"] = int(bool(m.selected))
        msgs.append(_with(d, m.extra, t, "openai"))
    return _with({"messages": msgs, **({"tools": t.tools} if t.tools else {})}, t.extra, t, "openai")


# ------------------------------------------------------------------------------------ sharegpt

_SHAREGPT_ROLES = {"human": "user", "user": "user", "observation": "user",
                   "gpt": "assistant", "assistant": "assistant", "function_call": "function_call"}


def _from_sharegpt(rec: dict, ctx: dict) -> Trajectory:
    system, messages = _conversations(rec, _SHAREGPT_ROLES, with_loss=False, ctx=ctx,
                                      system=_opt(rec, "system", str))
    tid = _opt(rec, "id", (str, int))
    meta = {"tools_layout": "list"} if isinstance(rec.get("tools"), list) else {}
    return _trajectory(id=str(tid) if tid is not None else _content_id(ctx, system, messages),
                       env=ctx["env"] or ctx["stem"], messages=messages, system=system,
                       tools=_tools(rec), meta=meta,
                       extra=_unknown(rec, {"id", "system", "conversations", "tools"}, ctx, "record"))


def _to_sharegpt(t: Trajectory) -> dict:
    conv: list[dict] = []
    for m in t.messages:
        if m.role == "assistant" and m.tool_calls:
            if m.content:  # no turn holds both: the text goes first, as its own turn
                conv.append({"from": "gpt", "value": m.content})
            calls = [{"name": c.name, "arguments": c.args} for c in m.tool_calls]
            conv.append(_with({"from": "function_call", "value": json.dumps(
                calls[0] if len(calls) == 1 else calls, ensure_ascii=False)}, m.extra, t, "sharegpt"))
            continue
        who = {"assistant": "gpt", "tool": "observation"}.get(m.role, "human")
        conv.append(_with({"from": who, "value": m.content}, m.extra, t, "sharegpt"))
    rec: dict[str, Any] = {"id": t.id, "conversations": conv}
    if t.system is not None:
        rec["system"] = t.system
    if t.tools:  # LLaMA-Factory's layout: the list as JSON text
        rec["tools"] = (t.tools if t.meta.get("tools_layout") == "list"
                        else json.dumps(t.tools, ensure_ascii=False))
    return _with(rec, t.extra, t, "sharegpt")


# ----------------------------------------------------------------------------------- anthropic

# Anthropic Messages: content is a string or blocks; an assistant's ``tool_use`` blocks are its
# calls, a user turn's ``tool_result`` blocks the results (each a tool message, in order).


def _from_anthropic(rec: dict, ctx: dict) -> Trajectory:
    messages: list[Message] = []
    for _, f, m in _objects(rec, "messages"):
        role = _req(m, "role", str, f + ".role")
        extra = _unknown(m, {"role", "content"}, ctx, "messages[]")
        content = _req(m, "content", (str, list), f + ".content")
        if isinstance(content, str):
            messages.append(_message(role, content, None, f + ".role", extra=extra))
            continue
        texts, calls = [], []
        for _, g, b in _objects(m, "content", f):
            kind = _req(b, "type", str, g + ".type")
            if kind == "text":
                texts.append(_req(b, "text", str, g + ".text"))
            elif kind == "tool_use" and role == "assistant":
                calls.append(_call(_req(b, "name", str, g + ".name"), _req(b, "input", dict, g + ".input"),
                                   b.get("id"), g, _unknown(b, {"type", "id", "name", "input"}, ctx,
                                                            "content[].tool_use")))
            elif kind == "tool_result" and role == "user":
                if isinstance(b.get("content"), list):
                    result = "\n".join(_req(x, "text", str, h + ".text")
                                       for _, h, x in _objects(b, "content", g))
                else:
                    result = _req(b, "content", str, g + ".content")
                _check_result(messages, _opt(b, "tool_use_id", str, field=g + ".tool_use_id"), g)
                messages.append(_message("tool", result, None, g,
                                         tool_call_id=_opt(b, "tool_use_id", str, field=g + ".tool_use_id"),
                                         extra=_unknown(b, {"type", "tool_use_id", "content"}, ctx,
                                                        "content[].tool_result")))
            else:
                raise _FieldError(g + ".type", f"a {role} turn cannot hold a {kind!r} block")
        if texts or calls or role == "assistant":
            messages.append(_message(role, "\n".join(texts), None, f + ".role", tool_calls=calls,
                                     extra=extra))
    return _trajectory(id=_content_id(ctx, _opt(rec, "system", str), messages),
                       env=ctx["env"] or ctx["stem"], messages=messages,
                       system=_opt(rec, "system", str), tools=_tools(rec),
                       extra=_unknown(rec, {"system", "messages", "tools"}, ctx, "record"))


def _to_anthropic(t: Trajectory) -> dict:
    msgs: list[dict] = []
    for m in t.messages:
        if m.role == "tool":
            block = _with({"type": "tool_result", **({"tool_use_id": m.tool_call_id} if m.tool_call_id
                                                     else {}), "content": m.content}, m.extra, t, "anthropic")
            if msgs and msgs[-1]["role"] == "user" and isinstance(msgs[-1]["content"], list):
                msgs[-1]["content"].append(block)  # results of one turn share a user turn
            else:
                msgs.append({"role": "user", "content": [block]})
            continue
        if not m.tool_calls:
            msgs.append(_with({"role": m.role, "content": m.content}, m.extra, t, "anthropic"))
            continue
        blocks = [{"type": "text", "text": m.content}] if m.content else []
        blocks += [_with({"type": "tool_use", **({"id": c.id} if c.id else {}), "name": c.name,
                          "input": c.args}, c.extra, t, "anthropic") for c in m.tool_calls]
        msgs.append(_with({"role": m.role, "content": blocks}, m.extra, t, "anthropic"))
    rec: dict[str, Any] = {"system": t.system} if t.system is not None else {}
    return _with({**rec, "messages": msgs, **({"tools": t.tools} if t.tools else {})}, t.extra, t,
                 "anthropic")


# ----------------------------------------------------------------- agent data protocol (adp)

# ADP (neulab/agent-data-protocol) standardized trajectories: {"id", "content": [items], "details",
# "available_apis"?}, each item typed by "class_". Actions are the agent's steps, observations
# its context; consecutive actions (parallel calls) are one step.
_ADP_ACTIONS = {"api_action", "code_action", "message_action"}
_ADP_OBSERVATIONS = {"text_observation", "json_observation", "web_observation",
                     "image_observation"}
_ADP_USER_SOURCES = {"user", "user_msg", "system"}
ADP_CODE_TOOL = {"type": "function", "function": {
    "name": "execute_code", "description": "Run code and return its output.",
    "parameters": {"type": "object", "properties": {"language": {"type": "string"},
                                                    "code": {"type": "string"}},
                   "required": ["language", "code"]}}}


def _adp_observation(item: dict, kind: str, f: str) -> str:
    if kind == "text_observation":
        return _req(item, "content", str, f + ".content")
    if kind == "json_observation":
        return json.dumps(_req(item, "content", (dict, list), f + ".content"), ensure_ascii=False)
    if kind == "image_observation":
        return f"[image: {_req(item, 'content', str, f + '.content')}]"
    parts = [f"URL: {item['url']}" if item.get("url") else None,
             _opt(item, "axtree", str, field=f + ".axtree") or _opt(item, "html", str, field=f + ".html")]
    return "\n".join(p for p in parts if p) or "[web page]"


def _from_adp(rec: dict, ctx: dict) -> Trajectory:
    messages: list[Message] = []
    pending: list[ToolCall] = []  # calls of the last step still waiting for their result
    api_names = set()
    for _, f, item in _objects(rec, "content"):
        kind = _req(item, "class_", str, f + ".class_")
        if kind in _ADP_ACTIONS:
            thought = "\n".join(x for x in (_opt(item, "reasoning_content", str, field=f + ".reasoning_content"),
                                            _opt(item, "description", str, field=f + ".description")) if x)
            if kind == "message_action":
                text = _req(item, "content", str, f + ".content")
                messages.append(_message("assistant", f"{thought}\n\n{text}" if thought else text,
                                         True, f))
                pending = []
                continue
            if kind == "api_action":
                name = _req(item, "function", str, f + ".function")
                api_names.add(name)
                call = _call(name, _req(item, "kwargs", dict, f + ".kwargs"), item.get("tool_call_id"), f)
            else:
                call = _call("execute_code", {"language": _req(item, "language", str, f + ".language"),
                                              "code": _req(item, "content", str, f + ".content")},
                             item.get("tool_call_id"), f)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls and pending:
                last.tool_calls.append(call)  # a parallel call: same step
                if thought:
                    last.content = f"{last.content}\n{thought}" if last.content else thought
            else:
                messages.append(_message("assistant", thought, True, f, tool_calls=[call]))
                pending = []
            pending.append(call)
        elif kind in _ADP_OBSERVATIONS:
            text = _adp_observation(item, kind, f)
            source = item.get("source")
            call_id = _opt(item, "tool_call_id", str, field=f + ".tool_call_id")
            if pending and source not in _ADP_USER_SOURCES:
                call = next((c for c in pending if c.id == call_id), None) if call_id else pending[0]
                if call is None:
                    raise _FieldError(f + ".tool_call_id", f"{call_id!r} answers no pending call")
                pending.remove(call)
                messages.append(_message("tool", text, None, f, tool_call_id=call_id,
                                         name=call.name))
            else:
                if call_id is not None:
                    raise _FieldError(f + ".tool_call_id", f"{call_id!r} answers no pending call")
                messages.append(_message("user", text, None, f))
                pending = []
        else:
            raise _FieldError(f + ".class_", f"expected one of "
                                             f"{sorted(_ADP_ACTIONS | _ADP_OBSERVATIONS)}, got {kind!r}")
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object",
                                                                         "properties": {}}}}
             for n in sorted(api_names | {a for a in _opt(rec, "available_apis", list, []) or []
                                          if isinstance(a, str)})]
    if any(c.name == "execute_code" and c.name not in api_names for m in messages for c in m.tool_calls):
        tools.append(ADP_CODE_TOOL)
    meta = {"details": _opt(rec, "details", dict, {})}
    if rec.get("schema_version") is not None:
        meta["schema_version"] = rec["schema_version"]
    return _trajectory(id=str(_req(rec, "id", (str, int))), env=ctx["env"] or ctx["stem"],
                       messages=messages, tools=tools or None, meta=meta,
                       extra=_unknown(rec, {"id", "content", "details", "schema_version",
                                            "available_apis"}, ctx, "record"))


_READERS: dict[str, Callable[[dict, dict], Trajectory]] = {
    "atlas": _from_atlas, "agentgym": _from_agentgym, "openai": _from_openai,
    "sharegpt": _from_sharegpt, "anthropic": _from_anthropic, "adp": _from_adp}
_WRITERS: dict[str, Callable[[Trajectory], dict]] = {
    "atlas": _to_atlas, "agentgym": _to_agentgym, "openai": _to_openai, "sharegpt": _to_sharegpt,
    "anthropic": _to_anthropic}


def detect_format(record: dict) -> str:
    """Guess the format of one record (``auto``)."""
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        gym = "item_id" in record or any(isinstance(t, dict) and "loss" in t for t in turns)
        return "agentgym" if gym else "sharegpt"
    if "messages" in record:
        if "env" in record and "id" in record:
            return "atlas"
        msgs = record["messages"] if isinstance(record["messages"], list) else []
        blocks = {b.get("type") for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), list)
                  for b in m["content"] if isinstance(b, dict)}
        tools = record.get("tools") if isinstance(record.get("tools"), list) else []
        return "anthropic" if blocks & {"tool_use", "tool_result"} or any(
            isinstance(t, dict) and "input_schema" in t for t in tools) else "openai"
    if isinstance(record.get("content"), list) and "id" in record:
        return "adp"
    raise _FieldError(None, "cannot tell the format: no 'messages' or 'conversations' field "
                            "(pass format=atlas|agentgym|openai|sharegpt|anthropic|adp)")


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
    out, seen, content_ids, unknown = [], {}, {}, {}
    for where, index, rec in _records(path):
        try:
            if not isinstance(rec, dict):
                raise _FieldError(None, f"expected a JSON object, got {type(rec).__name__}")
            fmt = detect_format(rec) if format == "auto" else format
            t = _READERS[fmt](rec, {"stem": path.stem, "index": index, "env": env,
                                    "content_ids": content_ids, "unknown": unknown})
        except _FieldError as e:
            raise DataFormatError(path, where, e.field, str(e)) from None
        except ValueError as e:  # a Message / Trajectory invariant (no steps, a bad role...)
            raise DataFormatError(path, where, None, str(e)) from None
        if t.id in seen:
            raise DataFormatError(path, where, "id", f"duplicate trajectory id {t.id!r} "
                                                     f"(first at {seen[t.id]})")
        seen[t.id] = where
        t.meta.setdefault("source", f"{path.name}:{where}")
        if _has_extra(t):  # which format those fields belong to (kept through atlas files)
            t.meta.setdefault("fields_from", fmt)
        out.append(t)
    if not out:
        raise DataFormatError(path, None, None, "no trajectories in file")
    if unknown:
        log.warning("%s: fields atlas does not use, kept as they are and written back when writing "
                    "the same format: %s", path.name, ", ".join(f"{k} ({n}x)" for k, n in sorted(unknown.items())))
    return out


def trajectory_to_record(trajectory: Trajectory, format: str = "atlas") -> dict:
    """One trajectory as the JSON record of ``format``."""
    if format not in _WRITERS:
        raise ValueError(f"cannot write trajectory format {format!r}; expected one of {WRITABLE}")
    return _WRITERS[format](trajectory)


def write_trajectories(path: str | Path, trajectories: Iterable[Trajectory], format: str = "atlas") -> Path:
    """Write trajectories atomically; returns the path written."""
    if format not in _WRITERS:
        raise ValueError(f"cannot write trajectory format {format!r}; expected one of {WRITABLE}")
    trajectories = list(trajectories)
    if format in ("sharegpt", "anthropic"):
        partial = sum(t.num_steps != len(t.selected_steps) for t in trajectories)
        if partial:
            log.warning("%s cannot record step selection: %d trajectories with unselected steps "
                        "are written as fully supervised (use agentgym or openai)", format, partial)
    if format == "sharegpt":
        split = sum(bool(m.content and m.tool_calls) for t in trajectories for m in t.messages)
        if split:
            log.warning("sharegpt has no turn with both text and a call: %d steps are written as "
                        "a gpt turn followed by a function_call turn (use openai or atlas)", split)
    if format == "agentgym":
        calls = sum(t.has_tool_calls for t in trajectories)
        if calls:
            log.warning("agentgym has no tool calls: %d trajectories are written with their calls "
                        "and results in the text (data.tools_as_text form)", calls)
    lines = [json.dumps(trajectory_to_record(t, format), ensure_ascii=False) for t in trajectories]
    return atomic_write(path, "".join(line + "\n" for line in lines))
