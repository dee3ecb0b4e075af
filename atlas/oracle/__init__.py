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

The package follows those seams:

- ``prompts``: the criteria, the versioned prompt, answer validation and the re-ask;
- ``cache``: answers on disk (``JsonlCache``);
- ``engine``: the request engine every oracle shares (``Oracle``, ``Judgement``);
- ``api``, ``openai``, ``anthropic``, ``hf``: the providers, one file per family;
- ``heuristic``: the rules of the offline default oracle.

Everything callers use is exported here (configs name ``atlas.oracle.OpenAIOracle``...).
"""

from atlas.oracle.anthropic import AnthropicOracle
from atlas.oracle.api import APIOracle, api_key
from atlas.oracle.cache import JsonlCache, default_cache_dir
from atlas.oracle.engine import Judgement, Oracle, OracleError, Reply, public_url
from atlas.oracle.heuristic import HeuristicOracle
from atlas.oracle.hf import HFOracle
from atlas.oracle.openai import OpenAICompatibleOracle, OpenAIOracle
from atlas.oracle.prompts import (CRITERIA, PROMPT_VERSION, SYSTEM_PROMPT, CriticalStep, Criterion,
                                 InvalidAnswer, OracleAnswer, check_answer, extract_json, prompt,
                                 reask, render_trajectory)

__all__ = ["AnthropicOracle", "APIOracle", "CRITERIA", "CriticalStep", "Criterion",
           "HeuristicOracle", "HFOracle", "InvalidAnswer", "Judgement", "JsonlCache", "Oracle",
           "OracleAnswer", "OracleError", "OpenAICompatibleOracle", "OpenAIOracle",
           "PROMPT_VERSION", "Reply", "SYSTEM_PROMPT", "api_key", "check_answer",
           "default_cache_dir", "extract_json", "prompt", "public_url", "reask",
           "render_trajectory"]
