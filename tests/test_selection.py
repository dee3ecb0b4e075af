"""Selectors: the shared k(ratio, n), candidates from the source file, determinism."""

import json

import pytest

from atlas.data import read_trajectories
from atlas.selection import FullSelector, RandomSelector, build_selector, num_selected
from tests.helpers import compose_train


@pytest.mark.parametrize("ratio,n,k", [
    (0.3, 1, 1), (0.3, 2, 1), (0.3, 3, 1), (0.3, 4, 1), (0.3, 7, 2), (0.3, 10, 3), (0.3, 20, 6),
    (0.1, 5, 1), (0.1, 30, 3), (0.5, 5, 2), (0.5, 6, 3), (1.0, 7, 7), (0.7, 10, 7), (0.3, 0, 0),
])
def test_k_is_at_most_ratio_but_at_least_one(ratio, n, k):
    assert num_selected(ratio, n) == k


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "abc", None, True])
def test_bad_ratio_is_refused_up_front(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        RandomSelector(ratio=ratio)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_selectors_from_config_keep_the_same_k(shared_data, tmp_path, ratio):
    trajs = read_trajectories(shared_data / "fireact/multitask.jsonl")
    cfg = compose_train(tmp_path, "selector=random", f"ratio={ratio}", "seed=3")
    random_sel = build_selector(cfg.selector)[0].select(trajs)
    for t, s in zip(trajs, random_sel):
        assert len(s.selected_steps) == num_selected(ratio, t.num_steps)
    full = build_selector(compose_train(tmp_path, "selector=full").selector)[0].select(trajs)
    assert all(s.selected_steps == list(range(t.num_steps)) for t, s in zip(trajs, full))


def test_random_depends_on_seed_and_id_not_on_order(shared_data):
    trajs = read_trajectories(shared_data / "fireact/multitask.jsonl")
    trajs = [t for t in trajs if t.num_steps >= 4]
    a = RandomSelector(0.5, seed=0).select(trajs)
    b = RandomSelector(0.5, seed=0).select(list(reversed(trajs)))[::-1]
    c = RandomSelector(0.5, seed=1).select(trajs)
    assert [t.selected_steps for t in a] == [t.selected_steps for t in b]
    assert [t.selected_steps for t in a] != [t.selected_steps for t in c]


def test_source_mask_limits_the_candidates(shared_data):
    """AgentGym's loss:false scripted reply is never a candidate, for any selector."""
    [t] = read_trajectories(shared_data / "agentinstruct-sample/agenttuning_alfworld_sample_record0.json")
    candidates = t.selected_steps
    assert 0 not in candidates
    assert FullSelector().select([t])[0].selected_steps == candidates
    for seed in range(20):
        chosen = RandomSelector(0.3, seed=seed).select([t])[0].selected_steps
        assert 0 not in chosen and len(chosen) == num_selected(0.3, len(candidates))


# ---- every selector, from the configs ------------------------------------------------------------

from atlas.data.formats import read_trajectories as _read  # noqa: E402
from atlas.selection import (Selection, apply_selections, saved_selections,  # noqa: E402
                             write_selection)
from tests.helpers import ROOT, compose_select  # noqa: E402

DEFAULT = ROOT / "atlas" / "data" / "default"
RATIO_SELECTORS = ["random", "critical", "heuristic", "noncritical", "perplexity", "hybrid"]


@pytest.fixture(scope="module")
def mixed():
    """Trajectories of every default environment, with and without injected mistakes."""
    return [t for env in ("babyai", "scienceworld", "twx", "wordle")
            for t in _read(DEFAULT / f"{env}.jsonl")[:5]]


def _selector(tmp_path, name, *overrides):
    return build_selector(compose_train(tmp_path, f"selector={name}", *overrides).selector)[0]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_every_selector_keeps_the_same_k(tmp_path, mixed, ratio):
    chosen = {}
    for name in RATIO_SELECTORS:
        selections = _selector(tmp_path, name, f"ratio={ratio}").selections(mixed)
        assert all(s.ok for s in selections), name
        for t, s in zip(mixed, selections):
            assert s.k == num_selected(ratio, t.num_steps)
            assert len(s.steps) == s.k, (name, t.id)  # the heuristic oracle marks exactly k
            assert len(set(s.steps)) == s.k and set(s.steps) <= set(t.selected_steps)
        chosen[name] = [set(s.steps) for s in selections]
    # noncritical never overlaps what the same oracle marked critical
    for crit, non in zip(chosen["critical"], chosen["noncritical"]):
        assert not crit & non
    assert chosen["critical"] == chosen["heuristic"]  # the default oracle is the heuristic


def test_perplexity_ranks_steps_by_the_base_models_nll(tmp_path, mixed):
    selector = _selector(tmp_path, "perplexity", "ratio=0.3")
    selections = selector.selections(mixed[:4])
    for t, s in zip(mixed, selections):
        assert len(s.scores) == t.num_steps and all(x is None or x > 0 for x in s.scores)
        ranked = sorted(range(t.num_steps), key=lambda i: (-(s.scores[i] or -1), i))
        assert s.steps == ranked[:s.k]
    assert not selector.cacheable  # a random tiny model's scores are not cached
    # the scores are the NLL the training loss computes on that step alone
    import torch

    from atlas.data.masking import encode
    from atlas.module import masked_nll
    from atlas.model import load_model, load_tokenizer

    cfg = compose_train(tmp_path, "selector=perplexity").model
    t = next(t for t in mixed if t.num_steps >= 4)
    torch.manual_seed(0)  # the same random tiny model both times
    [s] = selector.selections([t])
    torch.manual_seed(0)
    model = load_model(**cfg).eval()
    ex = encode(t.with_selection([2]), load_tokenizer(cfg.tokenizer), max_length=None)
    logits = model(input_ids=torch.tensor([ex.input_ids])).logits
    loss, _, _ = masked_nll(logits, torch.tensor([ex.labels]), torch.tensor([ex.step_ids]))
    assert s.scores[2] == pytest.approx(loss.item(), rel=1e-4)


def test_hybrid_keeps_the_oracles_steps_and_fills_k_by_the_metric(tmp_path, mixed):
    hybrid = _selector(tmp_path, "hybrid", "ratio=0.5")
    critical = _selector(tmp_path, "critical", "ratio=0.5")
    for t, h, c in zip(mixed, hybrid.selections(mixed), critical.selections(mixed)):
        assert set(c.steps) <= set(h.steps) and len(h.steps) == h.k
        marked = [s for s in h.steps if s in c.steps]
        assert h.steps[:len(marked)] == marked  # every oracle step ranks first
        assert all(h.criteria[i] for i in range(len(marked)))
    # with no weight on the oracle it is the metric's ranking; with no weight on the metric,
    # the oracle's steps in step order, then the rest in step order
    zero = [f"selector.weights.{c}=0" for c in ("plan_creation", "critical_observation",
                                                 "critical_action", "self_correction")]
    import torch

    torch.manual_seed(0)  # the same random tiny model scores the steps in both
    metric_only = _selector(tmp_path, "hybrid", "ratio=0.5", *zero).selections(mixed)
    torch.manual_seed(0)
    perplexity = _selector(tmp_path, "perplexity", "ratio=0.5").selections(mixed)
    assert [s.steps for s in metric_only] == [s.steps for s in perplexity]
    oracle_only = _selector(tmp_path, "hybrid", "ratio=0.5", "selector.metric_weight=0")
    for t, h, c in zip(mixed, oracle_only.selections(mixed), critical.selections(mixed)):
        assert h.steps == (sorted(c.steps) + [s for s in range(t.num_steps)
                                              if s not in c.steps])[:h.k]


def test_selection_file_records_and_exports_the_choice(tmp_path, mixed):
    selector = _selector(tmp_path, "critical", "ratio=0.3")
    selections = selector.selections(mixed)
    selections[1] = Selection(trajectory_id=mixed[1].id, fingerprint=mixed[1].fingerprint(),
                              signature=selector.signature(), k=selections[1].k, steps=[],
                              status="failed", error="invalid answer twice")
    files = write_selection(tmp_path, mixed, selections)
    saved = _read(files["selection"])
    assert [t.id for t in saved] == [t.id for t in mixed]
    meta = saved[0].meta["selection"]
    assert meta["signature"] == {"selector": "critical", "ratio": 0.3, "oracle": "heuristic",
                                 "model": "rules", "prompt_version": "heuristic-v1"}
    assert meta["plan"] and len(meta["criteria"]) == len(meta["steps"]) == meta["k"]
    assert saved[0].selected_steps == sorted(selections[0].steps)
    step = saved[0].steps[selections[0].steps[0]].message
    assert step.criterion == selections[0].criteria[0] and step.reason == selections[0].reasons[0]
    assert saved[1].selected_steps == [] and saved[1].meta["selection"]["status"] == "failed"
    # the exports hold the valid selections as AgentGym loss flags and OpenAI weights
    gym = _read(files["agentgym"], format="agentgym")
    oai = [json.loads(line) for line in open(files["openai"])]
    assert len(gym) == len(oai) == len(mixed) - 1
    assert gym[0].selected_steps == saved[0].selected_steps
    weights = [m["weight"] for m in oai[0]["messages"] if m["role"] == "assistant"]
    assert [i for i, w in enumerate(weights) if w] == saved[0].selected_steps
    # reused only for the same selector config and the same trajectories
    none, why = saved_selections(mixed, saved, selector)
    assert none is None and "failed selection" in why  # selecting again retries it
    ok = [t for i, t in enumerate(mixed) if i != 1]
    again, why = saved_selections(ok, saved, selector)
    assert why == "" and [s.steps for s in again] == [s.steps for i, s in enumerate(selections)
                                                       if i != 1]
    assert all(s.cached for s in again)  # nothing is paid for a reused selection
    assert saved_selections(ok, saved, _selector(tmp_path, "critical", "ratio=0.5"))[0] is None
    changed = [ok[0].with_selection([0])] + ok[1:]
    none, why = saved_selections(changed, saved, selector)
    assert none is None and "has changed" in why
    # a hand-edited file cannot supervise more than k steps, or non-candidates
    edited = [t.with_selection(t.selected_steps) for t in saved]
    edited[0].meta["selection"] = {**saved[0].meta["selection"],
                                   "steps": list(range(ok[0].num_steps))}
    none, why = saved_selections(ok, edited, selector)
    assert none is None and "not" in why and ok[0].id in why
    assert apply_selections(ok, again)[0].meta["selection"]["steps"] == selections[0].steps


def test_train_reuses_a_matching_selection_file(tmp_path, caplog):
    import logging

    from atlas.jobs.train import train

    caplog.set_level(logging.INFO, logger="atlas")
    common = ["selector=critical", "ratio=0.3", "trainer.max_steps=1"]
    first = train(compose_train(tmp_path / "a", *common))
    assert first["selection"]["select/steps_selected"] > 0 and first["criteria"]
    path = tmp_path / "a" / "selection.jsonl"
    caplog.clear()
    train(compose_train(tmp_path / "b", *common, f"selection_file={path}"))
    assert "reusing the selection in" in caplog.text
    def content(file):
        return [(t.id, t.selected_steps, {k: v for k, v in t.meta["selection"].items()
                                           if k != "cached"}) for t in _read(file)]

    assert content(tmp_path / "b" / "selection.jsonl") == content(path)
    assert all(t.meta["selection"]["cached"] for t in _read(tmp_path / "b" / "selection.jsonl"))
    caplog.clear()
    train(compose_train(tmp_path / "c", "selector=critical", "ratio=0.5", "trainer.max_steps=1",
                        f"selection_file={path}"))
    assert "not reusing" in caplog.text and "selecting again" in caplog.text


def test_counterfactual_ranks_steps_by_their_cost_in_the_simulator(tmp_path):
    trajs = [t for env in ("babyai", "wordle") for t in _read(DEFAULT / f"{env}.jsonl")[:6]]
    selector = _selector(tmp_path, "counterfactual", "ratio=0.3")
    selections = selector.selections(trajs)
    assert selector.last_run == {"scored": len(trajs), "from_cache": 0}
    for t, s in zip(trajs, selections):
        assert len(s.scores) == t.num_steps and len(s.steps) == s.k
        assert min(s.scores[i] for i in s.steps) >= max(
            [s.scores[i] for i in range(t.num_steps) if i not in s.steps], default=-99)
    # scores are cached by content; ties are broken by the seed, not by step order
    again = _selector(tmp_path, "counterfactual", "ratio=0.3")
    assert [s.steps for s in again.selections(trajs)] == [s.steps for s in selections]
    assert again.last_run == {"scored": 0, "from_cache": len(trajs)}
    other = _selector(tmp_path, "counterfactual", "ratio=0.5", "seed=1").selections(trajs)
    assert [s.scores for s in other] != [s.scores for s in selections]  # other probes
    fireact = _read(ROOT / "atlas" / "data" / "fireact" / "fireact_hotpotqa.jsonl")[:1]
    with pytest.raises(ValueError, match=fireact[0].id):
        selector.selections(fireact)


@pytest.mark.parametrize("name", ["full", "random", "critical", "heuristic", "noncritical",
                                  "perplexity", "hybrid", "counterfactual"])
def test_select_job_runs_every_selector(tmp_path, name):
    from atlas.jobs.select import select as run

    summary = run(compose_select(tmp_path, f"selector={name}", "ratio=0.3"))
    assert summary["trajectories"] == 5 and summary["failed"] == 0  # 1 of 6 held out
    assert summary["selector"]["selector"] == name
    saved = _read(tmp_path / "selection.jsonl")
    assert [len(t.selected_steps) for t in saved] == [t.meta["selection"]["k"] for t in saved]
    assert json.loads((tmp_path / "selection_summary.json").read_text())["files"]


@pytest.mark.parametrize("name", ["critical", "heuristic", "noncritical", "perplexity", "hybrid",
                                  "counterfactual"])
def test_train_runs_with_each_selector(tmp_path, name):
    from atlas.jobs.train import train

    summary = train(compose_train(tmp_path, f"selector={name}", "ratio=0.3", "trainer.max_steps=1"))
    assert summary["selector"] == name and summary["global_step"] == 1
    assert summary["selection"]["select/failed"] == 0
