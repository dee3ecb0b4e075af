"""Per-step loss masks: the one place that decides which tokens are supervised.

How the mask is found, without ``{% generation %}`` markers (most stock templates lack them):

1. Render the whole trajectory once with the tokenizer's own chat template.
2. Walk the messages in order and find each one's content in the rendered text, from where the
   previous one ended (so a step that repeats an earlier observation is not matched there).
3. Tokenize the rendered text with character offsets; a step's tokens are the tokens whose
   characters fall in its content, plus the end-of-turn token right after it when that token is a
   special token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``...), so the model
   learns to stop.

The tests check this token-exactly on five real template families (ChatML, Qwen2.5, Llama-3,
Gemma, Phi-3): the decoded supervised spans equal the selected turns plus their end-of-turn token.

Labels are the input ids on the selected steps' tokens and -100 elsewhere. Everything after the
last selected step is dropped: a causal LM's loss on earlier tokens cannot depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jinja2 import TemplateError

from atlas.data.trajectory import Trajectory

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OVERFLOW = ("drop_steps", "error")


class MaskingError(ValueError):
    """A trajectory cannot be turned into a training example."""


class StepOverflowError(MaskingError):
    """Selected steps end past ``max_length``."""


@dataclass
class TokenizedTrajectory:
    """A rendered trajectory and the token span of each step.

    Attributes:
        input_ids: Token ids of the whole rendered conversation.
        step_spans: Per step, ``(start, end)`` token indices (end exclusive, end-of-turn included).
        text: The rendered text.
    """

    input_ids: list[int]
    step_spans: list[tuple[int, int]]
    text: str


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


def render(trajectory: Trajectory, tokenizer) -> str:
    """The trajectory rendered by the tokenizer's chat template.

    Templates that refuse a system role (Gemma, Mistral) get the system prompt folded into the
    first user turn, the way those model families are prompted.
    """
    chat = trajectory.chat()
    try:
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False)
        except TemplateError:
            if chat[0]["role"] != "system" or len(chat) < 2 or chat[1]["role"] != "user":
                raise
            folded = [{"role": "user", "content": chat[0]["content"] + "\n\n" + chat[1]["content"]}]
            return tokenizer.apply_chat_template(folded + chat[2:], tokenize=False)
    except TemplateError as e:
        raise MaskingError(f"{_name(trajectory)}: the chat template refuses this conversation: "
                           f"{e}") from None


def _name(trajectory: Trajectory) -> str:
    source = trajectory.meta.get("source")
    return f"trajectory {trajectory.id}" + (f" ({source})" if source else "")


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def tokenize_steps(trajectory: Trajectory, tokenizer) -> TokenizedTrajectory:
    """Tokenize a trajectory with its chat template and locate every step's tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise MaskingError("per-step masks need a fast tokenizer (character offsets)")
    text = render(trajectory, tokenizer)
    char_spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(trajectory.messages):
        # templates that trim (Llama-3, Gemma) render the stripped content: take whichever
        # form occurs first, so neither matches a later turn's text; at the same place the
        # untrimmed one, which the template kept whole
        found = [(text.find(c, cursor), -len(c), c) for c in {m.content, m.content.strip()}]
        pos, _, content = min((f for f in found if f[0] >= 0), default=(-1, 0, m.content))
        if pos < 0:
            if m.role == "assistant":
                raise MaskingError(
                    f"{_name(trajectory)}: step {len(char_spans)} (message {i}) does not "
                    f"appear verbatim in the chat template's output; the template rewrites "
                    f"assistant turns, so its tokens cannot be located")
            continue  # a template may drop or rewrite a user turn; steps still match in order
        if m.role == "assistant":
            char_spans.append((pos, pos + len(content)))
        cursor = pos + len(content)

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = special_token_ids(tokenizer)
    step_spans = []
    for k, (s, e) in enumerate(char_spans):
        toks = [j for j, (a, b) in enumerate(offsets) if a < e and b > s and b > a]
        if not toks:
            raise MaskingError(f"{_name(trajectory)}: step {k} has no tokens")
        start, end = toks[0], toks[-1] + 1
        if end < len(ids) and ids[end] in specials:
            end += 1  # the end-of-turn token: supervising it teaches the model to stop
        step_spans.append((start, end))
    return TokenizedTrajectory(input_ids=list(ids), step_spans=step_spans, text=text)


def encode(trajectory: Trajectory, tokenizer, max_length: int | None = None,
           overflow: str = "drop_steps") -> Example:
    """Build the masked example of a trajectory: labels only on its selected steps.

    Args:
        trajectory: A trajectory whose steps carry ``selected`` flags.
        tokenizer: A fast tokenizer with a chat template.
        max_length: Longest sequence fed to the model (None: no limit).
        overflow: What to do with a selected step that ends past ``max_length``: ``drop_steps``
            leaves it out of the example and records it in ``Example.dropped_steps`` (never
            half a step); ``error`` raises.

    Raises:
        MaskingError: the example would have no supervised token, or a step overflows with
            ``overflow="error"``.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    tok = tokenize_steps(trajectory, tokenizer)
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

    end = max(tok.step_spans[k][1] for k in selected)
    input_ids = tok.input_ids[:end]
    labels = [IGNORE_INDEX] * end
    step_ids = [-1] * end
    for k in selected:
        a, b = tok.step_spans[k]
        labels[a:b] = input_ids[a:b]
        step_ids[a:b] = [k] * (b - a)
    return Example(trajectory_id=trajectory.id, input_ids=input_ids, labels=labels,
                   step_ids=step_ids, num_steps=trajectory.num_steps, selected_steps=selected,
                   dropped_steps=dropped)
