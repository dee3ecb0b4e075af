"""atlas/utils.py: closed sets of config strings, counts set per environment."""

from __future__ import annotations

import json

import pytest

from atlas.data.masking import Granularity
from atlas.rollout import EpisodeStatus
from atlas.utils import ConfigError, per_environment


def test_a_choice_is_converted_once_and_reads_as_its_string():
    g = Granularity.of("action", "selector.granularity")
    assert g is Granularity.ACTION and g == "action"
    assert str(g) == f"{g}" == "%s" % g == "action" and json.dumps({"g": g}) == '{"g": "action"}'
    assert str(EpisodeStatus.MAX_TURNS) == "max_turns"
    with pytest.raises(ConfigError, match=r"^selector.granularity must be one of step, action, "
                                          r"thought, got 'tokens'$"):
        Granularity.of("tokens", "selector.granularity")


@pytest.mark.parametrize("setting,expected", [
    (3, {"a": 3, "b": 3}),
    ({"a": 2}, {"a": 2, "b": 0}),
    ({"held_in": 4, "b": 1}, {"a": 4, "b": 1}),
])
def test_counts_are_set_for_all_by_name_or_by_group(setting, expected):
    groups = {"a": "held_in", "b": "held_out"}
    assert {n: per_environment(setting, n, g, "eval.episodes") for n, g in groups.items()} == expected


@pytest.mark.parametrize("setting,message", [
    (-1, "eval.episodes must be a count >= 0"), ({"a": "x"}, "eval.episodes.a must be a count"),
    (True, "eval.episodes must be a count"), ({"held_in": 1.5}, "eval.episodes.held_in must be")])
def test_bad_counts_name_their_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        per_environment(setting, "a", "held_in", "eval.episodes")
