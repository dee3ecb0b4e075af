"""The Anthropic oracle (Messages API with a JSON tool answer; Message Batches).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from atlas.oracle.api import APIOracle, api_key
from atlas.oracle.engine import Reply
from atlas.oracle.prompts import OracleAnswer

log = logging.getLogger(__name__)


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
