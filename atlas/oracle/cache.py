"""Oracle answers on disk: a JSONL file appended and fsynced as each answer arrives, keyed by
(oracle, model, prompt version, prompt), so an interrupted run resumes without paying twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


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
