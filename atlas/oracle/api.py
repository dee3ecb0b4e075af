"""Oracles behind a provider SDK (``openai``, ``anthropic``): the key read from the
environment only (never from a config), the SDK's retries and backoff, and its exceptions
sorted into fatal and per-request faults.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from atlas.oracle.engine import Oracle, OracleError, public_url

# the SDKs' HTTP client logs every request at INFO; retries and failures still show as warnings
logging.getLogger("httpx2").setLevel(logging.WARNING)


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
