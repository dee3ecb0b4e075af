"""A loopback fake of the OpenAI and Anthropic HTTP APIs, for tests, ``bench/`` and dry runs.

The oracle clients (``atlas/oracle/``) talk to real providers through the official SDKs. Those
SDKs now ship their own HTTP stack (``httpx2``), which ``respx`` cannot intercept, so instead of
mocking the transport we run a tiny real HTTP server on ``127.0.0.1`` that speaks both wire
formats well enough for the pinned SDKs (openai==3.51.0, anthropic==2.10.0) to parse every
response into their typed models:

* OpenAI:    ``POST /v1/chat/completions``, ``POST /v1/files`` (multipart), ``GET|DELETE
  /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``.
* Anthropic: ``POST /v1/messages``, ``POST /v1/messages/batches``, ``GET
  /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results``.

It answers the ATLaS oracle prompt: the prompt must contain ``The trajectory has N steps`` and
``at most M``; the answer is a ``{"plan", "subgoals", "critical_steps"}`` dict built by
``answer(n, m, prompt_text)`` (default: :func:`default_answer`). Faults (HTTP errors with headers,
delays, malformed content, custom answers) can be scripted per completion request with
:meth:`FakeProvider.script`, and per batch line with :attr:`FakeProvider.batch_overrides`.

It needs no API key and no network (any non-empty key is accepted, e.g. ``"sk-test-dummy-0000"``),
so it also backs dry runs of the whole oracle pipeline::

    with FakeProvider(latency=0.05) as fake:
        client = openai.OpenAI(api_key="sk-test-dummy-0000", base_url=fake.url + "/v1")
        anthropic_client = anthropic.Anthropic(api_key="sk-test-dummy-0000", base_url=fake.url)

Stdlib only (``http.server.ThreadingHTTPServer`` in a daemon thread; one thread per connection,
so concurrent requests really are served concurrently).

SDK quirks found while building this against openai==3.51.0 / anthropic==2.10.0
-------------------------------------------------------------------------------------------
* Both SDKs retry 408, 409, 429 and >=500 (so 529 too) up to ``max_retries`` (default 2) and
  honour ``retry-after-ms`` / ``retry-after`` (float seconds, 0 < x <= 120) as the exact sleep;
  without it they back off 0.5 s * 2**n with jitter. ``x-should-retry: true|false`` overrides.
  A 400 is never retried.
* Exceptions: 400 -> ``BadRequestError``, 401 -> ``AuthenticationError``, 404 ->
  ``NotFoundError``, 429 -> ``RateLimitError``, 500 -> ``InternalServerError`` (both SDKs);
  Anthropic 529 -> ``anthropic.OverloadedError`` (a subclass of ``anthropic.InternalServerError``).
  A client timeout with ``max_retries=0`` raises ``APITimeoutError`` (a subclass of
  ``APIConnectionError``, not of ``APIStatusError``) in both SDKs.
* anthropic==2.10.0 sends the API key as ``Authorization: Bearer <key>``, NOT ``x-api-key``
  (plus ``anthropic-version: 2026-10-21``); the server accepts either header.
* ``openai ... chat.completions.parse(response_format=Model)`` validates the content with
  ``Model.model_validate_json``; content that is not valid JSON (or does not fit the model)
  raises ``pydantic.ValidationError`` out of ``.parse`` itself (it is not wrapped in an
  ``openai`` exception and is not retried). ``anthropic ... messages.parse(output_format=Model)``
  sends ``output_config={"format": {"type": "json_schema", "schema": ...}}`` and also raises
  ``pydantic.ValidationError`` on malformed text.
* ``openai.files.create`` sends multipart/form-data (fields ``purpose`` and ``file``);
  ``files.content`` sends ``Accept: application/binary`` and returns raw bytes (``.text``).
* ``Batch`` needs ``id, completion_window, created_at, endpoint, input_file_id, object="batch",
  status``; ``request_counts`` needs ``completed, failed, total``. ``FileObject`` needs ``id,
  bytes, created_at, filename, object="file", purpose, status``.
* ``anthropic.messages.batches.results(id)`` first calls ``retrieve(id)`` itself (so it counts as
  a poll here) and raises ``AnthropicError`` unless ``results_url`` is set; it then GETs
  ``results_url`` verbatim (an absolute URL is used as is). ``MessageBatch`` needs ``created_at``
  and ``expires_at`` (ISO datetimes), ``processing_status``, ``type="message_batch"`` and
  ``request_counts`` with ``processing, succeeded, errored, canceled, expired``.
* Anthropic error bodies are ``{"type": "error", "error": {"type", "message"}}``; the SDK picks a
  finer exception class from ``error.details.error_code`` when present (we never send it).

Size: two providers' wire formats (chat completions, messages, files and batches) with their
fault scripting; a test double, not product code.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeProvider", "default_answer", "CRITERIA"]

CRITERIA = ("Plan Creation", "Critical Observation", "Critical Action", "Self Correction")
_N_RE = re.compile(r"The trajectory has (\d+) steps")
_M_RE = re.compile(r"at most (\d+)")
_SECRET_HEADERS = {"authorization", "x-api-key", "api-key", "proxy-authorization"}

# OpenAI error "type"/"code" and Anthropic error "type" for common statuses.
_OPENAI_ERRORS = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None), 404: ("invalid_request_error", "not_found"),
    408: ("timeout", None), 409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", None), 429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
    529: "overloaded_error",
}


def default_answer(n: int, m: int, prompt_text: str = "") -> dict:
    """The oracle's answer for an ``n``-step trajectory and a budget of ``m`` critical steps:
    ``min(m, n)`` distinct steps, every ``n // k``-th starting at 0 (``"Plan Creation"``)."""
    k = max(0, min(m, n))
    stride = n // k if k else 0
    steps = []
    for j in range(k):
        i = j * stride
        criterion = CRITERIA[0] if i == 0 else CRITERIA[1 + (j - 1) % 3]
        steps.append({"step": i, "criterion": criterion,
                      "reason": f"step {i} is a {criterion.lower()} on the way to the goal"})
    return {
        "plan": f"Work through the {n}-step task: understand the goal, act, verify the result.",
        "subgoals": ["understand the goal and the environment", "take the key actions",
                     "check that the goal is reached"],
        "critical_steps": steps,
    }


class _PromptError(ValueError):
    pass


def _text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or a list of blocks (``{"type":"text",...}``,
    Anthropic ``tool_result`` blocks with nested content)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    parts = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif "content" in block:
                    parts.append(_text_of(block["content"]))
    return "\n".join(p for p in parts if p)


def _prompt_text(body: dict) -> str:
    parts = [_text_of(body.get("system"))]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            parts.append(_text_of(message.get("content")))
    return "\n".join(p for p in parts if p)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class FakeProvider:
    """A loopback OpenAI + Anthropic server (see the module docstring).

    Args:
        latency: seconds every completion request (chat.completions / messages, not batch or
            file endpoints) sleeps before answering.
        answer: ``answer(n, m, prompt_text) -> dict``, the structured answer; default
            :func:`default_answer`.
        batch_polls: how many ``retrieve`` calls of a batch report it unfinished
            (``in_progress``) before it reports ``completed``/``ended``.
        hold_until: completion requests wait until this many are waiting at once, then all go
            on (later ones are not held): a client's concurrency checked with no timing
            assumption. 0: no hold.
        hold_timeout: seconds a held request waits at most (then goes on; the check fails).

    Attributes:
        url: ``"http://127.0.0.1:PORT"`` once started (OpenAI: ``base_url=url + "/v1"``;
            Anthropic: ``base_url=url``).
        requests: every request received, in order: ``{"method", "path" (no query string),
            "query" (dict of lists), "headers" (lowercased keys, secrets replaced by "***"),
            "body" (parsed JSON, else text, else bytes; None when empty), "time" (monotonic
            arrival)}``.
        max_in_flight: the most requests served at once (to check a client's concurrency).
        batch_overrides: ``custom_id -> fault-like dict`` applied to batch lines:
            ``{"answer": {...}}``, ``{"content": "raw text"}`` or ``{"status": 400}`` (an
            errored line). Not consumed.
    """

    def __init__(self, latency: float = 0.0,
                 answer: Callable[[int, int, str], dict] | None = None,
                 batch_polls: int = 1, hold_until: int = 0, hold_timeout: float = 60.0) -> None:
        self.latency = latency
        self.hold_until, self.hold_timeout = hold_until, hold_timeout
        self._held = 0
        self._release = threading.Event()
        self.answer = answer or default_answer
        self.batch_polls = batch_polls
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests served at once (concurrency limits)
        self.batch_overrides: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.url = ""
        self._lock = threading.RLock()  # batch finishing re-enters it via _add_file
        self._faults: deque[dict] = deque()
        self._files: dict[str, dict] = {}
        self._batches: dict[str, dict] = {}
        self._msg_batches: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "FakeProvider":
        if self._server is not None:
            return self
        provider = self

        class Handler(_Handler):
            fake = provider

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise outlive the server
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- scripting
    def script(self, *faults: dict) -> None:
        """Queue faults, consumed FIFO, one per completion request. Keys (combinable):
        ``status`` (+ optional ``message``) -> provider-format error; ``headers`` -> extra
        response headers; ``delay`` -> sleep first; ``content`` -> raw text instead of the
        answer; ``answer`` -> this dict as the structured answer."""
        with self._lock:
            self._faults.extend(dict(f) for f in faults)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def count(self, path_prefix: str) -> int:
        """Number of recorded requests whose path starts with ``path_prefix``."""
        with self._lock:
            return sum(1 for r in self.requests if r["path"].startswith(path_prefix))

    # ----------------------------------------------------------------- internals
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):04d}{uuid.uuid4().hex[:12]}"

    def _next_fault(self) -> dict:
        with self._lock:
            return self._faults.popleft() if self._faults else {}

    def _structured(self, body: dict, override: dict) -> tuple[str | None, dict | None]:
        """(raw content, answer dict) for a completion request; exactly one is not None.
        Raises _PromptError when the prompt lacks the phrases."""
        if "content" in override:
            return str(override["content"]), None
        if "answer" in override:
            return None, override["answer"]
        text = _prompt_text(body)
        # the last occurrences: the request comes after the trajectory, which may say "at most"
        n = next(reversed(list(_N_RE.finditer(text))), None)
        m = next(reversed(list(_M_RE.finditer(text))), None)
        if not n or not m:
            missing = [p for p, hit in (("'The trajectory has N steps'", n), ("'at most M'", m))
                       if not hit]
            raise _PromptError(f"fake provider: the prompt lacks {' and '.join(missing)}; "
                               "it cannot tell how many steps to choose")
        return None, self.answer(int(n.group(1)), int(m.group(1)), text)

    # OpenAI ------------------------------------------------------------------
    def _chat_completion(self, body: dict, override: dict) -> dict:
        raw, ans = self._structured(body, override)
        content = raw if raw is not None else json.dumps(ans)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        finish = "stop"
        tool_choice = body.get("tool_choice")
        if body.get("tools") and raw is None and isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if name:  # forced function call: the answer goes into its arguments
                message["content"] = None
                message["tool_calls"] = [{"id": self._new_id("call_"), "type": "function",
                                          "function": {"name": name, "arguments": content}}]
                finish = "tool_calls"
        prompt = _prompt_text(body)
        usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(content)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": self._new_id("chatcmpl-"), "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake-model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish,
                             "logprobs": None}],
                "usage": usage, "system_fingerprint": "fp_fake"}

    def _file_object(self, f: dict) -> dict:
        return {"id": f["id"], "object": "file", "bytes": len(f["data"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed",
                "expires_at": None, "status_details": None}

    def _add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        f = {"id": self._new_id("file-"), "data": data, "filename": filename, "purpose": purpose,
             "created_at": int(time.time())}
        with self._lock:
            self._files[f["id"]] = f
        return f

    def _run_openai_batch(self, batch: dict, data: bytes) -> None:
        out, err = [], []
        for line in data.decode("utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            cid = item.get("custom_id")
            override = self.batch_overrides.get(cid, {})
            req_id = self._new_id("req_")
            status = override.get("status")
            try:
                if status:
                    raise _PromptError(override.get("message") or f"scripted batch error {status}")
                body = self._chat_completion(item.get("body") or {}, override)
                status = 200
            except _PromptError as exc:
                status = status or 400
                body = _openai_error(status, str(exc))
            rec = {"id": self._new_id("batch_req_"), "custom_id": cid,
                   "response": {"status_code": status, "request_id": req_id, "body": body},
                   "error": None}
            (out if status == 200 else err).append(json.dumps(rec))
        now = int(time.time())
        if out:
            batch["output_file_id"] = self._add_file(("\n".join(out) + "\n").encode(),
                                                     "batch_output.jsonl", "batch_output")["id"]
        if err:
            batch["error_file_id"] = self._add_file(("\n".join(err) + "\n").encode(),
                                                    "batch_errors.jsonl", "batch_output")["id"]
        batch.update(status="completed", in_progress_at=batch["in_progress_at"] or now,
                     finalizing_at=now, completed_at=now,
                     request_counts={"completed": len(out), "failed": len(err),
                                     "total": len(out) + len(err)})

    # Anthropic ---------------------------------------------------------------
    def _message(self, body: dict, override: dict) -> dict:
        raw, ans = self._structured(body, override)
        tools = body.get("tools") or []
        tool_choice = body.get("tool_choice") or {}
        name = tool_choice.get("name") if isinstance(tool_choice, dict) else None
        if not name and tools and isinstance(tools[0], dict):
            name = tools[0].get("name")
        if raw is None and tools and name:
            content = [{"type": "tool_use", "id": self._new_id("toolu_"), "name": name,
                        "input": ans}]
            stop, out_text = "tool_use", json.dumps(ans)
        else:  # output_config.format (messages.parse), plain text, or a `content` fault
            out_text = raw if raw is not None else json.dumps(ans)
            content = [{"type": "text", "text": out_text}]
            stop = "end_turn"
        return {"id": self._new_id("msg_"), "type": "message", "role": "assistant",
                "model": body.get("model", "fake-model"), "content": content,
                "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": _tokens(_prompt_text(body)),
                          "output_tokens": _tokens(out_text)}}

    def _run_message_batch(self, batch: dict) -> None:
        lines, counts = [], {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0,
                             "expired": 0}
        for req in batch["_requests"]:
            cid = req.get("custom_id")
            override = self.batch_overrides.get(cid, {})
            status = override.get("status")
            try:
                if status:
                    raise _PromptError(override.get("message") or f"scripted batch error {status}")
                result = {"type": "succeeded", "message": self._message(req.get("params") or {},
                                                                         override)}
                counts["succeeded"] += 1
            except _PromptError as exc:
                result = {"type": "errored", "error": _anthropic_error(status or 400, str(exc))}
                counts["errored"] += 1
            lines.append(json.dumps({"custom_id": cid, "result": result}))
        batch["_results"] = ("\n".join(lines) + "\n").encode()
        batch.update(processing_status="ended", ended_at=_iso(time.time()), request_counts=counts,
                     results_url=f"{self.url}/v1/messages/batches/{batch['id']}/results")

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    # routing -----------------------------------------------------------------
    def _handle(self, h: "_Handler", method: str, path: str, body: Any) -> None:
        anthropic = path.startswith("/v1/messages") or (
            "x-api-key" in h.lower_headers and "authorization" not in h.lower_headers)
        err = _anthropic_error if anthropic else _openai_error

        def fail(status: int, message: str, headers: dict | None = None) -> None:
            h.send_json(status, err(status, message), headers)

        auth = (h.lower_headers.get("authorization") or h.lower_headers.get("x-api-key") or "").strip()
        if auth.lower() in ("", "bearer", "bearer none"):
            return fail(401, "missing API key (send an Authorization or x-api-key header)")

        parts = [p for p in path.split("/") if p]
        try:
            if method == "POST" and path in ("/v1/chat/completions", "/v1/messages"):
                return self._completion(h, path, body, fail)
            if parts[:2] == ["v1", "messages"] and parts[2:3] == ["batches"]:
                return self._anthropic_batches(h, method, parts[3:], body, fail)
            if parts[:2] == ["v1", "files"]:
                return self._openai_files(h, method, parts[2:], body, fail)
            if parts[:2] == ["v1", "batches"]:
                return self._openai_batches(h, method, parts[2:], body, fail)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return fail(400, f"fake provider: bad request: {type(exc).__name__}: {exc}")
        return fail(404, f"fake provider: no route for {method} {path}")

    def _hold(self) -> None:
        if not self.hold_until or self._release.is_set():
            return
        with self._lock:
            self._held += 1
            if self._held >= self.hold_until:
                self._release.set()
        self._release.wait(self.hold_timeout)

    def _completion(self, h: "_Handler", path: str, body: Any, fail: Callable) -> None:
        self._hold()
        fault = self._next_fault()
        if self.latency:
            time.sleep(self.latency)
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        headers = fault.get("headers")
        if fault.get("status"):
            status = int(fault["status"])
            return fail(status, fault.get("message") or f"fake provider: scripted {status} error",
                        headers)
        if not isinstance(body, dict):
            return fail(400, "fake provider: the request body must be a JSON object")
        try:
            if path == "/v1/messages":
                response = self._message(body, fault)
            else:
                response = self._chat_completion(body, fault)
        except _PromptError as exc:
            return fail(400, str(exc), headers)
        except Exception as exc:  # a broken custom `answer`: make it visible, never hang
            return fail(500, f"fake provider: answer() raised {type(exc).__name__}: {exc}", headers)
        h.send_json(200, response, headers)

    def _openai_files(self, h: "_Handler", method: str, rest: list[str], body: Any,
                      fail: Callable) -> None:
        if method == "POST" and not rest:
            fields = _multipart(h.headers.get("content-type", ""), h.raw_body)
            if "file" not in fields:
                return fail(400, "fake provider: multipart upload without a 'file' part")
            data, filename = fields["file"]
            purpose = fields.get("purpose", (b"batch", None))[0].decode()
            f = self._add_file(data, filename or "upload.jsonl", purpose)
            return h.send_json(200, self._file_object(f))
        with self._lock:
            f = self._files.get(rest[0]) if rest else None
        if f is None:
            return fail(404, f"No such File object: {rest[0] if rest else ''}")
        if method == "GET" and len(rest) == 1:
            return h.send_json(200, self._file_object(f))
        if method == "GET" and rest[1:] == ["content"]:
            return h.send_bytes(200, f["data"], "application/octet-stream")
        if method == "DELETE" and len(rest) == 1:
            with self._lock:
                self._files.pop(f["id"], None)
            return h.send_json(200, {"id": f["id"], "object": "file", "deleted": True})
        return fail(404, f"fake provider: no route for {method} /v1/files/{'/'.join(rest)}")

    def _openai_batches(self, h: "_Handler", method: str, rest: list[str], body: Any,
                        fail: Callable) -> None:
        if method == "POST" and not rest:
            with self._lock:
                f = self._files.get(body["input_file_id"])
            if f is None:
                return fail(404, f"No such File object: {body['input_file_id']}")
            now = int(time.time())
            batch = {"id": self._new_id("batch_"), "object": "batch",
                     "endpoint": body.get("endpoint", "/v1/chat/completions"),
                     "errors": None, "input_file_id": f["id"],
                     "completion_window": body.get("completion_window", "24h"),
                     "status": "validating", "output_file_id": None, "error_file_id": None,
                     "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
                     "finalizing_at": None, "completed_at": None, "failed_at": None,
                     "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "metadata": body.get("metadata"), "_polls": 0, "_data": f["data"]}
            with self._lock:
                self._batches[batch["id"]] = batch
            return h.send_json(200, self._public(batch))
        with self._lock:
            batch = self._batches.get(rest[0]) if rest else None
            if batch is None:
                return fail(404, f"No batch found with id '{rest[0] if rest else ''}'")
            if method == "GET" and len(rest) == 1:
                batch["_polls"] += 1
                if batch["status"] in ("validating", "in_progress"):
                    if batch["_polls"] > self.batch_polls:
                        self._run_openai_batch(batch, batch["_data"])
                    else:
                        batch["status"] = "in_progress"
                        batch["in_progress_at"] = batch["in_progress_at"] or int(time.time())
                return h.send_json(200, self._public(batch))
            if method == "POST" and rest[1:] == ["cancel"]:
                if batch["status"] in ("validating", "in_progress"):
                    now = int(time.time())
                    batch.update(status="cancelled", cancelling_at=now, cancelled_at=now)
                return h.send_json(200, self._public(batch))
        return fail(404, f"fake provider: no route for {method} /v1/batches/{'/'.join(rest)}")

    def _anthropic_batches(self, h: "_Handler", method: str, rest: list[str], body: Any,
                           fail: Callable) -> None:
        if method == "POST" and not rest:
            requests = body["requests"]
            now = time.time()
            batch = {"id": self._new_id("msgbatch_"), "type": "message_batch",
                     "processing_status": "in_progress",
                     "request_counts": {"processing": len(requests), "succeeded": 0,
                                        "errored": 0, "canceled": 0, "expired": 0},
                     "ended_at": None, "created_at": _iso(now), "expires_at": _iso(now + 86400),
                     "archived_at": None, "cancel_initiated_at": None, "results_url": None,
                     "_requests": requests, "_polls": 0}
            with self._lock:
                self._msg_batches[batch["id"]] = batch
            return h.send_json(200, self._public(batch))
        with self._lock:
            batch = self._msg_batches.get(rest[0]) if rest else None
            if batch is None:
                return fail(404, f"fake provider: no message batch {rest[0] if rest else ''!r}")
            if method == "GET" and len(rest) == 1:
                batch["_polls"] += 1
                if batch["processing_status"] == "in_progress" and batch["_polls"] > self.batch_polls:
                    self._run_message_batch(batch)
                return h.send_json(200, self._public(batch))
            if method == "GET" and rest[1:] == ["results"]:
                if "_results" not in batch:
                    return fail(404, "fake provider: the batch has not ended yet")
                return h.send_bytes(200, batch["_results"], "application/x-jsonl")
        return fail(404, f"fake provider: no route for {method} /v1/messages/batches/{'/'.join(rest)}")


def _openai_error(status: int, message: str) -> dict:
    kind, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else
                                             "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error(status: int, message: str) -> dict:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": f"req_fake{uuid.uuid4().hex[:16]}"}


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[bytes, str | None]]:
    """Parse a multipart/form-data body: ``name -> (payload bytes, filename or None)``."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    fields: dict[str, tuple[bytes, str | None]] = {}
    if not msg.is_multipart():
        return fields
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_payload(decode=True) or b"", part.get_filename())
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib default backlog (5) makes a burst of new connections wait for SYN retransmits
    # (~1 s each); the SDKs open one connection per concurrent request.
    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs pool connections
    server_version = "FakeProvider/1.0"

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.fake._lock:
                self.fake._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.raw_body = self.rfile.read(length) if length else b""
        self.lower_headers = {k.lower(): v for k, v in self.headers.items()}
        body: Any = None
        if self.raw_body:
            try:
                body = json.loads(self.raw_body)
            except ValueError:
                try:
                    body = self.raw_body.decode("utf-8")
                except UnicodeDecodeError:
                    body = self.raw_body
        split = urlsplit(self.path)
        record = {"method": self.command, "path": split.path, "query": parse_qs(split.query),
                  "headers": {k: ("***" if k in _SECRET_HEADERS else v)
                              for k, v in self.lower_headers.items()},
                  "body": body, "time": time.monotonic()}
        with self.fake._lock:
            self.fake.requests.append(record)
            self.fake.in_flight += 1
            self.fake.max_in_flight = max(self.fake.max_in_flight, self.fake.in_flight)
        try:
            self.fake._handle(self, self.command, split.path, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during a `delay` fault)
        except Exception as exc:  # a bug here must surface as a 500, not a hung client
            try:
                self.send_json(500, _openai_error(500, f"fake provider crashed: {exc!r}"))
            except OSError:
                pass
        finally:
            with self.fake._lock:
                self.fake.in_flight -= 1

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _dispatch

    def send_bytes(self, status: int, data: bytes, content_type: str,
                   headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_fake{uuid.uuid4().hex[:16]}")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)
