"""Per-step loss masks: the one place that decides which tokens are supervised.

How each step's tokens are found, without ``{% generation %}`` markers (most stock templates lack
them) and without searching for the step's text (which a system prompt, an earlier turn or the
template's own markup can also contain):

1. Render the trajectory with the tokenizer's own chat template, and render it again with every
   step replaced by a unique sentinel. Between the sentinels lies exactly what the template
   writes around the steps (markup, system prompt, observations).
2. Walk the real rendering: that markup, then the step as the template writes it (whole, or
   stripped by templates that trim), then the next markup. Anything else is a
   :class:`MaskingError` that names the trajectory and step, never a guess.
3. Tokenize with character offsets; a step's tokens are exactly those of its characters (a token
   that straddles markup and step is an error), plus the special tokens that close the turn
   (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, Cohere's ``<|END_RESPONSE|>`` and
   ``<|END_OF_TURN_TOKEN|>``...): what the template writes after the step when the conversation
   ends there, so the model learns to stop.

The tests check this token-exactly on real template families (ChatML, Qwen2.5, Llama-3, Gemma,
Phi-3, Cohere 2): the decoded supervised spans equal the selected turns plus their end of turn,
and text built to fool a search (a few-shot system prompt, a step that is template markup) is
located right.

Tool calls: the template renders the trajectory's ``tools`` and each step's calls itself (the
structured messages of :meth:`Trajectory.chat`). A step that calls tools is everything the
template writes between the markup before the turn and the markup after it (its text, if the
template keeps it, and its calls in the template's own syntax: Qwen2.5's ``<tool_call>`` JSON,
Llama-3.1's ``{"name", "parameters"}``), plus the end of turn; tool results are context like
observations. Checked token-exactly against hand-written renderings for Qwen2.5 and Llama-3.1.
A template that cannot render tools is an error naming the model and the way out
(``data.tools_as_text=true``: :meth:`Trajectory.as_text`).

Labels are the input ids on the selected steps' tokens and -100 elsewhere. Everything after the
last supervised token is dropped: a causal LM's loss on earlier tokens cannot depend on it.

Granularity (``selector.granularity``) supervises part of each selected step: ``step`` the whole
turn, ``action`` only its action and the end of turn (from the last ``Action:`` followed by text,
or the tool call as the template, or ``tools_as_text``, writes it), ``thought`` only what comes before the
action (no end of turn). A token that spans the boundary goes with the action. A step without
an action is supervised whole under ``action`` and without its end of turn under ``thought``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from atlas.data.trajectory import Trajectory
from atlas.envs.base import action_start
from atlas.utils import Choice, UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class Overflow(Choice):
    """What happens to a selected step past ``max_length``: left out (logged), or an error."""

    DROP_STEPS = "drop_steps"
    ERROR = "error"


class Granularity(Choice):
    """Which part of a chosen step is supervised: all of it, its action, or its thought."""

    STEP = "step"
    ACTION = "action"
    THOUGHT = "thought"


class ControlStrings(Choice):
    """What a step whose text holds a control string (``<|im_end|>``) gets: an error, a warning,
    or nothing (``data.special_tokens_in_text``)."""

    ERROR = "error"
    WARN = "warn"
    ALLOW = "allow"


class MaskingError(UserError, ValueError):
    """A trajectory cannot be turned into a training example."""


class StepOverflowError(MaskingError):
    """Selected steps end past ``max_length``."""


class NothingToSuperviseError(MaskingError):
    """The selected steps have no token at the chosen granularity (e.g. thoughtless steps)."""


@dataclass
class TokenizedTrajectory:
    """A rendered trajectory and the token span of each step.

    Attributes:
        input_ids: Token ids of the whole rendered conversation.
        step_spans: Per step, ``(start, end)`` token indices (end exclusive, end-of-turn included).
        text: The rendered text.
        action_starts: Per step, the token where its action begins (None: it has none).
        text_ends: Per step, the token after its text (before the end-of-turn tokens).
    """

    input_ids: list[int]
    step_spans: list[tuple[int, int]]
    text: str
    action_starts: list[int | None] = field(default_factory=list)
    text_ends: list[int] = field(default_factory=list)

    def span(self, k: int, granularity: str = "step") -> tuple[int, int]:
        """The tokens of step ``k`` supervised at ``granularity`` (possibly empty)."""
        start, end = self.step_spans[k]
        action = self.action_starts[k]
        if granularity == "action":
            return (start if action is None else action, end)
        if granularity == "thought":
            return (start, self.text_ends[k] if action is None else action)
        return start, end


@dataclass
class Example:
    """A masked training example built from one trajectory.

    Attributes:
        trajectory_id: Id of the source trajectory.
        input_ids: Token ids, cut after the last supervised token.
        labels: ``input_ids`` on supervised tokens, ``IGNORE_INDEX`` elsewhere.
        step_ids: Step index of each supervised token, -1 elsewhere (for per-step averaging).
        num_steps: Steps in the trajectory.
        selected_steps: Steps supervised in this example.
        dropped_steps: Selected steps left out because they end past ``max_length``.
    """

    trajectory_id: str
    input_ids: list[int]
    labels: list[int]
    step_ids: list[int]
    num_steps: int
    selected_steps: list[int]
    dropped_steps: list[int] = field(default_factory=list)

    @property
    def num_supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def apply_template(tokenizer, chat: list[dict], tools: list[dict] | None = None, **kw) -> str:
    """The tokenizer's chat template applied to ``chat`` (and ``tools``, when there are any)."""
    if tools:
        kw["tools"] = tools
    return tokenizer.apply_chat_template(chat, tokenize=False, **kw)


_PROBE_TOOL = {"type": "function", "function": {
    "name": "atlas_probe", "description": "d",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
_PROBE_CHAT = [
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_0", "function": {"name": "atlas_probe",
                                                          "arguments": {"x": 98765}}}]},
    {"role": "tool", "tool_call_id": "call_0", "name": "atlas_probe", "content": "atlas_result"}]
_renders_tools: dict[tuple[str, str], bool] = {}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a tool call's arguments and its result
    (many templates silently drop both)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), str(tokenizer.chat_template))
    if key not in _renders_tools:
        try:
            text = apply_template(tokenizer, _PROBE_CHAT, [_PROBE_TOOL])
        except Exception:  # noqa: BLE001 - a template that raises on tools cannot render them
            text = ""
        _renders_tools[key] = "98765" in text and "atlas_result" in text
    return _renders_tools[key]


def tools_template_error(tokenizer) -> str:
    return (f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} "
            f"cannot render tool calls and tool results: use a model whose template can (e.g. "
            f"model.name=Qwen/Qwen2.5-0.5B-Instruct or a Llama-3.1 Instruct), or "
            f"data.tools_as_text=true to write them into the text (README: Tool calling)")


def _rendered_chat(trajectory: Trajectory, tokenizer) -> tuple[list[dict[str, Any]], int, str]:
    """The messages the chat template accepts, the index of ``trajectory.messages[0]`` in
    them, and their rendering. Templates that refuse a system role (Gemma, Mistral) get the
    system prompt folded into the first user turn, the way those model families are prompted."""
    if trajectory.has_tool_calls and not renders_tools(tokenizer):
        raise MaskingError(f"{_name(trajectory)} calls tools, and {tools_template_error(tokenizer)}")
    chat = trajectory.chat()
    offset = len(chat) - len(trajectory.messages)
    try:
        try:
            return chat, offset, apply_template(tokenizer, chat, trajectory.tools)
        except TemplateError:
            if chat[0]["role"] != "system" or len(chat) < 2 or chat[1]["role"] != "user":
                raise
            folded = [{"role": "user", "content": chat[0]["content"] + "\n\n" + chat[1]["content"]}]
            folded += chat[2:]
            return folded, 0, apply_template(tokenizer, folded, trajectory.tools)
    except TemplateError as e:
        raise MaskingError(f"{_name(trajectory)}: the chat template refuses this conversation: "
                           f"{e}") from None


def render(trajectory: Trajectory, tokenizer) -> str:
    """The trajectory rendered by the tokenizer's chat template."""
    return _rendered_chat(trajectory, tokenizer)[2]


_warned_dropped_text: set[str] = set()


def _name(trajectory: Trajectory) -> str:
    source = trajectory.meta.get("source")
    return f"trajectory {trajectory.id}" + (f" ({source})" if source else "")


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def special_token_strings(tokenizer) -> set[str]:
    """The control strings of a tokenizer (``<|im_end|>``, ``<|eot_id|>``...): text that
    tokenizes as a special token wherever it occurs."""
    strings = {str(t) for t in tokenizer.all_special_tokens}
    strings.update(tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special)
    return {s for s in strings if s}


def _sentinel(text: str, k: int) -> str:
    """A marker for step ``k`` that occurs nowhere in ``text`` and that no template trims."""
    nonce = hashlib.sha1(text.encode()).hexdigest()[:12]
    while nonce in text:
        nonce = hashlib.sha1(nonce.encode()).hexdigest()[:12]
    return f"ATLAS{nonce}STEP{k}END"


def tokenize_steps(trajectory: Trajectory, tokenizer,
                   special_tokens_in_text: str = "warn") -> TokenizedTrajectory:
    """Tokenize a trajectory with its chat template and locate every step's tokens.

    Args:
        trajectory: The trajectory.
        tokenizer: A fast tokenizer with a chat template.
        special_tokens_in_text: A step whose text contains a control string of the tokenizer
            (``<|im_end|>`` typed as text) is tokenized with the control token in it, which
            teaches the model to stop mid-step: ``error`` raises, ``warn`` logs the trajectory
            and step, ``allow`` says nothing.

    Raises:
        MaskingError: naming the trajectory and step, when a step cannot be located exactly.
    """
    special_tokens_in_text = ControlStrings.of(special_tokens_in_text, "data.special_tokens_in_text")
    if not getattr(tokenizer, "is_fast", False):
        raise MaskingError("per-step masks need a fast tokenizer (character offsets)")
    name = _name(trajectory)
    chat, offset, text = _rendered_chat(trajectory, tokenizer)
    apply = lambda msgs: apply_template(tokenizer, msgs, trajectory.tools)  # noqa: E731
    steps = trajectory.steps
    _check_control_strings(trajectory, steps, tokenizer, special_tokens_in_text)

    # 1. the skeleton: the same conversation with each step replaced by a unique sentinel.
    #    Between the sentinels lies exactly what the template writes around the steps.
    sentinels = [_sentinel(text, k) for k in range(len(steps))]
    skeleton_chat = [dict(m) for m in chat]
    for step, sentinel in zip(steps, sentinels):  # a plain turn: no tool calls either
        skeleton_chat[step.message_index + offset] = {"role": "assistant", "content": sentinel}
    skeleton = apply(skeleton_chat)
    pattern = "|".join(re.escape(s) for s in sentinels)
    segments = re.split(pattern, skeleton)
    if len(segments) != len(steps) + 1 or re.findall(pattern, skeleton) != sentinels:
        raise MaskingError(f"{name}: the steps do not appear verbatim and in order in the chat "
                           f"template's output; the template rewrites assistant turns, so their "
                           f"tokens cannot be located")

    # 2. walk the real rendering: markup, step, markup, step... each step as the template
    #    writes it (whole, or stripped by templates that trim: Llama-3, Gemma)
    char_spans: list[tuple[int, int]] = []
    action_chars: list[int | None] = []  # where each step's action begins
    pos = 0
    for k, step in enumerate(steps):
        if not text.startswith(segments[k], pos):
            raise MaskingError(f"{name}: step {k} (message {step.message_index}): the chat "
                               f"template renders the conversation around it differently from "
                               f"the same conversation without it, so its tokens cannot be "
                               f"located")
        pos += len(segments[k])
        content = step.message.content
        after = segments[k + 1]
        if step.message.tool_calls:
            char_spans.append(_tool_step_span(text, pos, after, k + 1 == len(steps), step, name,
                                              tokenizer))
            region = text[pos:char_spans[-1][1]]  # the step's text (if kept), then its calls
            kept = step.message.content.strip()
            lead = len(region) - len(region.lstrip())
            at = lead + len(kept) if kept and region[lead:].startswith(kept) else 0
            action_chars.append(pos + at + len(region[at:]) - len(region[at:].lstrip()))
            pos = char_spans[-1][1]
            continue
        fits = [c for c in dict.fromkeys([content, content.strip()])
                if text.startswith(c, pos) and (text.startswith(after, pos + len(c)) if k + 1 < len(steps)
                                                else text[pos + len(c):] == after)]
        if not fits:
            raise MaskingError(f"{name}: step {k} (message {step.message_index}) does not appear "
                               f"verbatim in the chat template's output; the template rewrites "
                               f"assistant turns, so its tokens cannot be located")
        char_spans.append((pos, pos + len(fits[0])))
        a = action_start(fits[0])
        action_chars.append(None if a is None else pos + a)
        pos += len(fits[0])

    # 3. what the template writes to close each turn: the rendering of the conversation that
    #    ends with the turn agrees with the full one up to there
    closings = []
    for k, (step, (s, e)) in enumerate(zip(steps, char_spans)):
        through = apply(chat[:step.message_index + offset + 1])
        closings.append(e + len(os.path.commonprefix([text[e:], through[e:]]))
                        if through[:e] == text[:e] else e)

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = special_token_ids(tokenizer)
    step_spans, action_starts, text_ends = [], [], []
    for k, ((s, e), closing) in enumerate(zip(char_spans, closings)):
        toks = [j for j, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
        if not toks:
            raise MaskingError(f"{name}: step {k} (message {steps[k].message_index}) is empty: "
                               f"it has no tokens to supervise")
        start, end = toks[0], toks[-1] + 1
        if offsets[start][0] != s or offsets[end - 1][1] != e:
            raise MaskingError(
                f"{name}: step {k} (message {steps[k].message_index}) does not begin and end on "
                f"token boundaries: a token spans the template's markup and the step "
                f"({text[offsets[start][0]:offsets[end - 1][1]]!r})")
        text_ends.append(end)
        a = action_chars[k]  # the action: from the token that holds its first character
        action_starts.append(None if a is None else next(j for j in toks if offsets[j][1] > a))
        # the end-of-turn tokens: supervising them teaches the model to stop
        while end < len(ids) and ids[end] in specials and offsets[end][1] <= closing:
            end += 1
        step_spans.append((start, end))
    return TokenizedTrajectory(input_ids=list(ids), step_spans=step_spans, text=text,
                               action_starts=action_starts, text_ends=text_ends)


def _tool_step_span(text: str, pos: int, after: str, last: bool, step, name: str,
                    tokenizer) -> tuple[int, int]:
    """The characters of a step that calls tools: all the template writes from ``pos`` up to
    the markup that follows the turn (``after``, known from the skeleton)."""
    end = text.find(after, pos) if not last else (
        len(text) - len(after) if text.endswith(after) and len(text) - len(after) >= pos else -1)
    region = text[pos:end] if end >= pos else ""
    missing = [c.name for c in step.message.tool_calls if c.name not in region]
    if end < 0 or missing or not region.strip():
        raise MaskingError(f"{name}: step {step.index} (message {step.message_index}): the chat "
                           f"template does not write its tool calls ({', '.join(missing) or 'all'}) "
                           f"inside the turn, so their tokens cannot be located")
    text_kept = region.lstrip().startswith(step.message.content.strip())
    key = str(getattr(tokenizer, "name_or_path", ""))
    if not text_kept and key not in _warned_dropped_text:
        _warned_dropped_text.add(key)
        log.warning("%s: the chat template of %s drops the text of a step that also calls a tool "
                    "(step %d): only the call is supervised (and seen as context)", name,
                    key or "this tokenizer", step.index)
    return pos, end


def _check_control_strings(trajectory, steps, tokenizer, policy: str) -> None:
    if policy == "allow":
        return
    controls = special_token_strings(tokenizer)
    for step in steps:
        found = sorted(c for c in controls if c in step.message.as_text())  # calls too
        if not found:
            continue
        msg = (f"{_name(trajectory)}: step {step.index} (message {step.message_index}) contains "
               f"the control string{'s' if len(found) > 1 else ''} {', '.join(found)} as text: it "
               f"is tokenized as the control token, so the model learns to stop mid-step "
               f"(data.special_tokens_in_text=error|warn|allow)")
        if policy == "error":
            raise MaskingError(msg)
        log.warning(msg)


def encode(trajectory: Trajectory, tokenizer, max_length: int | None = None,
           overflow: str = "drop_steps", special_tokens_in_text: str = "warn",
           granularity: str = "step") -> Example:
    """Build the masked example of a trajectory: labels only on its selected steps.

    Args:
        trajectory: A trajectory whose steps carry ``selected`` flags.
        tokenizer: A fast tokenizer with a chat template.
        max_length: Longest sequence fed to the model (None: no limit).
        overflow: What to do with a selected step that ends past ``max_length``: ``drop_steps``
            leaves it out of the example and records it in ``Example.dropped_steps`` (never
            half a step); ``error`` raises.
        special_tokens_in_text: See :func:`tokenize_steps`.
        granularity: ``step``, ``action`` or ``thought``: which part of each selected step is
            supervised (module docstring).

    Raises:
        MaskingError: the example would have no supervised token, or a step overflows with
            ``overflow="error"``.
    """
    overflow = Overflow.of(overflow, "overflow")
    granularity = Granularity.of(granularity, "granularity")
    tok = tokenize_steps(trajectory, tokenizer, special_tokens_in_text)
    selected = trajectory.selected_steps
    dropped: list[int] = []
    if max_length is not None:
        dropped = [k for k in selected if tok.step_spans[k][1] > max_length]
        if dropped and overflow == "error":
            raise StepOverflowError(
                f"{_name(trajectory)}: selected steps {dropped} end past max_length="
                f"{max_length} (step {dropped[0]} ends at token {tok.step_spans[dropped[0]][1]})")
        selected = [k for k in selected if k not in dropped]
    if not selected:
        if dropped:
            raise StepOverflowError(f"{_name(trajectory)}: no supervised token: its "
                                    f"selected steps {dropped} all end past max_length={max_length}")
        raise MaskingError(f"{_name(trajectory)}: no supervised token: no selected step")
    spans = {k: tok.span(k, granularity) for k in selected}
    spans = {k: (a, b) for k, (a, b) in spans.items() if b > a}
    if not spans:
        raise NothingToSuperviseError(f"{_name(trajectory)}: no supervised token: its selected "
                                      f"steps have no {granularity} (granularity={granularity})")

    end = max(b for _, b in spans.values())
    input_ids = tok.input_ids[:end]
    labels = [IGNORE_INDEX] * end
    step_ids = [-1] * end
    for k, (a, b) in spans.items():
        labels[a:b] = input_ids[a:b]
        step_ids[a:b] = [k] * (b - a)
    return Example(trajectory_id=trajectory.id, input_ids=input_ids, labels=labels,
                   step_ids=step_ids, num_steps=trajectory.num_steps, selected_steps=list(spans),
                   dropped_steps=dropped)
