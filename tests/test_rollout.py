"""The rollout loop and evaluate.py: action parsing, the per-episode KV cache, episode outcomes
(success, invalid responses, turn caps, crashing engines), results files and the CLI."""

from __future__ import annotations

import json
from collections import Counter
import subprocess
import sys

import pytest
import torch

from atlas.data.generate import expert_episode
from atlas.envs.maze import MazeEnv
from atlas.evaluation import summarize
from atlas.rollout import EnvPool, Policy, parse_action, run_episodes
from tests.helpers import CONF, ROOT, ScriptedPolicy, make_maze as _maze


@pytest.mark.parametrize("text,action", [
    ("Thought: the key is ahead.\nAction: go forward", "go forward"),
    ("Thought: x\naction:   move[east]  ", "move[east]"),
    ("Thought: format is Action: <a>\nAction: guess[crane]", "guess[crane]"),
    ("Action: first\nThought: no, better\nAction: second", "second"),
    ("I will go north.", None),
    ("Thought: hmm\nAction:", None),
    ("Thought: hmm\nAction:\nThought: still thinking", None),  # an empty action is no action
    ("Thought: Action: go forward", "go forward"),  # on the thought's line, as AgentGym reads it
    ("Thought: go on.  ACTION :  turn left", "turn left"),
    ("Thought: a chain reaction: none", None),  # a word that ends in "action" is not the label
    ("Action: first\nThought: no, better\nAction:", "first"),
    ("", None),
])
def test_parse_action(text, action):
    assert parse_action(text) == action


def test_cache_reuse_gives_the_same_responses_as_recomputing(chatty_model, tokenizer):
    """Episodes of different lengths, one skipping a turn, rows ending at different tokens:
    reusing each episode's cache across turns must not change a single greedy token, and every
    stored key/value must equal a fresh forward pass over the stored tokens."""
    model = chatty_model
    chats0 = [[{"role": "system", "content": "You are an agent."},
               {"role": "user", "content": "Task: go north " * (i + 1)}] for i in range(5)]
    probe = Policy(model, tokenizer, max_new_tokens=10, reuse_cache=False)
    text = probe.generate([probe.prompt_ids(c) for c in chats0])
    common = Counter(t for x in text for t in tokenizer(x)["input_ids"]).most_common(2)
    extra_stops = {t for t, _ in common}  # so that rows stop early, at different steps
    transcripts, lengths = {}, set()
    # (reuse the cache, decode in segments of 3 tokens that finished rows leave)
    for reuse, segment in ((False, None), (True, None), (True, 3)):
        policy = Policy(model, tokenizer, max_new_tokens=10, reuse_cache=reuse, segment=segment)
        policy.stop = sorted(set(policy.stop) | extra_stops)
        chats, out = [list(c) for c in chats0], []
        for turn in range(4):
            live = [i for i in range(5) if not (i == 1 and turn == 2)]
            responses = policy.generate([policy.prompt_ids(chats[i]) for i in live],
                                        [f"ep{i}" for i in live])
            for i, r in zip(live, responses):
                chats[i] += [{"role": "assistant", "content": r},
                             {"role": "user", "content": "Observation: " + "more " * (i + turn)}]
            out.append(responses)
            lengths |= {len(tokenizer(r)["input_ids"]) for r in responses}
            for ids, layers in policy.cache.values():
                fresh = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
                for layer, (k, v) in zip(fresh.layers, layers):
                    torch.testing.assert_close(k, layer.keys[0], atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(v, layer.values[0], atol=1e-4, rtol=1e-4)
        transcripts[reuse, segment] = out
        if reuse:
            assert policy.reused_tokens > policy.computed_tokens  # most of each prompt was cached
            assert set(policy.cache) == {f"ep{i}" for i in range(5)}  # no segment keys left
    assert len(lengths) > 2  # rows really did end at different lengths
    assert transcripts[True, None] == transcripts[False, None] == transcripts[True, 3]


class CrashingMaze(MazeEnv):
    def step(self, action):
        if "south" in action:
            raise RuntimeError("engine died")
        return super().step(action)


def test_rollout_replays_expert_episodes_in_the_training_format():
    """A policy that answers with the expert's turns reproduces the expert trajectory exactly:
    prompts in evaluation are the training data's format."""
    env = _maze()
    tasks = env.tasks("test", 5)
    experts = {t.id: expert_episode(env, t) for t in tasks}
    policy = ScriptedPolicy({k: [s.message.content for s in v.steps] for k, v in experts.items()})
    episodes = run_episodes(policy, EnvPool({"maze": _maze}, instances=2), tasks, batch_size=3)
    assert [e.task for e in episodes] == tasks
    for ep in episodes:
        assert ep.status == "success" and ep.score == 1.0 and ep.invalid == 0
        assert ep.trajectory.chat() == experts[ep.task.id].chat()
    assert max(policy.batches) == 2  # batch of 3 slots, but only 2 maze instances at a time


def test_invalid_responses_turn_caps_and_a_crashing_engine_fail_episodes_not_the_run():
    env = _maze()
    tasks = env.tasks("test", 3)
    scripts = {tasks[0].id: ["I think I should go.", "Thought: ok\nAction: move[north]"],
               tasks[1].id: ["Thought: down\nAction: move[south]"],
               tasks[2].id: ["Thought: x\nAction: move[east]"] * 10}
    finished = []
    pool = EnvPool({"maze": lambda: _maze(CrashingMaze)}, instances=4)
    episodes = run_episodes(ScriptedPolicy(scripts), pool, tasks, batch_size=4,
                            max_turns={"maze": 3}, on_finish=finished.append)
    first, crashed, capped = episodes
    assert first.invalid == 2  # the first turn and the third ("no idea" once the script ran out)
    assert "no action found" in first.trajectory.messages[2].content
    assert crashed.status == "error" and "engine died" in crashed.error
    assert capped.status in ("max_turns", "failure") and capped.turns <= 3
    assert sorted(e.task.id for e in finished) == sorted(t.id for t in tasks)
    assert len(pool.all) == 2  # the crashed engine was closed, not reused
    results = summarize(episodes, {"maze": "held_out"})
    assert results["environments"]["maze"]["errors"] == 1
    assert results["averages"]["held_out"]["success"] == 0.0


def test_summarize_averages_over_environments_not_episodes():
    from atlas.envs.base import Task
    from atlas.rollout import Episode

    def ep(env, success):
        return Episode(Task(env, "x", 0, "test"), trajectory=None, success=success, score=float(success))

    episodes = [ep("a", True), ep("a", True), ep("a", True), ep("a", False), ep("b", False)]
    results = summarize(episodes, {"a": "held_in", "b": "held_in"})
    assert results["environments"]["a"]["success"] == 75.0
    assert results["averages"]["held_in"]["success"] == 37.5  # (75 + 0) / 2, as the paper averages


def _cli(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_evaluate_cli_on_a_lora_checkpoint_from_train(tmp_path):
    _cli("train.py", "model=tiny_llama", "peft=lora", "data.limit=4", "data.val_fraction=0",
         "trainer.max_steps=1", "logger=none", "eval_after_training=false",
         f"hydra.run.dir={tmp_path}/train", cwd=tmp_path)
    assert (tmp_path / "train" / "model" / "adapter_config.json").exists()
    proc = _cli("evaluate.py", "model=tiny_llama", f"checkpoint={tmp_path}/train/model", "eval=smoke",
                "logger=wandb", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {k: v["group"] for k, v in results["environments"].items()} == {"babyai": "held_in",
                                                                          "maze": "held_out"}
    assert set(results["averages"]) == {"held_in", "held_out"}
    episodes = [json.loads(line) for line in (tmp_path / "eval" / "episodes.jsonl").open()]
    assert {e["meta"]["env"] for e in episodes} == {"babyai", "maze"}
    assert all(e["meta"]["split"] == "test" and e["meta"]["status"] for e in episodes)
    assert "held_out avg" in proc.stdout + proc.stderr
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*"))


def test_evaluate_rejects_a_directory_that_is_not_a_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={tmp_path}",
                           "eval=smoke", "logger=none", f"hydra.run.dir={tmp_path}/eval"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no config.json or adapter_config.json" in proc.stderr


@pytest.mark.parametrize("override,message", [("eval.episodes=-1", "eval.episodes"),
                                              ("eval.batch_size=0", "batch_size"),
                                              ("eval.split=validation", "eval.split"),
                                              ("+eval.held_out.extra={name: x}", "no _target_")])
def test_bad_eval_config_values_are_named(tmp_path, override, message):
    from hydra import compose, initialize_config_dir

    from atlas.evaluation import evaluate

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=smoke", override])
    with pytest.raises(ValueError, match=message):
        evaluate(None, None, cfg.eval, tmp_path)


def test_generation_stops_a_row_after_its_action_line(tokenizer):
    from atlas.rollout import ActionLineStop

    prompt = tokenizer("<|im_start|>assistant\n")["input_ids"]
    rows = ["Thought: go\nAction: move[east]\nObservation: I imagine", "Thought: go\nAction: move[ea",
            "Action:\nThought: still thinking", "I will act.\n"]
    ids = [prompt + tokenizer(r)["input_ids"] for r in rows]
    width = max(map(len, ids))
    batch = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    stop = ActionLineStop(tokenizer, start=len(prompt))
    assert stop(batch, None).tolist() == [True, False, False, False]


def test_an_engine_that_fails_to_start_fails_its_episodes_only():
    env = _maze()
    tasks = env.tasks("test", 2)
    broken = [t.__class__("broken", t.name, t.seed, t.split) for t in tasks]

    def no_engine():
        raise OSError("JVM out of memory")

    scripts = {t.id: ["Thought: x\nAction: move[east]"] for t in tasks + broken}
    episodes = run_episodes(ScriptedPolicy(scripts), EnvPool({"maze": _maze, "broken": no_engine}),
                            tasks + broken, batch_size=4, max_turns=1)
    assert [e.status for e in episodes[2:]] == ["error", "error"]
    assert "JVM out of memory" in episodes[2].error
    assert all(e.status != "error" and e.turns == 1 for e in episodes[:2])


@pytest.mark.parametrize("entry", [["evaluate.py"], ["-m", "atlas.data.generate"]])
def test_entry_points_refuse_a_secret_on_the_command_line(tmp_path, entry):
    script = [str(ROOT / entry[0])] if entry[0].endswith(".py") else entry
    proc = subprocess.run([sys.executable, *script, "+note=sk-abcdefghijklmnop"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and "refusing to start" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written, no Hydra run directory
