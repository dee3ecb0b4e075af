"""Small shared helpers: package paths, atomic writes, secret redaction, W&B defaults, counts
set per environment."""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf

PKG_PREFIX = "pkg://"

# Config keys whose values must never reach a saved config, a log or W&B.
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|token)$", re.IGNORECASE)
# Values that look like provider keys, wherever they appear.
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|sk-ant-[A-Za-z0-9_\-]{8,})")


class UserError(Exception):
    """An error in the user's input or config (a file, a line, a config key), not a bug: the
    entry points print it as one line, without a traceback (:func:`one_line_errors`)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the config key."""


def user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error`` (itself, or a cause that Hydra's instantiate or
    another layer wrapped), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Errors caused by the user's input or config end the run with one line on stderr and
    exit status 1; bugs keep their traceback, and so does everything under
    ``HYDRA_FULL_ERROR=1``. What finished before the error stays on disk."""
    try:
        yield
    except Exception as e:
        err = user_error(e)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(err).strip()
        record = logging.LogRecord("atlas", logging.ERROR, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:  # the job's log file (the console gets
            if isinstance(handler, logging.FileHandler):  # the line below, once)
                handler.handle(record)
        raise SystemExit(f"error: {message}") from None


class Choice(str, Enum):
    """A closed set of strings (loss averages, overflow and failure policies, splits, episode
    statuses): a config value is converted once, where it enters, by :meth:`of`, which names the
    key of a wrong value. Members compare equal to their strings, print and format as them, and
    JSON writes them as them; where a library turns an Enum into its name (W&B tables), pass
    ``str(member)``."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, value: Any, key: str) -> "Choice":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{key} must be one of {', '.join(m.value for m in cls)}, "
                              f"got {value!r}") from None


def names(value: Any, key: str, what: str = "task families") -> list[str]:
    """A config value that must be a non-empty list of non-empty strings (``data.tasks``,
    ``eval.episode_tasks.<env>``), as a plain list; ``key`` names it in the error."""
    if (isinstance(value, str) or not isinstance(value, Sequence) or not value
            or not all(isinstance(v, str) and v for v in value)):
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise ConfigError(f"{key} must be a non-empty list of {what}, got {shown!r}")
    return list(value)


def per_environment(setting: Any, name: str, group: str, key: str) -> int:
    """A count set for a whole evaluation suite (``eval.episodes``, ``eval.steps.tasks``): one
    number for every environment, or a mapping by environment name, else by group (held_in /
    held_out), where a missing entry is 0. ``key`` names the setting in a config error."""
    if isinstance(setting, Mapping):
        n = setting.get(name, setting.get(group, 0))
        where = f"{key}.{name if name in setting else group}"
    else:
        n, where = setting, key
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{where} must be a count >= 0 (0: none), got {n!r}")
    return n


def resolve_path(path: str | Path) -> Path:
    """Resolve ``pkg://atlas/<relative path>`` to a file shipped in the package; else a Path."""
    s = str(path)
    if s.startswith(PKG_PREFIX):
        package, _, rel = s[len(PKG_PREFIX):].partition("/")
        return Path(str(importlib.resources.files(package).joinpath(rel)))
    return Path(s).expanduser()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def redact(obj: Any) -> Any:
    """A copy of a plain config (dicts/lists) with secrets replaced by ``"***"``."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return SECRET_VALUE.sub("***", obj)
    return obj


def secret_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that carry a secret (``oracle.api_key=...`` or an ``sk-...`` value).

    Hydra writes every override to ``.hydra/overrides.yaml`` before the job starts, so the entry
    points refuse these before Hydra sees them; keys belong in environment variables.
    """
    bad = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and ((SECRET_KEY.search(key.split(".")[-1].lstrip("+~")) and value not in ("", "null"))
                   or SECRET_VALUE.search(value)):
            bad.append(key)
    return bad


def refuse_secret_overrides(argv: list[str]) -> None:
    """Exit before Hydra starts when an override carries a secret (see ``secret_overrides``)."""
    if bad := secret_overrides(argv):
        raise SystemExit(
            f"refusing to start: {', '.join(bad)} would put a secret on the command line, and "
            f"Hydra saves overrides to disk. Set it in the environment instead "
            f"(OPENAI_API_KEY, ANTHROPIC_API_KEY, WANDB_API_KEY).")


def wandb_offline_by_default() -> str:
    """W&B runs offline unless the user chose a mode (WANDB_MODE) themselves."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ["WANDB_MODE"]


DDP_JOB_ENV = "ATLAS_DDP_JOB"


# Hydra settings a DDP child must not take from its parent: they would start a sweep or move
# the job's directory (the child gets its own below)
_SWEEP_SETTINGS = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.sweeper", "hydra/sweeper",
                   "hydra.launcher", "hydra/launcher", "hydra.job.name", "hydra.output_subdir")
_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def ddp_child_argv(argv: list[str]) -> list[str]:
    """The command line of a DDP child process: this one job, in its parent's directory.

    Lightning starts DDP ranks > 0 by re-running the parent's command line. Under ``-m`` (or an
    experiment that sets ``hydra.mode=MULTIRUN``) that is the whole sweep, with its ``${now}``
    directories evaluated again: each child would run every job again and write a second
    directory tree. The parent job leaves its overrides and output directory in the environment
    (:data:`DDP_JOB_ENV`); a child runs exactly that job, with the parent's config options
    (``--config-name``...), in the parent's directory. Ranks started by torchrun or SLURM do not
    see that variable and keep their command line.
    """
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if rank == 0 or DDP_JOB_ENV not in os.environ:
        return argv
    job = json.loads(os.environ[DDP_JOB_ENV])
    config_args, args = [], iter(argv[1:])
    for arg in args:
        if arg.split("=", 1)[0] in _CONFIG_FLAGS:
            config_args += [arg] if "=" in arg else [arg, next(args, "")]
    hydra_args = [o for o in job.get("hydra_overrides", [])
                  if not o.lstrip("+~").startswith(_SWEEP_SETTINGS)]
    if '"' in job["output_dir"] or "${" in job["output_dir"]:
        raise SystemExit(f"DDP: the job directory {job['output_dir']!r} cannot be passed to "
                         f"Hydra (it holds '\"' or '${{'); choose another hydra.sweep.dir")
    return [argv[0], *config_args, *job["overrides"], *hydra_args,
            f'hydra.run.dir="{job["output_dir"]}"', f"hydra.job.name=train_ddp_process_{rank}",
            "hydra.output_subdir=null", "hydra.mode=RUN"]
