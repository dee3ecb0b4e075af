"""Deterministic rules for the four criteria: the offline default oracle (no key, no cost).
"""

from __future__ import annotations

import itertools
import json
import re

from atlas.data.trajectory import Message, Trajectory
from atlas.oracle.engine import Judgement, Oracle, _Job

_WORD = re.compile(r"[a-z][a-z0-9]{2,}")
_STOP = frozenset("""the and you your are for with that this there then than have has was were
will what which when where who how not but all any can one two its into from out about just
now also more some such only very each other see seen look here them they their it's i'm
thought action observation step steps task goal""".split())
_PLAN = [re.compile(p, re.I) for p in (
    r"\bplan\b", r"\bsub-?goals?\b", r"\bfirst\b", r"\bthen\b", r"(?:^|\s)\d\.\s",
    r"\border\b", r"\bstrategy\b", r"\bneed to\b", r"\bin order\b")]
_CORRECTION = re.compile(
    r"\bmistake\b|\bwrong\b|did ?n[o']t work|\bwasted\b|\bcorrect(?:ing|ion)?\b|\bback to the "
    r"plan\b|\binstead\b|\btry again\b|\bfailed\b|\bwas not (?:possible|available|valid)\b|"
    r"\bdid not (?:help|serve)\b|\btry a different\b|\b(?:did ?n[o']t|could ?n[o']t) find\b|"
    r"\balternative\b", re.I)
_FAILURE = re.compile(
    r"no known action|unknown action|not sure what you mean|nothing happens|can'?t|cannot|"
    r"invalid|not (?:possible|valid|available|found|recogni[sz]ed)|there is no|you don'?t|"
    r"error|not a valid", re.I)
_EFFECT_VERBS = re.compile(
    r"^\s*(take|pick|put|place|open|close|toggle|focus|move|use|mix|connect|cook|slice|chop|"
    r"buy|click|finish|submit|answer|guess|drop|eat|heat|cool|clean|wear|unlock|activate|"
    r"pour|read|lookup|search)\b", re.I)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _thought_action(message: Message) -> tuple[str, str]:
    """A step's thought and action: its text, or (for a step that calls tools) its text and
    its calls."""
    content = message.content
    if message.tool_calls:  # "pick_up {}" reads as "pick up", move(direction=north) as "move north"
        calls = "; ".join(" ".join([c.name.replace("_", " ")] + [
            v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in c.args.values()])
            for c in message.tool_calls)
        return re.sub(r"^\s*Thought\s*:\s*", "", content).strip(), calls
    m = re.search(r"Action\s*:\s*(.*)", content, re.S)
    action = m.group(1).strip() if m else ""
    thought = content[:m.start()] if m else content
    return re.sub(r"^\s*Thought\s*:\s*", "", thought).strip(), action


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


class HeuristicOracle(Oracle):
    """Deterministic rules for the four criteria: the offline default oracle (no key, no cost).

    Each candidate step gets a score per criterion, read off the text of the trajectory:

    - Plan Creation: the thought states a plan (plan words, "first ... then", numbered
      sub-goals) with cues that are rare in the trajectory, so boilerplate repeated at every
      step ("Current subgoal: ...") does not count; the first step gets a bonus.
    - Critical Observation: the thought or action uses words that first appeared in the
      observation just before it (new information picked out and acted on).
    - Critical Action: the action's verb changes the world (take, open, put, focus, guess,
      finish, ...) and the next observation is new; the last step, which ends the episode,
      gets a bonus. An action the environment rejects scores nothing.
    - Self Correction: the thought names an earlier failure ("did not work", "was a
      mistake"), more so right after an observation that reports a failure.

    A step that the next thought calls a mistake scores nothing under every criterion. The
    ``m`` highest-scoring steps are chosen (ties: the earlier step), each with its best
    criterion and a reason quoting the evidence. Useful as a free, reproducible stand-in for an
    LLM oracle and as a baseline against one; it knows nothing of the task's semantics.
    """

    name = "heuristic"
    cacheable = False
    prompt_version = "heuristic-v1"

    def __init__(self, **kw):
        kw.pop("model", None)
        super().__init__(model="rules", **kw)

    def scores(self, trajectory: Trajectory) -> list[dict[str, tuple[float, str]]]:
        """Per step (all steps of the trajectory): criterion -> (score, reason)."""
        turns = []  # (observation before, thought, action, observation after)
        seen_before: list[set[str]] = []
        text_so_far = _words(trajectory.system or "")
        last_user = ""
        msgs = trajectory.messages
        for i, m in enumerate(msgs):
            if m.role != "assistant":  # the task, an observation or a tool's result
                if msgs[i - 1].role != "tool" or m.role != "tool":
                    seen_before.append(set(text_so_far))
                    last_user = ""
                last_user = (last_user + "\n" + m.content).strip()
                text_so_far |= _words(m.content)
                continue
            results = [x.content for x in itertools.takewhile(lambda x: x.role == "tool",
                                                               msgs[i + 1:])]
            nxt = "\n".join(results) if results else next(  # a call's results, or the next turn
                (x.content for x in msgs[i + 1:] if x.role == "user"),
                trajectory.meta.get("final_observation") or "")
            thought, action = _thought_action(m)
            turns.append((last_user, thought, action, nxt,
                          seen_before[-1] if seen_before else set()))
            text_so_far |= _words(f"{thought} {action}" if m.tool_calls else m.content)
        n = len(turns)
        plan_hits = [[bool(p.search(t[1])) for p in _PLAN] for t in turns]
        common = [sum(h[j] for h in plan_hits) > max(1, n // 2) for j in range(len(_PLAN))]
        corrects = [bool(_CORRECTION.search(t[1])) for t in turns]
        seen_obs: set[str] = set()
        out = []
        for i, (before, thought, action, after, known) in enumerate(turns):
            s: dict[str, tuple[float, str]] = {}
            rare = sum(hit and not common[j] for j, hit in enumerate(plan_hits[i]))
            s["Plan Creation"] = (rare + (1.0 if i == 0 and rare else 0.0),
                                  f"states the plan: {_snippet(thought)!r}")
            new = sorted((_words(thought + " " + action) & _words(before)) - known)
            s["Critical Observation"] = (min(2.0, 0.4 * len(new)),
                                         f"acts on new information from the observation: "
                                         f"{', '.join(new[:5])}")
            rejected = bool(_FAILURE.search(after))
            after_words = _words(after)
            novelty = len(after_words - seen_obs) / max(1, len(after_words))
            effect = 0.0 if rejected else (0.8 * novelty + (0.7 if _EFFECT_VERBS.search(action)
                                                            else 0.0)
                                           + (1.5 if i == n - 1 else 0.0))
            s["Critical Action"] = (effect, "its final action completes the task"
                                    if i == n - 1 else f"{action!r} changes the state: "
                                                       f"{_snippet(after, 60)!r}")
            prev_failed = i > 0 and bool(_FAILURE.search(before))
            s["Self Correction"] = ((2.0 + prev_failed) if corrects[i] and i > 0 else 0.0,
                                    f"recovers from the previous step: {_snippet(thought)!r}")
            if i + 1 < n and corrects[i + 1]:  # the agent itself calls this step a mistake
                s = {k: (0.0, r) for k, (_, r) in s.items()}
            seen_obs |= after_words
            out.append(s)
        return out

    def plan(self, trajectory: Trajectory) -> tuple[str, list[str]]:
        thoughts = [_thought_action(m)[0] for m in trajectory.messages
                    if m.role == "assistant"]
        text = next((t for t in thoughts if re.search(r"\bplan\b", t, re.I)), thoughts[0])
        m = re.search(r"\bplan\b[^:]*:\s*(.*)", text, re.I | re.S)
        body = (m.group(1) if m else text).strip()
        subgoals = [g.strip(" .;") for g in re.split(r"\s*(?:\d\.\s|;|,? then\b)\s*", body)
                    if len(g.strip(" .;")) > 2]
        return _snippet(body, 300), subgoals[:8]

    async def judge_one(self, job: _Job) -> Judgement:
        scores = self.scores(job.trajectory)
        best = {step: max(scores[step].items(), key=lambda kv: kv[1][0])
                for step in job.candidates}
        ranked = sorted(job.candidates, key=lambda step: (-best[step][1][0], step))[:job.m]
        plan, subgoals = self.plan(job.trajectory)
        return self._judgement(job.key, job.trajectory, plan=plan, subgoals=subgoals, steps=ranked,
                               criteria=[best[s][0] for s in ranked],
                               reasons=[best[s][1][1] for s in ranked], attempts=0)
