"""A local Hugging Face causal LM as the oracle (no key, no cost; slow on CPU).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from atlas.oracle.engine import Oracle, OracleError, Reply


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
