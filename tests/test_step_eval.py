"""Step-level evaluation (atlas/step_eval.py): the cached expert test sets, action matching as
each environment's parser reads it, scoring with the shared KV cache against scoring each step
alone, summaries and the base-model comparison in evaluate()."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from atlas import step_eval
from atlas.data.formats import read_trajectories
from atlas.data.masking import tokenize_steps
from atlas.evaluation import environments, episode_tasks, evaluate
from atlas.model import load_model
from atlas.rollout import ActionFormat, Policy
from tests.helpers import CONF, ROOT


def _eval_cfg(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=["eval=smoke", *overrides]).eval


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("env,action,canonical", [
    ("babyai", "go forward", "go forward"),
    ("babyai", "Forward.", "go forward"),       # BabyAI's synonyms
    ("babyai", "fly away", None),
    ("maze", "move[north]", "north"),
    ("maze", "go up", "north"),
    ("maze", "move[sideways]", None),
    ("wordle", "guess[CRANE]", "crane"),
    ("wordle", "crane", "crane"),
    ("wordle", "guess", None),
    ("scienceworld", "Open  door to Kitchen", "open door to kitchen"),  # engines: exact, any case
    ("twx", "take coin ", "take coin"),
    ("twx", "", None),
])
def test_actions_are_compared_as_the_environment_parses_them(env, action, canonical):
    cfg = OmegaConf.load(CONF / "env" / f"{env}.yaml")
    assert get_class(cfg._target_).canonical_action(action) == canonical


def test_test_set_is_generated_once_cached_and_disjoint_from_training(tmp_path, monkeypatch):
    cfg = OmegaConf.load(CONF / "env" / "babyai.yaml")
    first, path = step_eval.test_trajectories(cfg, 6, mistake_fraction=0.5, cache_root=tmp_path)
    assert path.exists() and path.parent == tmp_path and len(first) >= 5
    assert all(t.meta["split"] == "test" and t.id.startswith("babyai/") for t in first)
    assert any(t.meta["mistake_step"] is not None for t in first)
    # second call: read from the cache, never generated again
    import atlas.data.generate as generate

    monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("regenerated"))
    again, same = step_eval.test_trajectories(cfg, 6, mistake_fraction=0.5, cache_root=tmp_path)
    assert same == path and [t.fingerprint() for t in again] == [t.fingerprint() for t in first]
    train = read_trajectories(ROOT / "atlas" / "data" / "default" / "babyai.jsonl")
    assert step_eval.overlap(first, train) == []
    assert step_eval.overlap(first, first[:2]) == [t.id for t in first[:2]]


def test_a_different_env_config_is_a_different_cached_test_set(tmp_path):
    cfg = OmegaConf.load(CONF / "env" / "maze.yaml")
    _, a = step_eval.test_trajectories(cfg, 2, cache_root=tmp_path)
    cfg.max_turns = 39
    _, b = step_eval.test_trajectories(cfg, 2, cache_root=tmp_path)
    assert a != b and a.exists() and b.exists()


def _items(tmp_path, mistake_fraction=1.0, tasks=2):
    items = []
    for name, group in (("babyai", "held_in"), ("maze", "held_out")):
        cfg = OmegaConf.load(CONF / "env" / f"{name}.yaml")
        ts, _ = step_eval.test_trajectories(cfg, tasks, mistake_fraction=mistake_fraction,
                                            cache_root=tmp_path)
        read = ActionFormat().reader(get_class(cfg._target_))
        items += [(t, group, read, c) for t, c in zip(ts, step_eval.step_criteria(ts, 0.3))]
    return items


@pytest.mark.parametrize("engine", ["shared_prefix", "policy", "policy_segments"])
def test_shared_cache_scoring_equals_scoring_each_step_alone(chatty_model, tokenizer, tmp_path,
                                                             engine):
    """Every step's greedy turn and NLL, computed from its trajectory's one teacher-forced pass,
    equal a fresh computation of that step alone, in one go: with the shared-prefix decoder
    (3 slots refilled as rows finish), and with the batched ``Policy`` in batches of mixed
    lengths (and in segments that finished rows leave)."""
    items = _items(tmp_path)
    policy = None if engine == "shared_prefix" else Policy(
        chatty_model, tokenizer, max_new_tokens=12, segment=5 if engine == "policy_segments" else None)
    records = step_eval.score(chatty_model, tokenizer, items, batch_size=3, max_new_tokens=12,
                              chunk_steps=5, policy=policy)
    alone = Policy(chatty_model, tokenizer, max_new_tokens=12, reuse_cache=False)
    by_id = {t.id: t for t, *_ in items}
    expected = sum(len(step_eval.scored_steps(t)) for t in by_id.values())
    assert len(records) == expected and expected > 10
    mistakes = {t.id: t.meta["mistake_step"] for t in by_id.values()
                if t.meta["mistake_step"] is not None}
    assert len(mistakes) >= 2
    for tid, mistake in mistakes.items():  # mistakes stay in the history but are not scored
        assert mistake not in {r["step"] for r in records if r["task"] == tid}
    for r in records:
        t = by_id[r["task"]]
        chat = t.chat()
        cut = 1 + [k for k, m in enumerate(t.messages) if m.role == "assistant"][r["step"]]
        assert r["response"] == alone.generate([alone.prompt_ids(chat[:cut])])[0], r
        tok = tokenize_steps(t, tokenizer)
        s, e = tok.step_spans[r["step"]]
        with torch.no_grad():
            logits = chatty_model(input_ids=torch.tensor([tok.input_ids])).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[s - 1:e - 1], torch.tensor(tok.input_ids[s:e]))
        assert r["nll"] == pytest.approx(float(nll), abs=1e-3)


def test_the_opening_an_environment_shares_is_computed_once(chatty_model, tokenizer, tmp_path):
    """The trajectories of one environment share their opening (system prompt, instructions):
    its KV cache is computed once and each trajectory's teacher-forced pass starts from it,
    with the NLL and KV cache of a pass over the whole trajectory."""
    items = _items(tmp_path, tasks=3)
    policy = Policy(chatty_model, tokenizer)
    shared = step_eval._tokenized(items, tokenizer)
    opening = step_eval._SharedOpening(shared)
    assert set(opening.length) == {"babyai", "maze"} and min(opening.length.values()) > 20
    for env, n in opening.length.items():
        openings = {tuple(it.ids[:n]) for it in shared if it.trajectory.env == env}
        assert len(openings) == 1  # one opening per environment, shorter than any first turn
        assert all(n < it.spans[0][0] for it in shared if it.trajectory.env == env)
    alone = step_eval._tokenized(items, tokenizer)
    for a, b in zip(shared, alone):
        step_eval._teacher_forced(policy, a, opening)
        step_eval._teacher_forced(policy, b)
        assert a.nll == pytest.approx(b.nll, abs=1e-4) and a.ids == b.ids
        for (ka, va), (kb, vb) in zip(a.kv, b.kv):
            assert ka.shape == kb.shape and torch.allclose(ka, kb, atol=1e-4)
            assert torch.allclose(va, vb, atol=1e-4)
    # two environments, 3 trajectories each: each opening computed once and read twice
    assert opening.reused_tokens == 2 * sum(opening.length.values())


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_decoder_equals_generating_each_prompt_alone(chatty_model, tokenizer, lora):
    """Prompts that leave their cached history early (many tokens of their own: the row slots
    grow), late, or not at all, decoded 2 at a time with refills, give the tokens of plain
    greedy generation; a LoRA-wrapped model too."""
    from peft import LoraConfig, get_peft_model

    model = chatty_model
    if lora:
        model = get_peft_model(chatty_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    assert step_eval.SharedPrefixDecoder.supports(model)
    g = torch.Generator().manual_seed(1)
    history = torch.randint(5, 4000, (40,), generator=g).tolist()
    other = torch.randint(5, 4000, (30,), generator=g).tolist()
    prompts = [history[:10] + other[:12], history[:39], history[:25] + other[:1], history[:3]]
    alone = Policy(model, tokenizer, max_new_tokens=6, reuse_cache=False)
    with torch.no_grad():
        kv = model(input_ids=torch.tensor([history]), use_cache=True).past_key_values
    kv = [(layer.keys[0], layer.values[0]) for layer in kv.layers]
    decoder = step_eval.SharedPrefixDecoder(model, tokenizer, max_new_tokens=6, slots=2,
                                            stop=alone.stop, pad=alone.pad)
    out = decoder.decode([("h", history, kv, prompts), ("h2", history, kv, prompts[:1])])
    for j, p in enumerate(prompts):
        assert out[("h", j)] == alone.generate([p])[0], j
    assert out[("h2", 0)] == out[("h", 0)]
    assert decoder.reused_tokens == 10 + 38 + 25 + 2 + 10  # >= 1 token of each prompt is fed
    # more slots than prompts: the idle ones are dropped before the first forward
    wide = step_eval.SharedPrefixDecoder(model, tokenizer, max_new_tokens=6, slots=16,
                                         stop=alone.stop, pad=alone.pad)
    assert wide.decode([("h", history, kv, prompts)]) == {k: v for k, v in out.items() if k[0] == "h"}
    if lora:
        model.unload()


@pytest.mark.gpu
def test_step_scoring_on_cuda_equals_scoring_on_the_cpu(chatty_model, tokenizer, tmp_path):
    """On a CUDA device (where the decoder's attention runs in plain tensor ops instead of the
    CPU's fused flash kernel) every step's greedy turn and NLL equal those on the CPU."""
    import copy

    items = _items(tmp_path)
    on_cpu = step_eval.score(chatty_model, tokenizer, items, batch_size=3, max_new_tokens=12)
    model = copy.deepcopy(chatty_model).to("cuda")
    assert step_eval.SharedPrefixDecoder.supports(model)
    on_gpu = step_eval.score(model, tokenizer, items, batch_size=3, max_new_tokens=12)
    assert len(on_gpu) == len(on_cpu) > 10
    for a, b in zip(on_cpu, on_gpu):
        assert (a["task"], a["step"], a["response"]) == (b["task"], b["step"], b["response"])
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-3)


def test_models_with_sliding_windows_are_decoded_by_the_policy():
    mistral = load_model(config={"model_type": "mistral", "vocab_size": 64, "hidden_size": 16,
                                 "intermediate_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "sliding_window": 8})
    assert not step_eval.SharedPrefixDecoder.supports(mistral)


class ScriptedPolicy(Policy):
    """Answers each step with ``answer(trajectory, step)``; the rest is the real Policy."""

    def __init__(self, model, tokenizer, items, answer):
        super().__init__(model, tokenizer, max_new_tokens=4)
        self.by_id = {t.id: t for t, *_ in items}
        self.answer = answer

    def generate(self, prompts, keys=None, remember=True):
        out = []
        for key in keys:
            tid, step = key.removeprefix("step-eval/").rsplit("/", 1)
            out.append(self.answer(self.by_id[tid], int(step)))
        return out


def _wrong(t, step):
    expert = t.steps[step].message.content.split("Action: ")[1]
    options = ["move[north]", "move[south]"] if t.env == "maze" else ["turn left", "turn right"]
    return next(a for a in options if a != expert)


@pytest.mark.parametrize("answer,accuracy,no_action", [
    (lambda t, s: t.steps[s].message.content, 100.0, False),                     # the expert
    (lambda t, s: "Thought: " + t.steps[s].message.content.split("Action:")[0], 0.0, True),
    (lambda t, s: "Thought: ok\nAction: " + _wrong(t, s), 0.0, False),  # valid, not the expert's
])
def test_accuracy_counts_the_expert_action(chatty_model, tokenizer, tmp_path, answer, accuracy,
                                           no_action):
    items = _items(tmp_path)
    policy = ScriptedPolicy(chatty_model, tokenizer, items, answer)
    records = step_eval.score(chatty_model, tokenizer, items, batch_size=4, policy=policy)
    summary = step_eval.summarize(records, {"babyai": "held_in", "maze": "held_out"})
    for env in ("babyai", "maze"):
        r = summary["environments"][env]
        assert r["accuracy"]["value"] == accuracy
        assert (r["no_action"] == r["steps"]) == no_action
    assert set(summary["averages"]) == {"held_in", "held_out"}
    crit = summary["averages"]["held_in"]["by_criterion"]
    assert sum(c["steps"] for c in crit.values()) == summary["averages"]["held_in"]["steps"]
    assert set(crit) <= set(step_eval.CRITERIA) and step_eval.UNMARKED in crit
    same = step_eval.paired_difference(records, records, "held_in")
    assert same["value"] == 0 and not same["resolved"]


def test_synonyms_of_the_expert_action_count(chatty_model, tokenizer, tmp_path):
    """'move north' is maze's 'move[north]': the same action as the environment reads it."""
    items = [i for i in _items(tmp_path) if i[1] == "held_out"]

    def alias(t, s):
        action = t.steps[s].message.content.split("Action: ")[1]
        return "Thought: x\nAction: go " + action.removeprefix("move[").rstrip("]").upper()

    records = step_eval.score(chatty_model, tokenizer, items, policy=ScriptedPolicy(
        chatty_model, tokenizer, items, alias))
    assert records and all(r["correct"] for r in records)


def test_evaluate_writes_steps_and_compares_with_the_cached_base_model(chatty_model, tokenizer,
                                                                      tmp_path, cache, monkeypatch):
    eval_cfg = _eval_cfg("eval.steps.tasks=2", "eval.steps.baseline=true", "eval.episodes=0")
    base_cfg = OmegaConf.load(CONF / "model" / "tiny_llama.yaml")
    results = evaluate(chatty_model, tokenizer, eval_cfg, tmp_path / "a", base_model=base_cfg,
                       training=read_trajectories(ROOT / "atlas" / "data" / "default" / "babyai.jsonl"))
    steps = results["steps"]
    assert set(steps["environments"]) == {"babyai", "maze"}
    for r in steps["environments"].values():
        assert r["accuracy"]["low"] <= r["accuracy"]["value"] <= r["accuracy"]["high"]
    assert steps["overlap_with_training"] == 0
    assert "episodes_file" not in results and results["environments"] == {}
    lines = (tmp_path / "a" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == sum(r["steps"] for r in steps["environments"].values())
    assert set(results["baseline"]["difference"]) == {"held_in", "held_out"}
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["steps"]["averages"] == steps["averages"]
    # the base model's records come from the cache the second time: it is not loaded again
    import atlas.model

    monkeypatch.setattr(atlas.model, "load_model", lambda **k: pytest.fail("base model reloaded"))
    again = evaluate(chatty_model, tokenizer, eval_cfg, tmp_path / "b", base_model=base_cfg)
    assert again["baseline"]["steps"] == results["baseline"]["steps"]
    assert (tmp_path / "b" / "steps_base.jsonl").read_text() == (tmp_path / "a" / "steps_base.jsonl").read_text()
    # cached turns are judged again with today's parser, not with the verdicts stored beside them
    cached = next((cache / "step_eval").glob("base-*.jsonl"))
    stale = [json.loads(line) for line in cached.read_text().splitlines()]
    first = stale[0]
    expert = first["expert_action"]
    stale[0] = {**first, "response": "Thought: the expert's move. Action: " + str(expert),
                "action": None, "correct": False}
    cached.write_text("".join(json.dumps(r) + "\n" for r in stale))
    third = evaluate(chatty_model, tokenizer, eval_cfg, tmp_path / "c", base_model=base_cfg)
    rescored = json.loads((tmp_path / "c" / "steps_base.jsonl").read_text().splitlines()[0])
    assert rescored["correct"] and rescored["action"] == expert


def test_episodes_are_set_per_environment(chatty_model, tokenizer, tmp_path):
    """``eval.episodes`` by environment name or group, like ``eval.steps.tasks``: only the
    environments given a count are played, and only they appear in the rollout results."""
    eval_cfg = _eval_cfg("eval.steps.tasks=0", "eval.episodes={maze: 2}")
    results = evaluate(chatty_model, tokenizer, eval_cfg, tmp_path / "a")
    assert list(results["environments"]) == ["maze"] and results["environments"]["maze"]["episodes"] == 2
    assert set(results["averages"]) == {"held_out"}
    played = [json.loads(line)["meta"]["env"] for line in (tmp_path / "a" / "episodes.jsonl").open()]
    assert played == ["maze", "maze"]
    results = evaluate(chatty_model, tokenizer, _eval_cfg("eval.steps.tasks=0",
                                                          "eval.episodes={held_in: 1, maze: 0}"),
                       tmp_path / "b")
    assert {n: r["episodes"] for n, r in results["environments"].items()} == {"babyai": 1}
    with pytest.raises(ValueError, match=r"eval.episodes.maze must be a count >= 0 .* got -1"):
        evaluate(None, None, _eval_cfg("eval.episodes={maze: -1}"), tmp_path)


def test_episode_tasks_choose_the_families_rollouts_play(chatty_model, tokenizer, tmp_path, cache):
    """``eval.episode_tasks`` narrows the rollouts of one environment to some task families (the
    same test seeds in every job); the step-level evaluation keeps the environment's own."""
    eval_cfg = _eval_cfg("eval.steps.tasks={babyai: 2}", "eval.episodes={babyai: 3}",
                         "eval.episode_tasks={babyai: [BabyAI-PickupLoc-v0]}")
    results = evaluate(chatty_model, tokenizer, eval_cfg, tmp_path / "a")
    played = [json.loads(line)["meta"]["id"] for line in (tmp_path / "a" / "episodes.jsonl").open()]
    assert played == [f"babyai/BabyAI-PickupLoc-v0/test/{1_000_000 + i}" for i in range(3)]
    scored = {json.loads(line)["task"].split("/")[1] for line in (tmp_path / "a" / "steps.jsonl").open()}
    assert scored == {"BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"}
    assert results["environments"]["babyai"]["episodes"] == 3
    # null: the environment's own families (how an experiment's entry is dropped)
    assert episode_tasks(_eval_cfg("eval.episode_tasks={babyai: null}"), environments(eval_cfg)) == {}
    for override, message in [
            ("eval.episode_tasks={wordle: [x]}", r"eval.episode_tasks.wordle: no environment 'wordle'"),
            ("eval.episode_tasks={babyai: [coin]}",
             r"eval.episode_tasks.babyai: 'coin' is not one of environment babyai's task families"),
            (("+env@eval.held_out.web=agentgym_webshop", "eval.episode_tasks={webshop: [x]}"),
             r"eval.episode_tasks.webshop: environment webshop plays tasks by index"),
            ("eval.episode_tasks={babyai: []}", r"eval.episode_tasks.babyai must be a non-empty list"),
            ("eval.episode_tasks={babyai: coin}", r"eval.episode_tasks.babyai must be a non-empty list"),
            ("eval.episode_tasks=[coin]", r"eval.episode_tasks must map environment names")]:
        with pytest.raises(ValueError, match=message):
            evaluate(None, None, _eval_cfg("eval.steps.tasks=0", *(
                (override,) if isinstance(override, str) else override)), tmp_path)


def test_bad_step_config_is_named(tmp_path, cache):
    with pytest.raises(ValueError, match="eval.steps.tasks must be a count >= 0"):
        evaluate(None, None, _eval_cfg("eval.steps.tasks=-1"), tmp_path)
    with pytest.raises(ValueError, match=r"eval.steps.tasks.held_out must be a count >= 0 .* got 'x'"):
        evaluate(None, None, _eval_cfg("eval.steps.tasks={babyai: 1, held_out: x}"), tmp_path)
    for key in ("batch_size", "segment"):
        with pytest.raises(ValueError, match=f"eval.steps.{key} must be >= 1"):
            evaluate(None, None, _eval_cfg(f"eval.steps.{key}=0"), tmp_path)
    envs = environments(_eval_cfg())
    assert set(envs) == {"babyai", "maze"}
