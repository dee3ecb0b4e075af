"""What a job prints: each message once, library noise filtered, progress that also reaches a
log file, and a closing summary of where everything went.

- :func:`tidy` (at the start of every job): Lightning's own console handler goes (Hydra's
  prints every line already), and so do Lightning's advertisement for another product, W&B's
  notice about a setting Lightning passes, the deprecation warnings libraries raise about each
  other, and transformers' per-file progress bars. The project's own warnings stay.
- :func:`progress`: a tqdm bar on a terminal; when the output goes to a file (``nohup``,
  SLURM), one log line every ``interval`` seconds and at the end, with the rate and the time left.
- :class:`LineProgress` does the same for Lightning's training loop (step, loss, tokens/s, ETA);
  ``train.py`` uses it instead of the progress bar when stderr is not a terminal.
- :func:`summary_block`: the closing lines of a job, saying where its files are.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# warnings that libraries raise about each other (never the project's own)
LIBRARY_WARNINGS = (
    r".*'set_vital' is deprecated",                       # torchdata -> torch
    r".*isinstance\(treespec, LeafSpec\)",                # lightning -> torch
    r".*`gradient_checkpointing` is deprecated",          # transformers' own rename
    r".*does not have many workers which may be a bottleneck",  # num_workers=0 is the default
)


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("💡 Tip" in text or "litlogger" in text or "litmodels" in text)


def tidy() -> None:
    """Quiet the libraries (see the module docstring). Idempotent; call after Hydra has set up
    logging."""
    if logging.getLogger().handlers:  # Hydra's handler prints Lightning's lines already
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                           or isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in lg.filters):
            lg.addFilter(_DropAdvert())
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing shards"
    if not is_terminal():  # a download's bar is worth it on a terminal; in a file it is noise
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def is_terminal() -> bool:
    return sys.stderr.isatty()


class _LineBar:
    """tqdm's counting interface, reported as a log line every ``interval`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, initial: int = 0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.start, self.reported = initial, initial, False
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._report()

    def _report(self) -> None:
        self.last, self.reported = time.monotonic(), True
        elapsed = self.last - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total else ""
        left = (f", {duration((self.total - self.n) / rate)} left"
                if self.total and rate > 0 and self.n < self.total else "")
        log.info("%s: %d%s (%.2f %s/s)%s", self.desc, self.n, total, rate, self.unit, left)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        """The last count, unless the work was too short to have needed a line (< 1 s)."""
        if self.n > self.start and (self.reported or time.monotonic() - self.t0 >= 1.0):
            self._report()

    def __enter__(self) -> "_LineBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self):  # pragma: no cover - used as a counter only
        raise TypeError("wrap an iterable with progress(iterable=...)")


def progress(total: int | None = None, desc: str = "", unit: str = "it",
             interval: float | None = None, iterable=None, initial: int = 0):
    """A progress bar on a terminal, else log lines every ``interval`` seconds (default 30,
    ``ATLAS_PROGRESS_INTERVAL``). With ``iterable``, iterate it as tqdm does."""
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    bar = _LineBar(total if total is not None else _len(iterable), desc, unit,
                   interval if interval is not None else _interval(), initial)
    if iterable is None:
        return bar

    def counted():
        with bar:
            for item in iterable:
                yield item
                bar.update()
    return counted()


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _interval() -> float:
    return float(os.environ.get("ATLAS_PROGRESS_INTERVAL", 30))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


class LineProgress(L.Callback):
    """Training progress as one log line every ``interval`` seconds (and at the end of each
    epoch): optimizer step, loss, tokens/s and the time left. For output that is not a
    terminal, where a progress bar prints nothing until it ends."""

    def __init__(self, interval: float | None = None):
        self.interval = interval if interval is not None else _interval()
        self.tokens = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = self.last = time.monotonic()
        self.tokens, self.step0, self.reported = 0, trainer.global_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict):  # fed positions, over every rank (no device sync)
            self.tokens += batch["input_ids"].numel() * trainer.world_size
        if time.monotonic() - self.last >= self.interval:
            self._report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.reported:
            self._report(trainer)

    def _report(self, trainer) -> None:
        self.last, self.reported = time.monotonic(), trainer.global_step
        if not trainer.is_global_zero:  # one line per step, not one per rank
            return
        elapsed = max(self.last - self.t0, 1e-9)
        done = trainer.global_step - self.step0
        total = trainer.estimated_stepping_batches
        loss = trainer.callback_metrics.get("train/loss")
        left = (f", {duration((total - trainer.global_step) * elapsed / done)} left"
                if done and isinstance(total, (int, float)) and total != float("inf") else "")
        log.info("epoch %d, step %d/%s%s, %.0f tokens/s%s", trainer.current_epoch,
                 trainer.global_step, total if total != float("inf") else "?",
                 f", train/loss {float(loss):.4f}" if loss is not None else "",
                 self.tokens / elapsed, left)


class WandbLogger(_WandbLogger):
    """Lightning's W&B logger, without passing W&B the ``anonymous`` setting it no longer has
    (W&B warns about it on every run)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def summary_block(title: str, rows: dict[str, Any]) -> str:
    """The closing lines of a job: ``title``, then one ``name  value`` line per row with a
    value."""
    rows = {k: v for k, v in rows.items() if v not in (None, "", [])}
    width = max((len(k) for k in rows), default=0)
    rule = "-" * 72
    return "\n".join([rule, title, *(f"  {k:<{width}}  {v}" for k, v in rows.items()), rule])
