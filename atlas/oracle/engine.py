"""The request engine every oracle shares: cache lookups, concurrent requests, one re-ask after
an invalid answer, batches, cost and progress reporting (:class:`Oracle`), and the verdict it
records per trajectory (:class:`Judgement`). Providers subclass :class:`Oracle` and answer one
prompt (:meth:`Oracle.complete`) or a batch (:meth:`Oracle.complete_batch`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from atlas.console import progress
from atlas.data.trajectory import Trajectory
from atlas.oracle import cache
from atlas.oracle.cache import JsonlCache
from atlas.oracle.prompts import InvalidAnswer, PROMPT_VERSION, check_answer, prompt, reask
from atlas.utils import UserError

log = logging.getLogger(__name__)


class OracleError(UserError, RuntimeError):
    """A fault that stops the whole run (no key, wrong model, refused credentials)."""


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
        return JsonlCache((self.cache_dir or cache.default_cache_dir()) / f"{self.name}.jsonl")

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
        root = self.cache_dir or cache.default_cache_dir()
        return JsonlCache(Path(root) / f"{self.name}.batches.jsonl")

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
