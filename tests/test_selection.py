"""Selectors: the shared k(ratio, n), candidates from the source file, determinism."""

import pytest
from hydra.utils import instantiate

from atlas.data import read_trajectories
from atlas.selection import FullSelector, RandomSelector, num_selected
from conftest import compose_train


@pytest.mark.parametrize("ratio,n,k", [
    (0.3, 1, 1), (0.3, 2, 1), (0.3, 3, 1), (0.3, 4, 1), (0.3, 7, 2), (0.3, 10, 3), (0.3, 20, 6),
    (0.1, 5, 1), (0.1, 30, 3), (0.5, 5, 2), (0.5, 6, 3), (1.0, 7, 7), (0.7, 10, 7), (0.3, 0, 0),
])
def test_k_is_at_most_ratio_but_at_least_one(ratio, n, k):
    assert num_selected(ratio, n) == k


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_bad_ratio_is_refused_up_front(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        RandomSelector(ratio=ratio)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_selectors_from_config_keep_the_same_k(shared_data, tmp_path, ratio):
    trajs = read_trajectories(shared_data / "fireact/multitask.jsonl")
    cfg = compose_train(tmp_path, "selector=random", f"ratio={ratio}", "seed=3")
    random_sel = instantiate(cfg.selector).select(trajs)
    for t, s in zip(trajs, random_sel):
        assert len(s.selected_steps) == num_selected(ratio, t.num_steps)
    full = instantiate(compose_train(tmp_path, "selector=full").selector).select(trajs)
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
