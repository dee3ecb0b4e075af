"""The oracle's prompt and the validation of its answers: the four ATLaS criteria, the
versioned prompt (``PROMPT_VERSION`` is part of every cache key and selection record), the
trajectory as the oracle reads it, and ``check_answer`` (schema, indices in range, unique, at
most ``m``), with the re-ask sent once after an invalid answer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Sequence

from pydantic import BaseModel, StrictInt, ValidationError

from atlas.data.trajectory import Trajectory

PROMPT_VERSION = "atlas-critical-v1"

CRITERIA: dict[str, str] = {
    "Plan Creation": "the agent sets sub-goals, drawn from earlier observations, that lead "
                     "toward the goal.",
    "Critical Observation": "the agent picks out key information from an observation that "
                            "shapes its strategy.",
    "Critical Action": "an action that significantly advances the task.",
    "Self Correction": "the agent reflects on an earlier failure or mistake and changes course.",
}
Criterion = Literal["Plan Creation", "Critical Observation", "Critical Action", "Self Correction"]


class CriticalStep(BaseModel):
    step: StrictInt  # not true or "1"
    criterion: Criterion
    reason: str


class OracleAnswer(BaseModel):
    """The structured answer every oracle gives (the JSON schema sent to the providers)."""

    plan: str
    subgoals: list[str]
    critical_steps: list[CriticalStep]


class InvalidAnswer(ValueError):
    """An oracle answer that does not parse or breaks the rules of the prompt."""


SYSTEM_PROMPT = """\
You are an expert annotator of agent trajectories. An agent solved a task by alternating \
between observations from its environment and its own steps (a thought and an action). \
Fine-tuning will use only the steps you mark, so mark the steps that matter most for the \
agent's success, judged by these criteria:
""" + "\n".join(f"- {name}: {text}" for name, text in CRITERIA.items()) + """

First summarise the trajectory's high-level plan and its sub-goals. Then choose the critical \
steps. Answer with JSON only, in this form:
{"plan": "<one paragraph>", "subgoals": ["<sub-goal>", ...],
 "critical_steps": [{"step": <step number>, "criterion": "<one of the four criteria>", \
"reason": "<one line>"}, ...]}"""


def render_trajectory(trajectory: Trajectory, candidates: Sequence[int]) -> str:
    """The trajectory as the oracle reads it: candidate steps numbered 0..N-1 in order.

    Steps that cannot be selected (scripted replies a source file marks untrainable) are shown
    without a number, so the oracle sees the whole context but can only name candidates.
    """
    number = {step: i for i, step in enumerate(candidates)}
    lines = []
    if trajectory.system:
        lines.append(f"[Instructions given to the agent]\n{trajectory.system}")
    if trajectory.tools:
        names = [t.get("function", t).get("name", "?") for t in trajectory.tools]
        lines.append(f"[Tools the agent can call]\n{', '.join(map(str, names))}")
    k, called = 0, {c.id: c.name for m in trajectory.messages for c in m.tool_calls if c.id}
    for i, m in enumerate(trajectory.messages):
        if m.role == "user":
            lines.append(f"[{'Task' if i == 0 else 'Observation'}]\n{m.content}")
        elif m.role == "tool":
            name = m.name or called.get(m.tool_call_id)
            lines.append(f"[Tool result{': ' + name if name else ''}]\n{m.content}")
        else:  # a step: its text and its calls, one <tool_call>{"name", "arguments"} per line
            label = f"Step {number[k]}" if k in number else "Agent (not selectable)"
            lines.append(f"[{label}]\n{m.as_text()}")
            k += 1
    return "\n\n".join(lines)


def prompt(trajectory: Trajectory, candidates: Sequence[int], m: int) -> tuple[str, str]:
    """(system, user) prompt asking for the plan and at most ``m`` critical steps."""
    n = len(candidates)
    user = (f"{render_trajectory(trajectory, candidates)}\n\n"
            f"The trajectory has {n} steps, numbered 0 to {n - 1}. Choose at most {m} critical "
            f"steps (step numbers, each once), each with its criterion and a one-line reason.")
    return SYSTEM_PROMPT, user


def extract_json(text: str) -> Any:
    """The JSON object in a model's text answer (bare, or inside a ```json fence)."""
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    candidate = fenced.group(1) if fenced else text[text.find("{"):text.rfind("}") + 1]
    try:
        return json.loads(candidate or text)
    except json.JSONDecodeError as e:
        raise InvalidAnswer(f"the answer is not JSON ({e}): {text[:200]!r}") from None


def check_answer(answer: Any, n: int, m: int) -> OracleAnswer:
    """Validate an oracle answer (text, dict or ``OracleAnswer``) for a trajectory of ``n``
    candidate steps and a budget of ``m``.

    Raises:
        InvalidAnswer: with a message the oracle can act on when asked again.
    """
    if isinstance(answer, str):
        answer = extract_json(answer)
    try:
        parsed = answer if isinstance(answer, OracleAnswer) else OracleAnswer.model_validate(answer)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidAnswer(f"the answer does not follow the schema: {errors}") from None
    steps = [s.step for s in parsed.critical_steps]
    bad = [s for s in steps if not 0 <= s < n]
    if bad:
        raise InvalidAnswer(f"step numbers {bad} are out of range: the trajectory has steps "
                            f"0 to {n - 1}")
    if len(set(steps)) != len(steps):
        raise InvalidAnswer(f"step numbers repeat: {steps}")
    if len(steps) > m:
        raise InvalidAnswer(f"{len(steps)} steps chosen, at most {m} allowed")
    return parsed


def reask(user: str, error: str) -> str:
    """The prompt asked again after an invalid answer: the same request plus what was wrong."""
    return (f"{user}\n\nA previous answer to this request was invalid: {error}\n"
            f"Answer again, following the instructions exactly.")
