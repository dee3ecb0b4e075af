"""The OpenAI oracle (structured outputs, the Batch API) and the OpenAI-compatible one (vLLM,
SGLang, llama.cpp, any server that speaks the chat-completions wire format).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import ValidationError

from atlas.oracle.api import APIOracle, api_key
from atlas.oracle.engine import OracleError, Reply
from atlas.oracle.prompts import OracleAnswer

log = logging.getLogger(__name__)


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
