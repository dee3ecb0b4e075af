"""The mask inspector: which tokens does the loss see?

    python -m atlas.inspect selector=critical ratio=0.3        # 3 training trajectories, by seed
    python -m atlas.inspect inspect.ids=[babyai/BabyAI-GoToLocal-v0/train/3] inspect.tokens=true
    python -m atlas.inspect selection_file=<run>/selection.jsonl inspect.html=masks.html
    python -m atlas.inspect model.name=Qwen/Qwen2.5-0.5B-Instruct selector.granularity=action

It takes train.py's config (``data``, ``selector``, ``ratio``, ``oracle``, ``model``,
``selection_file``) and goes through the same stages (:func:`atlas.jobs.train.select_training_data`,
then :func:`atlas.data.masking.encode` with the model's chat template), so what it shows is what
a training job with the same settings trains on. For each chosen trajectory:

- the rendered chat, supervised tokens highlighted (green), context dim, the tail that is never
  fed (after the last supervised token) struck through; ``inspect.tokens=true`` alternates the
  shade at every token, so token boundaries show;
- a label before each step: its index, whether it is selected, the oracle's criterion, its
  one-line reason and the step's token count;
- a header: steps selected / candidates, supervised / fed tokens, the dropped tail, and steps
  left out for ``max_length``.

``inspect.html=<file>`` writes the same as a self-contained HTML page (inline styles, no
network). train.py logs the same rendering of a few training examples to W&B
(``train/masks``) at the start of every run.
"""

from __future__ import annotations

import io
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from atlas.data.masking import IGNORE_INDEX, MaskingError, encode, tokenize_steps
from atlas.data.trajectory import Trajectory
from atlas.utils import ConfigError

log = logging.getLogger(__name__)

SUPERVISED = ("black on green3", "black on dark_sea_green2")  # alternate per token with tokens=true
CONTEXT = ("grey50", "grey66")
TAIL = "grey50 strike"
LABEL = "bold magenta"


@dataclass
class Inspection:
    """One trajectory as training sees it.

    Attributes:
        trajectory: The trajectory, with its selection.
        text: The rendering, as :class:`rich.text.Text`.
        stats: Steps selected / candidates, supervised / fed / tail tokens, dropped steps.
    """

    trajectory: Trajectory
    text: Text
    stats: dict[str, Any]

    def header(self) -> str:
        s = self.stats
        line = (f"{self.trajectory.id} ({self.trajectory.env}): {s['selected']} of "
                f"{s['candidates']} candidate steps selected, {s['supervised_tokens']} of "
                f"{s['fed_tokens']} fed tokens supervised ({s['granularity']}), "
                f"{s['tail_tokens']} tail tokens not fed")
        if s["dropped_steps"]:
            line += f", steps {s['dropped_steps']} left out for max_length"
        return line + (f"; {s['error']}" if s.get("error") else "")


def inspect_trajectory(trajectory: Trajectory, tokenizer, candidates: list[int],
                       granularity: str = "step", max_length: int | None = None,
                       tokens: bool = False, tools_as_text: bool = False,
                       overflow: str = "drop_steps") -> Inspection:
    """The rendering of one trajectory with its supervised tokens marked.

    Args:
        trajectory: The trajectory with the selection applied.
        tokenizer: The model's tokenizer (its chat template).
        candidates: The steps the selector could choose from (the source's trainable steps).
        granularity: ``selector.granularity``.
        max_length: ``data.loader.max_length``.
        tokens: Alternate the shade at every token.
        tools_as_text: ``data.tools_as_text``.
        overflow: ``data.loader.overflow``.
    """
    shown = trajectory.as_text() if tools_as_text else trajectory
    tok = tokenize_steps(shown, tokenizer)
    error = None
    try:
        example = encode(shown, tokenizer, max_length, overflow, granularity=granularity)
        labels, dropped = example.labels, example.dropped_steps
    except MaskingError as e:  # shown, not raised: the page says why nothing is supervised
        labels, dropped, error = [], [], str(e)
    fed = len(labels)
    offsets = tokenizer(tok.text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    starts = {start: k for k, (start, _) in enumerate(tok.step_spans)}
    steps = shown.steps
    text, pos = Text(), 0
    for j, (a, b) in enumerate(offsets):
        if j in starts:
            k = starts[j]
            if text and not str(text).endswith("\n"):
                text.append("\n")
            a, b = tok.step_spans[k]
            supervised = sum(label != IGNORE_INDEX for label in labels[a:b])
            text.append(_label(steps[k], k, b - a, supervised), style=LABEL)
        piece = tok.text[pos:b]
        pos = max(pos, b)
        shade = j % 2 if tokens else 0
        if j >= fed:
            style = TAIL
        elif labels[j] != IGNORE_INDEX:
            style = SUPERVISED[shade]
        else:
            style = CONTEXT[shade]
        text.append(piece, style=style)
    text.append(tok.text[pos:], style=TAIL)
    stats = {"selected": len(trajectory.selected_steps), "candidates": len(candidates),
             "supervised_tokens": sum(label != IGNORE_INDEX for label in labels),
             "fed_tokens": fed, "tail_tokens": len(tok.input_ids) - fed,
             "dropped_steps": dropped, "granularity": granularity, "error": error}
    return Inspection(trajectory, text, stats)


def _label(step, k: int, tokens: int, supervised: int) -> str:
    m = step.message
    parts = [f"step {k}", "selected" if m.selected else "not selected"]
    if m.criterion:
        parts.append(m.criterion)
    parts.append(f"{tokens} tokens" + (f", {supervised} supervised" if supervised else ""))
    label = "[" + " | ".join(parts) + "]"
    if m.reason:
        reason = " ".join(m.reason.split())
        label += f" {reason[:117] + '...' if len(reason) > 120 else reason}"
    return label + "\n"


def show(console: Console, inspections: list[Inspection]) -> None:
    """Print the inspections, each under its header."""
    for ins in inspections:
        console.rule(style="bold")
        console.print(ins.header(), style="bold", highlight=False, markup=False)
        console.print(ins.text, soft_wrap=False, overflow="fold")
        console.print()


def html(inspections: list[Inspection], width: int = 120) -> str:
    """A self-contained HTML page of the inspections (inline styles, no network)."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    show(console, inspections)
    return console.export_html(inline_styles=True)


def log_table(logger, selection: list[Trajectory], candidates: dict[str, list[int]], tokenizer,
              granularity: str, max_length: int | None, tools_as_text: bool, n: int = 3,
              seed: int = 0) -> None:
    """A W&B table (``train/masks``) of ``n`` training examples as the inspector shows them, so
    a run's dashboard shows what it was trained on."""
    import wandb

    rows = []
    for t in choose(selection, None, n, seed):
        ins = inspect_trajectory(t, tokenizer, candidates[t.id], granularity, max_length,
                                 tools_as_text=tools_as_text)
        s = ins.stats
        rows.append([t.id, t.env, s["selected"], s["candidates"], s["supervised_tokens"],
                     s["fed_tokens"], str(granularity), wandb.Html(html([ins]), inject=False)])
    logger.log_table("train/masks", columns=["trajectory", "env", "selected", "candidates",
                                             "supervised_tokens", "fed_tokens", "granularity",
                                             "masks"], data=rows)


def choose(selection: list[Trajectory], ids: list[str] | None, n: int, seed: int) -> list[Trajectory]:
    """The trajectories named by ``ids``, else ``n`` of them chosen by ``seed``."""
    if ids:
        by_id = {t.id: t for t in selection}
        unknown = [i for i in ids if str(i) not in by_id]
        if unknown:
            raise ConfigError(f"inspect.ids: {unknown} are not training trajectories of this "
                              f"selection (e.g. {list(by_id)[:3]})")
        return [by_id[str(i)] for i in ids]
    if n < 1:
        raise ConfigError(f"inspect.n must be >= 1, got {n}")
    return random.Random(seed).sample(selection, min(n, len(selection)))


def run(cfg) -> list[Inspection]:
    """The inspector job (``conf/inspect.yaml``): print, and write ``inspect.html``."""
    from atlas.console import tidy
    from atlas.model import load_tokenizer
    from atlas.jobs.train import select_training_data
    from atlas.utils import atomic_write

    tidy()
    data = select_training_data(cfg, cfg.get("selection_file"))
    candidates = {t.id: t.candidate_steps for t in data.train}
    chosen = choose(data.chosen, cfg.inspect.get("ids"), cfg.inspect.n, cfg.inspect.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    inspections = [inspect_trajectory(t, tokenizer, candidates[t.id], data.granularity,
                                      cfg.data.loader.max_length, cfg.inspect.tokens,
                                      cfg.data.tools_as_text, cfg.data.loader.overflow)
                   for t in chosen]
    show(Console(width=cfg.inspect.width, highlight=False), inspections)
    if cfg.inspect.get("html"):
        path = Path(cfg.inspect.html)
        atomic_write(path, html(inspections, cfg.inspect.width))
        log.info("written to %s", path.resolve())
    return inspections


def main() -> None:
    import hydra

    from atlas.utils import one_line_errors

    @hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
    def job(cfg) -> None:
        with one_line_errors():
            run(cfg)

    job()


if __name__ == "__main__":
    from atlas.utils import refuse_secret_overrides

    refuse_secret_overrides(sys.argv[1:])
    main()
