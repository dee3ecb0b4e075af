"""The oracle: an LLM (or a set of rules) that reads a whole expert trajectory, states its plan
and marks its critical steps.

Everything an oracle answers goes through one path, whatever the provider:

    trajectory --prompt()--> (system, user) --provider--> Reply --check_answer()--> Judgement

- ``prompt()`` gives the four ATLaS criteria with their definitions and asks for the
  trajectory's high-level plan with sub-goals, then for at most ``m`` step indices, each with a
  criterion and a one-line reason. The prompt is versioned (``PROMPT_VERSION``); the version is
  part of every cache key and every selection record.
- ``check_answer()`` validates every answer (schema, indices in range, unique, at most ``m``).
  An invalid answer is asked again once, with the error; a second invalid answer makes the
  trajectory's judgement ``failed``, recorded with its error. Nothing is ever substituted.
- Answers are cached on disk (``JsonlCache``), one JSON line written as each arrives, keyed
  by (oracle, model, prompt version, the prompt itself, which holds the trajectory content and
  ``m``): an interrupted run resumes without paying twice.
- Requests run concurrently (``concurrency``) with the SDKs' own retries and backoff on
  429/5xx (they honour ``retry-after``); ``batch=true`` sends them through the OpenAI Batch API
  or Anthropic Message Batches instead (half price), results joined by ``custom_id``.

API keys come from the environment only (``api_key_env``); they are never part of a config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, StrictInt, ValidationError

from atlas.console import progress
from atlas.data.trajectory import Message, Trajectory
from atlas.utils import UserError

log = logging.getLogger(__name__)
# the SDKs' HTTP client logs every request at INFO; retries and failures still show as warnings
logging.getLogger("httpx2").setLevel(logging.WARNING)

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


class OracleError(UserError, RuntimeError):
    """A fault that stops the whole run (no key, wrong model, refused credentials)."""


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


@dataclass
class Reply:
    """One provider answer: the structured answer or its raw text, and the tokens it cost."""

    answer: Any
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Judgement:
    """An oracle's verdict on one trajectory (one line of the cache).

    Attributes:
        key: Cache key (see :meth:`Oracle.key`).
        trajectory_id: The trajectory judged.
        status: ``ok`` or ``failed`` (``error`` says why).
        steps: Chosen step indices of the trajectory (not the prompt's candidate numbers).
        criteria / reasons: Per chosen step (same order as ``steps``).
        input_tokens / output_tokens / cost_usd: Spent on this trajectory, re-asks included.
        attempts: Requests made (1, or 2 after an invalid answer).
        cached: Read from the cache in this run (nothing was paid this time).
        transient: Failed on transport (after the SDK's retries): not cached, asked again on
            the next run. Invalid answers are cached like any answer.
    """

    key: str
    trajectory_id: str
    oracle: str
    model: str
    prompt_version: str
    status: str = "ok"
    plan: str | None = None
    subgoals: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    criteria: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    error: str | None = None
    cached: bool = False
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        del d["cached"], d["transient"]
        return d


class JsonlCache:
    """Answers on disk (judgements, step scores): one JSON line appended and fsynced as each
    answer arrives.

    A run killed mid-write leaves at most a truncated last line: it is ignored on load, and the
    next write starts on a new line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._needs_newline = False
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable cache line ignored (an interrupted write?)",
                                self.path, lineno)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self._needs_newline else "") + json.dumps(entry, ensure_ascii=False)
                    + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._needs_newline = False
        self.entries[entry["key"]] = entry

    def lookup(self, keys: Sequence[str], compute) -> tuple[list[Any], int]:
        """Values for ``keys`` (``entry["value"]``), computing the missing ones at once with
        ``compute(missing keys)`` and caching each. Returns (values, how many were computed)."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                self.put({"key": key, "value": value})
        return [self.entries[k]["value"] for k in keys], len(missing)


def default_cache_dir(kind: str = "oracle") -> Path:
    """``$ATLAS_CACHE_DIR/<kind>`` (default ``~/.cache/atlas/<kind>``)."""
    from atlas.model import cache_dir

    return cache_dir() / kind


def public_url(url: str | None) -> str | None:
    """A URL fit to record: no user, password or query string."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class _Job:
    """One oracle request in flight: a prompt, every trajectory that shares it, what it cost."""

    key: str
    trajectory: Trajectory
    candidates: list[int]
    m: int
    system: str
    user: str
    indices: list[int] = field(default_factory=list)
    spent: dict[str, int] = field(default_factory=lambda: {
        "input_tokens": 0, "output_tokens": 0, "attempts": 0})
    error: str | None = None

    def request(self) -> tuple[str, str]:
        """The prompt to send now: the original, or the re-ask after an invalid answer."""
        return self.system, self.user if self.error is None else reask(self.user, self.error)


class Oracle:
    """Marks the critical steps of trajectories. Subclasses answer one prompt (:meth:`complete`)
    and, when their provider has one, a batch of prompts (:meth:`complete_batch`).

    Args:
        model: Model name sent to the provider (recorded in every judgement).
        concurrency: Requests in flight at once.
        batch: Use the provider's batch API (half price, hours of latency) instead of direct
            requests.
        price_input / price_output: USD per million tokens, for the cost report (estimates
            from the config, not the provider's bill).
        batch_discount: Price factor of batch requests.
        poll_interval: Seconds between batch status checks.
        cache_dir: Where ``<oracle>.jsonl`` caches live (None: ``$ATLAS_CACHE_DIR/oracle``).
        retry_failed: Ask again for trajectories whose cached judgement failed.
    """

    name = "oracle"
    cacheable = True
    prompt_version = PROMPT_VERSION
    #: consecutive rejected requests (HTTP 400) with no success before the run stops
    MAX_BAD_REQUESTS = 3

    def __init__(self, model: str, concurrency: int = 16, batch: bool = False,
                 price_input: float = 0.0, price_output: float = 0.0,
                 batch_discount: float = 0.5, poll_interval: float = 30.0,
                 cache_dir: str | None = None, retry_failed: bool = False):
        if concurrency < 1:
            raise ValueError(f"oracle.concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.concurrency = concurrency
        self.batch = batch
        self.price_input, self.price_output = price_input, price_output
        self.batch_discount = batch_discount
        self.poll_interval = poll_interval
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.retry_failed = retry_failed
        self.last_run: dict[str, Any] = {}
        self._client = None
        self._bad_requests = 0
        self._successes = 0

    # ---- identity ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Request settings that can change an answer (endpoint, sampling, limits)."""
        return {}

    def signature(self) -> dict[str, Any]:
        """What makes two judgements comparable: recorded with every selection and part of
        every cache key, so a dry run against a local server never passes for GPT-4o."""
        return {"oracle": self.name, "model": self.model, "prompt_version": self.prompt_version,
                **self.settings()}

    def key(self, system: str, user: str) -> str:
        payload = json.dumps([self.signature(), system, user], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        usd = (input_tokens * self.price_input + output_tokens * self.price_output) / 1e6
        return usd * (self.batch_discount if self.batch else 1.0)

    # ---- provider hooks ------------------------------------------------------------------
    def make_client(self) -> Any:
        """The provider's async SDK client."""
        raise NotImplementedError

    @property
    def client(self):
        if self._client is None:
            self._client = self.make_client()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            await self._client.close()
        self._client = None

    async def complete(self, system: str, user: str) -> Reply:
        """One request: the answer (object or text) and its token usage."""
        raise NotImplementedError

    async def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        """Submit prompts (custom_id -> (system, user)) to the provider's batch API; its id."""
        raise OracleError(f"oracle {self.name} has no batch API; set oracle.batch=false")

    async def collect_batch(self, batch_id: str) -> dict[str, Reply | str]:
        """Wait for a batch to end: custom_id -> Reply, or the error text of that request."""
        raise NotImplementedError

    def fatal(self, error: Exception) -> bool:
        """Errors that would fail every request alike (credentials, unknown model)."""
        return False

    def transient(self, error: Exception) -> bool:
        """Errors of one request (connection, timeout, HTTP status after the SDK's retries)."""
        return False

    def rejected(self, error: Exception) -> bool:
        """The provider refused the request itself (HTTP 400)."""
        return False

    # ---- judging -------------------------------------------------------------------------
    def judge(self, trajectories: Sequence[Trajectory], candidates: Sequence[Sequence[int]],
              budgets: Sequence[int]) -> list[Judgement]:
        """Judge every trajectory: at most ``budgets[i]`` of ``candidates[i]`` chosen.

        Cached judgements are reused; new ones are cached as they arrive. Trajectories with the
        same content are asked once. Prints a progress bar and the token and dollar totals.
        """
        if not len(trajectories) == len(candidates) == len(budgets):
            raise ValueError("judge() needs one candidate list and one budget per trajectory")
        return asyncio.run(self._judge_all(list(trajectories), list(candidates), list(budgets)))

    def _cache(self) -> JsonlCache | None:
        if not self.cacheable:
            return None
        return JsonlCache((self.cache_dir or default_cache_dir()) / f"{self.name}.jsonl")

    def _judgement(self, key: str, trajectory: Trajectory, **fields: Any) -> Judgement:
        return Judgement(key=key, trajectory_id=trajectory.id, oracle=self.name, model=self.model,
                         prompt_version=self.prompt_version, **fields)

    def _failure(self, job: _Job, error: str, transient: bool = False) -> Judgement:
        log.error("oracle %s failed on trajectory %s: %s", self.name, job.trajectory.id, error)
        return self._judgement(job.key, job.trajectory, status="failed", error=error,
                               transient=transient, cost_usd=self.cost(
                                   job.spent["input_tokens"], job.spent["output_tokens"]),
                               **job.spent)

    def _settle(self, job: _Job, reply: Reply) -> Judgement | None:
        """Account a reply; its judgement, or None (``job.error`` set) to ask again once."""
        for k, v in (("attempts", 1), ("input_tokens", reply.input_tokens),
                     ("output_tokens", reply.output_tokens)):
            job.spent[k] += v
        try:
            answer = check_answer(reply.answer, len(job.candidates), job.m)
        except InvalidAnswer as e:
            log.warning("oracle %s: invalid answer for trajectory %s (attempt %d): %s",
                        self.name, job.trajectory.id, job.spent["attempts"], e)
            if job.spent["attempts"] >= 2:
                return self._failure(job, f"invalid answer twice; last: {e}")
            job.error = str(e)
            return None
        self._successes += 1
        return self._judgement(
            job.key, job.trajectory, plan=answer.plan, subgoals=list(answer.subgoals),
            steps=[job.candidates[s.step] for s in answer.critical_steps],
            criteria=[s.criterion for s in answer.critical_steps],
            reasons=[s.reason for s in answer.critical_steps],
            cost_usd=self.cost(job.spent["input_tokens"], job.spent["output_tokens"]), **job.spent)

    def _request_failed(self, job: _Job, error: Exception) -> Judgement:
        """A request that raised: stop the run, or fail this trajectory (not cached)."""
        if self.fatal(error):
            raise OracleError(f"oracle {self.name} ({self.model}): {error}") from error
        if not self.transient(error):
            raise error  # a bug or a bad setting, not a fault of this one request
        if self.rejected(error):
            self._bad_requests += 1
            if self._bad_requests >= self.MAX_BAD_REQUESTS and not self._successes:
                raise OracleError(
                    f"oracle {self.name} ({self.model}): the provider rejected "
                    f"{self._bad_requests} requests and accepted none; check the oracle "
                    f"settings (model, response_format, max_tokens). Last: {error}") from error
        return self._failure(job, f"request failed: {type(error).__name__}: {error}",
                             transient=True)

    async def judge_one(self, job: _Job) -> Judgement:
        """Ask, validate, ask again once with the error, or record the failure."""
        while True:
            try:
                reply = await self.complete(*job.request())
            except Exception as e:  # noqa: BLE001 -- sorted by _request_failed
                return self._request_failed(job, e)
            judgement = self._settle(job, reply)
            if judgement is not None:
                return judgement

    def _batch_state(self) -> JsonlCache:
        """Submitted batches, so that a killed run collects them instead of paying again."""
        return JsonlCache((self.cache_dir or default_cache_dir()) / f"{self.name}.batches.jsonl")

    async def _judge_batch(self, jobs: list[_Job], finish) -> None:
        """Batch mode: one batch for all prompts, a second for the re-asks of invalid answers."""
        state = self._batch_state()
        todo = jobs
        for attempt in range(2):
            by_key = {job.key: job for job in todo}
            # a batch of this round submitted by a killed run: collect it rather than resubmit
            pending = [e for e in state.entries.values() if not e.get("done")
                       and e.get("attempt") == attempt and set(e["keys"]) <= set(by_key)]
            batches = [e["key"] for e in pending]
            covered = {k for e in pending for k in e["keys"]}
            rest = [job for job in todo if job.key not in covered]
            if rest:
                batch_id = await self.submit_batch({job.key: job.request() for job in rest})
                state.put({"key": batch_id, "attempt": attempt, "keys": [j.key for j in rest]})
                batches.append(batch_id)
            else:
                log.info("collecting %d batch(es) submitted by an earlier run", len(batches))
            replies: dict[str, Reply | str] = {}
            for batch_id in batches:
                got = await self.collect_batch(batch_id)
                replies.update({key: got.get(key, f"no result in batch {batch_id} (see the log)")
                                for key in state.entries[batch_id]["keys"]})
            retry = []
            for job in todo:
                reply = replies[job.key]
                if isinstance(reply, str):
                    finish(job, self._failure(job, f"batch request failed: {reply}",
                                              transient=True))
                elif (judgement := self._settle(job, reply)) is not None:
                    finish(job, judgement)
                else:
                    retry.append(job)
            for batch_id in batches:
                state.put({**state.entries[batch_id], "done": True})
            todo = retry
            if not todo:
                return

    async def _judge_all(self, trajectories: list[Trajectory], candidates: list[list[int]],
                         budgets: list[int]) -> list[Judgement]:
        t0 = time.time()
        cache = self._cache()
        results: list[Judgement | None] = [None] * len(trajectories)
        jobs: dict[str, _Job] = {}
        for i, (t, c, m) in enumerate(zip(trajectories, candidates, budgets)):
            system, user = prompt(t, c, m)
            key = self.key(system, user)
            entry = cache.get(key) if cache else None
            if entry and (entry["status"] == "ok" or not self.retry_failed):
                fields = {k: v for k, v in entry.items() if k in Judgement.__dataclass_fields__}
                results[i] = dataclasses.replace(Judgement(**fields), trajectory_id=t.id,
                                                 cached=True)
            elif key in jobs:  # same content as an earlier trajectory: asked once
                jobs[key].indices.append(i)
            else:
                jobs[key] = _Job(key, t, list(c), m, system, user, indices=[i])
        bar = progress(total=len(trajectories), initial=len(trajectories) - sum(
            len(j.indices) for j in jobs.values()), desc=f"oracle {self.name}",
            unit="trajectory")

        def finish(job: _Job, judgement: Judgement) -> None:
            if cache is not None and not judgement.transient:
                cache.put(judgement.to_json())
            for n, i in enumerate(job.indices):
                # the first holds what was paid; copies for the same content cost nothing more
                results[i] = dataclasses.replace(judgement, trajectory_id=trajectories[i].id,
                                                 **({} if n == 0 else {"cached": True}))
            bar.update(len(job.indices))

        try:
            if jobs and self.batch:
                await self._judge_batch(list(jobs.values()), finish)
            elif jobs:
                semaphore = asyncio.Semaphore(self.concurrency)

                async def one(job: _Job) -> None:
                    async with semaphore:
                        judgement = await self.judge_one(job)
                    finish(job, judgement)

                await asyncio.gather(*(one(job) for job in jobs.values()))
        finally:
            bar.close()
            await self.aclose()
        assert all(r is not None for r in results), "a trajectory was left without a judgement"
        self.last_run = self._report(results, time.time() - t0)
        return results

    def _report(self, judgements: list[Judgement], seconds: float) -> dict[str, Any]:
        new = [j for j in judgements if not j.cached]
        run = {
            "oracle": self.name, "model": self.model, "prompt_version": self.prompt_version,
            "trajectories": len(judgements), "from_cache": len(judgements) - len(new),
            "requests": sum(j.attempts for j in new),
            "failed": sum(not j.ok for j in judgements),
            "input_tokens": sum(j.input_tokens for j in new),
            "output_tokens": sum(j.output_tokens for j in new),
            "cost_usd": round(sum(j.cost_usd for j in new), 6),
            "seconds": round(seconds, 2),
        }
        if self.cacheable:
            log.info("oracle %s (%s): %d trajectories, %d from cache, %d requests; %d input + %d "
                     "output tokens, $%.4f this run%s; %d failed", self.name, self.model,
                     run["trajectories"], run["from_cache"], run["requests"], run["input_tokens"],
                     run["output_tokens"], run["cost_usd"],
                     " (batch prices)" if self.batch else "", run["failed"])
        return run


# ---- providers ---------------------------------------------------------------------------------


def api_key(env_var: str, oracle: str, required: bool = True) -> str | None:
    key = os.environ.get(env_var)
    if not key and required:
        raise OracleError(f"the {oracle} oracle needs an API key in the environment variable "
                          f"{env_var} (keys are never read from configs or the command line)")
    return key


class APIOracle(Oracle):
    """An oracle behind a provider SDK (``openai`` or ``anthropic``): key from the environment,
    the SDK's retries with backoff (``retry-after`` honoured) on connection errors, 408, 409,
    429 and 5xx, and its exception classes sorted into fatal / per-request.

    Args:
        base_url: API base URL (None: the SDK default).
        api_key_env: Environment variable holding the key.
        max_tokens: Answer token limit.
        timeout: Seconds per request before the SDK retries it.
        max_retries: SDK retries.
    """

    sdk = ""
    key_required = True

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "",
                 max_tokens: int = 2048, timeout: float = 120.0, max_retries: int = 5, **kw):
        super().__init__(model, **kw)
        self.base_url, self.api_key_env, self.max_tokens = base_url, api_key_env, max_tokens
        self.timeout, self.max_retries = timeout, max_retries
        api_key(api_key_env, self.name, self.key_required)  # fail before any work

    def settings(self) -> dict[str, Any]:
        return {"base_url": self.endpoint(), "max_tokens": self.max_tokens}

    def endpoint(self) -> str:
        """The URL the SDK client actually talks to: ``oracle.base_url``, else what the SDK
        reads from its own environment variable (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``),
        else the provider's default; without credentials or query string."""
        return public_url(str(self.client.base_url)).rstrip("/")

    def _sdk(self):
        return importlib.import_module(self.sdk)

    def fatal(self, error: Exception) -> bool:
        sdk = self._sdk()
        return isinstance(error, (sdk.AuthenticationError, sdk.PermissionDeniedError,
                                  sdk.NotFoundError))

    def transient(self, error: Exception) -> bool:
        return isinstance(error, self._sdk().APIError)

    def rejected(self, error: Exception) -> bool:
        return isinstance(error, self._sdk().BadRequestError)


class OpenAIOracle(APIOracle):
    """OpenAI chat models (GPT-4o by default) with structured outputs
    (``client.chat.completions.parse`` with the ``OracleAnswer`` schema).

    Args:
        temperature: Sampling temperature (0: the most reproducible annotations).
        Others: see :class:`APIOracle`.
    """

    name = "openai"
    sdk = "openai"

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0, **kw):
        super().__init__(model, base_url=base_url, api_key_env=api_key_env, **kw)
        self.temperature = temperature

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.temperature}

    def make_client(self):
        import openai

        return openai.AsyncOpenAI(
            api_key=api_key(self.api_key_env, self.name, self.key_required) or "EMPTY",
            base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries)

    def messages(self, system: str, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def body(self, system: str, user: str) -> dict[str, Any]:
        """The chat request as one line of a batch (what ``.parse`` sends directly)."""
        from openai.lib._parsing._completions import type_to_response_format_param

        return {"model": self.model, "messages": self.messages(system, user),
                "temperature": self.temperature, "max_completion_tokens": self.max_tokens,
                "response_format": type_to_response_format_param(OracleAnswer)}

    async def complete(self, system: str, user: str) -> Reply:
        raw = await self.client.chat.completions.with_raw_response.parse(
            model=self.model, messages=self.messages(system, user), response_format=OracleAnswer,
            temperature=self.temperature, max_completion_tokens=self.max_tokens)
        body = raw.http_response.json()
        usage = body.get("usage") or {}
        tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        try:
            message = raw.parse().choices[0].message
            answer = message.parsed if message.parsed is not None else (message.refusal or "")
        except (ValidationError, ValueError) as e:
            # the SDK's own schema check (pydantic) or a length/content-filter stop: the raw
            # text is validated by check_answer, which says what is wrong with it
            answer = _openai_text(body) or f"<unparsable: {e}>"
        return Reply(answer, *tokens)

    async def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        lines = [json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                             "body": self.body(*p)}) for key, p in requests.items()]
        upload = await self.client.files.create(
            file=("oracle_batch.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = await self.client.batches.create(input_file_id=upload.id,
                                                 endpoint="/v1/chat/completions",
                                                 completion_window="24h")
        log.info("OpenAI batch %s submitted (%d requests)", batch.id, len(lines))
        return batch.id

    async def collect_batch(self, batch_id: str) -> dict[str, Reply | str]:
        batch = await self.client.batches.retrieve(batch_id)
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            log.info("OpenAI batch %s: %s; next check in %.0f s", batch_id, batch.status,
                     self.poll_interval)
            await asyncio.sleep(self.poll_interval)
            batch = await self.client.batches.retrieve(batch_id)
        out: dict[str, Reply | str] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                response = rec.get("response") or {}
                if rec.get("error") or response.get("status_code") != 200:
                    out[rec["custom_id"]] = json.dumps(rec.get("error") or response.get("body"))
                    continue
                body = response["body"]
                usage = body.get("usage") or {}
                out[rec["custom_id"]] = Reply(_openai_text(body), usage.get("prompt_tokens", 0),
                                              usage.get("completion_tokens", 0))
        if batch.status != "completed":
            errors = getattr(batch, "errors", None)
            detail = "; ".join(f"{e.code}: {e.message}" for e in (errors.data or [])) \
                if errors and getattr(errors, "data", None) else "no details"
            log.error("OpenAI batch %s ended %s (%s); %d results", batch_id, batch.status,
                      detail, len(out))
        return out


def _openai_text(body: dict) -> str:
    try:
        return body["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


class OpenAICompatibleOracle(OpenAIOracle):
    """Any server with an OpenAI-style chat API: vLLM, llama.cpp's server, Ollama, LM Studio.

    Servers differ in how they constrain JSON, so ``response_format`` picks the request form:
    ``json_schema`` (vLLM, llama.cpp server, Ollama), ``json_object`` (``{"type":
    "json_object", "schema": ...}``, what llama-cpp-python accepts) or ``none`` (plain text; the
    JSON is taken out of the answer). The key is optional and has its own variable
    (``OPENAI_COMPATIBLE_API_KEY``), so an OpenAI key is never sent to another server.
    """

    name = "openai_compatible"
    key_required = False

    def __init__(self, base_url: str, model: str, response_format: str = "json_schema",
                 api_key_env: str = "OPENAI_COMPATIBLE_API_KEY", **kw):
        if not base_url:
            raise ValueError("oracle.base_url is required, e.g. http://localhost:8000/v1")
        if response_format not in ("json_schema", "json_object", "none"):
            raise ValueError(f"oracle.response_format must be json_schema, json_object or none, "
                             f"got {response_format!r}")
        if kw.get("batch"):
            raise OracleError("openai_compatible servers have no Batch API; set oracle.batch=false")
        super().__init__(model=model, base_url=base_url, api_key_env=api_key_env, **kw)
        self.response_format = response_format

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "response_format": self.response_format}

    def body(self, system: str, user: str) -> dict[str, Any]:
        body = {"model": self.model, "messages": self.messages(system, user),
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        schema = OracleAnswer.model_json_schema()
        if self.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "oracle_answer", "schema": schema}}
        elif self.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        return body

    async def complete(self, system: str, user: str) -> Reply:
        resp = await self.client.chat.completions.create(**self.body(system, user))
        usage = resp.usage
        return Reply(resp.choices[0].message.content or "",
                     usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)


class AnthropicOracle(APIOracle):
    """Claude through forced tool use: the answer is the input of a ``record_critical_steps``
    tool whose schema is ``OracleAnswer`` (``tool_choice`` forces the call).

    The SDK's ``messages.create`` takes no ``temperature``; Claude's default sampling is used.
    Arguments: see :class:`APIOracle` (Anthropic also retries 529 "overloaded").
    """

    name = "anthropic"
    sdk = "anthropic"
    TOOL = "record_critical_steps"

    def __init__(self, model: str = "claude-sonnet-4-5", base_url: str | None = None,
                 api_key_env: str = "ANTHROPIC_API_KEY", **kw):
        super().__init__(model, base_url=base_url, api_key_env=api_key_env, **kw)

    def make_client(self):
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=api_key(self.api_key_env, self.name), base_url=self.base_url,
            timeout=self.timeout, max_retries=self.max_retries)

    def params(self, system: str, user: str) -> dict[str, Any]:
        return {
            "model": self.model, "max_tokens": self.max_tokens, "system": system,
            "messages": [{"role": "user", "content": user}],
            "tools": [{"name": self.TOOL, "description": "Record the trajectory's plan and its "
                       "critical steps.", "input_schema": OracleAnswer.model_json_schema()}],
            "tool_choice": {"type": "tool", "name": self.TOOL},
        }

    @classmethod
    def _answer(cls, message: Any) -> Any:
        for block in message.content:
            if block.type == "tool_use" and block.name == cls.TOOL:
                return block.input
        # no tool call: the text is validated (and rejected, or parsed) like any text answer
        return "".join(getattr(b, "text", "") or "" for b in message.content)

    async def complete(self, system: str, user: str) -> Reply:
        message = await self.client.messages.create(**self.params(system, user))
        return Reply(self._answer(message), message.usage.input_tokens,
                     message.usage.output_tokens)

    async def submit_batch(self, requests: dict[str, tuple[str, str]]) -> str:
        batch = await self.client.messages.batches.create(
            requests=[{"custom_id": key, "params": self.params(*p)} for key, p in requests.items()])
        log.info("Anthropic message batch %s submitted (%d requests)", batch.id, len(requests))
        return batch.id

    async def collect_batch(self, batch_id: str) -> dict[str, Reply | str]:
        batch = await self.client.messages.batches.retrieve(batch_id)
        while batch.processing_status != "ended":
            log.info("Anthropic message batch %s: %s; next check in %.0f s", batch_id,
                     batch.processing_status, self.poll_interval)
            await asyncio.sleep(self.poll_interval)
            batch = await self.client.messages.batches.retrieve(batch_id)
        out: dict[str, Reply | str] = {}
        async for entry in await self.client.messages.batches.results(batch_id):
            result = entry.result
            if result.type == "succeeded":
                m = result.message
                out[entry.custom_id] = Reply(self._answer(m), m.usage.input_tokens,
                                             m.usage.output_tokens)
            else:
                out[entry.custom_id] = f"{result.type}: {getattr(result, 'error', '')}"
        return out


class HFOracle(Oracle):
    """A local transformers model as the oracle (greedy decoding, JSON read out of its text).

    Args:
        model: Hub id, local directory or ``embedded:<key>`` (see :mod:`atlas.model`).
        config: Build a randomly initialised model from this config instead (tests).
        tokenizer: Tokenizer name or directory (None: the model's).
        max_new_tokens: Answer token limit.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: Parameter dtype (``float32`` on CPUs).
    """

    name = "hf"

    def __init__(self, model: str | None = None, config: dict | None = None,
                 tokenizer: str | None = None, max_new_tokens: int = 1024, device: str = "auto",
                 dtype: str = "float32", **kw):
        kw["concurrency"] = 1  # one generate at a time on one device
        if kw.get("batch"):
            raise OracleError("the hf oracle has no batch API; set oracle.batch=false")
        super().__init__(model or f"config:{json.dumps(dict(config or {}), sort_keys=True)}", **kw)
        self.model_name, self.config, self.tokenizer_name = model, config, tokenizer
        self.max_new_tokens, self.device, self.dtype = max_new_tokens, device, dtype
        self._lm = self._tok = None
        # a random model (config) is different every time: nothing worth caching
        self.cacheable = config is None

    def settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "dtype": self.dtype}

    def _load(self):
        if self._lm is None:
            from atlas.model import load_model, load_tokenizer, resolve_device

            self._tok = load_tokenizer(self.tokenizer_name or self.model_name)
            self._lm = load_model(self.model_name, config=self.config, dtype=self.dtype).eval()
            self._lm.to(resolve_device(self.device))
        return self._lm, self._tok

    def _generate(self, system: str, user: str) -> Reply:
        import torch

        lm, tok = self._load()
        chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"].to(lm.device)
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return Reply(text, ids.shape[1], out.shape[1] - ids.shape[1])

    async def complete(self, system: str, user: str) -> Reply:
        return await asyncio.to_thread(self._generate, system, user)


# ---- rules -------------------------------------------------------------------------------------

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
