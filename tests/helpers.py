"""What the tests share: paths, composed configs, tiny tokenizers with other families' chat
templates, scripted policies, expert episodes and generated tool-calling trajectories.
Fixtures live in ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoTokenizer

from atlas.data import Message, Trajectory
from atlas.data.masking import IGNORE_INDEX
from atlas.data.trajectory import ToolCall

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("ATLAS_SHARED_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = ROOT / "atlas" / "assets" / "smollm2_tokenizer"


def make_env(name: str, **overrides):
    """The environment of ``conf/env/<name>.yaml``, built as the jobs build it."""
    from hydra.utils import instantiate

    return instantiate(OmegaConf.load(CONF / "env" / f"{name}.yaml"), **overrides)


def env_config(name: str):
    """``conf/env/<name>.yaml`` as a plain dict without its ``_target_``."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "env" / f"{name}.yaml"))
    cfg.pop("_target_")
    return cfg


def compose_train(tmp_path: Path, *overrides: str):
    """Compose conf/train.yaml the way `python train.py` does, with a tiny model by default."""
    from hydra import compose, initialize_config_dir

    base = ["model=tiny_llama", "logger=csv", "data.limit=8", "data.val_fraction=0.25",
            "eval_after_training=false",
            f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=base + list(overrides))


def compose_select(tmp_path: Path, *overrides: str):
    """Compose conf/select.yaml the way `python select.py` does, with a tiny model by default."""
    from hydra import compose, initialize_config_dir

    base = ["model=tiny_llama", "data.limit=6", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("select", overrides=base + list(overrides))


def play_gold_path(env, task, mistake_at: float | None = None, rng=None):
    """An expert episode of a gold-path environment (ScienceWorld, TextWorld-Express), with a
    mistake injected ``mistake_at`` (a fraction) of the way along the gold path, which is known
    only after the reset. Returns (last feedback, [(thought, action, feedback), ...])."""
    from atlas.data.generate import expert_turns

    env.reset(task)
    at = int(mistake_at * (len(env.gold) - 1)) if mistake_at is not None else None
    turns = list(expert_turns(env, at, rng))
    if not turns[-1][2].done:
        raise AssertionError(f"{task.id}: no end within max_turns")
    return turns[-1][2], turns


def check_recovery(env, task, rejection: str) -> None:
    """A gold-path expert with one mistake at a random point still solves ``task``: the engine
    rejects the mistake with ``rejection`` without changing the state, and the next thought
    quotes the wrong action and the engine's answer and resumes the plan."""
    import random

    rng = random.Random(task.id)
    fb, turns = play_gold_path(env, task, rng.random(), rng)
    assert fb.success and fb.score == 1.0, (task.id, turns)
    wrong_turns = [i for i, (_, _, f) in enumerate(turns) if f.observation == rejection]
    assert len(wrong_turns) == 1, (task.id, turns)  # the mistake, and only the mistake
    at = wrong_turns[0]
    _, wrong, wrong_fb = turns[at]
    before = turns[at - 1][2].score if at else 0.0
    assert not wrong_fb.done and wrong_fb.score == before  # the mistake changed nothing
    recovery, action, _ = turns[at + 1]
    assert wrong in recovery and rejection in recovery and "plan" in recovery, recovery
    assert action != wrong


def template_tokenizer(template, specials, bos):
    """The shipped SmolLM2 tokenizer with ``template`` (a fixture file, or None for its own),
    ``specials`` added as special tokens and ``bos`` as its BOS token."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if template:
        tok.chat_template = (FIXTURES / "chat_templates" / template).read_text()
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tok.bos_token = bos
    return tok


def supervised_runs(example, tokenizer):
    """Decoded contiguous runs of supervised tokens."""
    runs, cur = [], []
    for tok_id, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


TOOL_FAMILIES = {
    # template, special tokens, bos, end of turn, parallel calls allowed
    "qwen2_5": ("qwen2_5.jinja", [], None, "<|im_end|>", True),
    "llama3_1": ("llama3_1.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                 "<|begin_of_text|>", "<|eot_id|>", False),
}


def tool_tokenizer(family):
    template, specials, bos, _, _ = TOOL_FAMILIES[family]
    return template_tokenizer(template, specials, bos)


TOOLS = [{"type": "function", "function": {"name": n, "description": f"The {n} tool.",
                                           "parameters": {"type": "object", "properties": {}}}}
         for n in ("get_order", "search_flights", "café_menu", "run")]


def generated(n: int, parallel: bool, seed: int = 0) -> list[Trajectory]:
    """Random tool-calling trajectories: text steps, calls, text with calls, (parallel calls),
    results with quotes, newlines and non-ASCII text; some calls left without a result."""
    rng = random.Random(seed)
    values = ['plain', 'with "quotes"', "two\nlines", "naïve café ☕", "", "{not json}", "a\\b"]
    out = []
    for i in range(n):
        msgs = [Message("user", f"Task {i}: {rng.choice(values)}")]
        for k in range(rng.randint(1, 4)):
            kind = rng.choice(["text", "call", "text+call"] + ["parallel"] * parallel)
            calls = [] if kind == "text" else [
                ToolCall(rng.choice(TOOLS)["function"]["name"],
                         {"q": rng.choice(values), "n": rng.randint(0, 99),
                          "nested": {"tags": [rng.choice(values)]}}, id=f"call_{i}_{k}_{j}")
                for j in range(2 if kind == "parallel" else 1)]
            text = "" if kind == "call" else f"Thought: step {k}, {rng.choice(values)}".strip()
            msgs.append(Message("assistant", text, tool_calls=calls))
            for c in calls:
                if rng.random() < 0.9:
                    msgs.append(Message("tool", json.dumps({"result": rng.choice(values)}),
                                        tool_call_id=c.id, name=c.name))
            if not calls:
                msgs.append(Message("user", f"Observation: {rng.choice(values)}"))
        out.append(Trajectory(f"gen{i}", "e", msgs, system="You are a tool-using agent.",
                              tools=TOOLS))
    return out


class ScriptedPolicy:
    """Stands in for the LLM: answers each episode from a script (the loop is what is tested)."""

    def __init__(self, scripts):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.batches = []

    def prompt_ids(self, chat, tools=None):
        self.tools = tools
        return [len(chat)]

    def generate(self, prompts, keys):
        self.batches.append(len(keys))
        return [self.scripts[k].pop(0) if self.scripts[k] else "no idea" for k in keys]

    def forget(self, key):
        pass


def make_maze(cls=None):
    """A Maze environment (``conf/env/maze.yaml``), or one of a subclass of it."""
    from atlas.envs.maze import MazeEnv

    return (cls or MazeEnv)(**env_config("maze"))
