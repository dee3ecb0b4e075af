"""Environments over HTTP (atlas/envs/remote.py), against loopback servers (atlas/testing/envserver.py)
that serve atlas's own Maze and BabyAI in AgentGym's wire formats.

An episode played over HTTP must equal the same episode played in process; evaluate.py on
served environments must give the table of the in-process ones; and a server that is down,
slow, failing or dying must cost episodes, never the evaluation.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atlas.data.generate import expert_episode
from atlas.envs.babyai import BabyAIEnv
from atlas.envs.remote import (CLIENTS, AgentGymEnv, EnvServerError, Server, after_action, crafting_action,
                               read_indices, sql_action)
from atlas.jobs.evaluate import evaluate as evaluate_run
from atlas.rollout import EnvPool, has_complete_action, run_episodes
from atlas.utils import ConfigError
from tests.helpers import CONF, ROOT
from atlas.testing.envserver import EnvServer
from tests.helpers import ScriptedPolicy, make_maze as _maze


@pytest.fixture(autouse=True)
def fresh_servers():
    """Each test its own connection pools and down flags (a port may be reused)."""
    Server._all.clear()
    yield
    Server._all.clear()


def _babyai():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "env" / "babyai.yaml"))
    cfg.pop("_target_")
    return BabyAIEnv(**cfg)


MAZE = "atlas.envs.maze.MazeEnv"


def _remote(server, client=MAZE, n=4, name="maze", **kw):
    kw = {"max_turns": 40, "retries": 2, "backoff": 0.01, **kw}
    return lambda: AgentGymEnv(name, server.url, client, {"test": f"0:{n}"}, **kw)


def play_experts(factory, server_factory, n, instances=2, **kw):
    """n expert episodes of the in-process environment, replayed over HTTP: (in-process
    episodes, HTTP episodes, the server's counters)."""
    env = factory()
    experts = [expert_episode(env, t) for t in env.tasks("test", n)]
    env.close()
    pool = EnvPool({"maze": server_factory}, instances=instances)
    try:
        tasks = pool.tasks("test", n)
        policy = ScriptedPolicy({t.id: [s.message.content for s in e.steps]
                                 for t, e in zip(tasks, experts)})
        episodes = run_episodes(policy, pool, tasks, batch_size=n, **kw)
    finally:
        pool.close()
    return experts, episodes


@pytest.mark.parametrize("factory", [_maze, _babyai], ids=["maze", "babyai"])
def test_expert_episodes_over_http_equal_those_in_process(factory):
    """The same conversation, turn for turn, the same outcome; the episodes of a turn step
    together, never more requests in flight than the server's concurrency; every connection
    closed at the end."""
    with EnvServer(factory) as server:
        server.gather("step", 2)  # the first step waits for a second one
        client = MAZE if factory is _maze else "atlas.envs.babyai.BabyAIEnv"
        experts, episodes = play_experts(factory, _remote(server, client, n=6, concurrency=2),
                                         6, instances=3)
        assert server.wait_closed(), f"{server.connections} connections left open"
    assert [ep.status for ep in episodes] == ["success"] * 6
    for ep, expert in zip(episodes, experts):
        assert ep.trajectory.chat() == expert.chat()
        assert ep.score == pytest.approx(expert.meta["score"])
    assert server.counts["create"] == 3 and server.counts["close"] == 3  # one id per instance
    assert server.counts["reset"] == 6
    assert server.max_in_flight == 2


def test_agentgym_wire_formats_and_conversations():
    """WebShop's protocol (a bare env_idx, reset [observation, null], the first observation from
    GET /observation, the step's "state") and SciWorld's (task description + observation,
    scores 0-100), each opening with its client's instruction and the model's "OK"."""
    for style, client in (("webshop", "webshop"), ("sciworld", "sciworld")):
        with EnvServer(_maze, style=style) as server:
            experts, episodes = play_experts(_maze, _remote(server, client, n=2), 2)
            assert server.wait_closed()
        for ep, expert in zip(episodes, experts):
            assert ep.status == "success" and ep.score == 1.0
            chat = ep.trajectory.chat()
            assert chat[0]["role"] == "user" and chat[0]["content"].startswith(
                "You are web shopping." if style == "webshop" else "You are an agent for science")
            assert chat[1] == {"role": "assistant", "content": "Ok." if style == "webshop" else
                               "OK. I'll follow your instructions and try my best to solve the task."}
            # the first observation as the client builds it, later ones bare (no "Observation: ")
            expected = expert.chat()
            assert chat[2]["content"] == expected[1]["content"]
            assert chat[4]["content"] == expected[3]["content"].removeprefix("Observation: ")


def test_agentgym_action_readers():
    assert after_action("Thought:\nI go.\n\nAction:\nclick[Buy Now]") == "click[Buy Now]"
    assert after_action("search[red shoes]") == "search[red shoes]"  # no Action: the whole text
    assert crafting_action("Thought: ok\nAction: craft 1 stick using 2 planks!\nInstruction: x") == \
        "craft 1 stick using 2 planks"
    assert sql_action("Thought: t\nAction: ```sql\nSELECT 1;\n```") == "SELECT 1;"
    # decoding stops at a complete action: SQLGym's once its ``` block is closed
    assert not has_complete_action("Thought: t\nAction: ```sql\nSELECT 1;\n")
    assert has_complete_action("Thought: t\nAction: ```sql\nSELECT 1;\n```\n")
    assert has_complete_action("Thought: t\nAction: move[north]\n")


def test_indices_from_config(tmp_path):
    assert read_indices([3, 1, 2], "k") == [3, 1, 2]
    assert read_indices("2:5", "k") == [2, 3, 4]
    f = tmp_path / "babyai_test.json"
    f.write_text(json.dumps([{"item_id": "babyai_1804"}, {"item_id": "babyai_7"}]))
    assert read_indices(str(f), "k") == [1804, 7]
    f.write_text(json.dumps([{"id": 3}]))
    with pytest.raises(ConfigError, match=r"k: .*babyai_test.json: not an AgentEval list"):
        read_indices(str(f), "k")
    for bad in ("nope", [1, -2], 5):
        with pytest.raises(ConfigError, match="k"):
            read_indices(bad, "k")


def test_tasks_need_indices_and_are_capped_by_the_list(caplog):
    with EnvServer(_maze) as server:
        env = AgentGymEnv("maze", server.url, MAZE, {"test": "0:3"})
        with caplog.at_level(logging.WARNING):
            assert [t.seed for t in env.tasks("test", 5)] == [0, 1, 2]
        assert "5 tasks asked, 3 listed" in caplog.text
        with pytest.raises(ConfigError, match=r"env maze: indices.train is not set"):
            env.tasks("train", 1)
        env.close()
        with pytest.raises(ConfigError, match="env maze: client='nowhere'"):
            AgentGymEnv("maze", server.url, "nowhere", {})
        with pytest.raises(ConfigError, match="env maze: retries must be >= 0"):
            AgentGymEnv("maze", server.url, MAZE, {}, retries=-1)


def test_a_server_that_is_down_at_start_is_one_line_naming_its_url(tmp_path):
    with EnvServer(_maze) as server:
        url = server.url
    with pytest.raises(EnvServerError, match=f"env maze: no environment server at {url} "
                                             r"\(cannot connect"):
        AgentGymEnv("maze", url, MAZE, {"test": "0:1"}, retries=1, backoff=0.01)
    out = subprocess.run(
        [sys.executable, "evaluate.py", "model=tiny_llama", "eval=smoke", "logger=none",
         "eval.steps.tasks=0", "~eval.held_in.babyai", "env@eval.held_out.maze=remote",
         "eval.held_out.maze.name=maze", f"eval.held_out.maze.client={MAZE}",
         f"eval.held_out.maze.url={url}", "eval.held_out.maze.retries=0",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: env maze: no environment server at {url} (cannot connect")


@pytest.mark.parametrize("fault", ["5xx", "timeout"])
def test_a_failed_or_slow_request_is_retried(fault):
    with EnvServer(_maze) as server:
        if fault == "5xx":
            server.fail("step", 503, 502)  # two retries allowed
        else:
            server.stall("step")  # held unanswered: the client gives up after `timeout`
        experts, episodes = play_experts(_maze, _remote(server, n=2, timeout=5), 2)
        assert fault == "5xx" or server.stalled.is_set()
        server.release()
    assert [ep.status for ep in episodes] == ["success"] * 2
    assert [ep.trajectory.chat() for ep in episodes] == [e.chat() for e in experts]
    assert server.counts["step"] == sum(len(e.steps) for e in experts) + (2 if fault == "5xx" else 1)


def test_errors_beyond_the_retries_fail_that_episode_and_the_rest_go_on():
    """An episode whose step keeps answering 500 ends with status "error" and the others are
    played; after a server dies mid-run, the episode under way and every later one end with
    status "error" (the later ones at once: the server is known to be down) and the run ends
    with every episode recorded."""
    with EnvServer(_maze) as server:
        server.fail("step", 500, 500, 500)  # the first step: 1 try + 2 retries
        experts, episodes = play_experts(_maze, _remote(server, n=4), 4, instances=1)
    assert episodes[0].status == "error" and "too many failed attempts" in episodes[0].error
    assert [ep.status for ep in episodes[1:]] == ["success"] * 3

    with EnvServer(_maze) as server:
        server.die_after("step", 3)
        experts, episodes = play_experts(_maze, _remote(server, n=4), 4, instances=1)
    assert [ep.status for ep in episodes] == ["error"] * 4
    assert episodes[0].error.startswith(f"step 4: EnvServerError: POST {server.url}/step: ")
    for ep in episodes[1:]:  # never started: the server is down
        assert ep.error.startswith(f"start: EnvServerError: env maze: no environment server at "
                                   f"{server.url} (cannot connect")
        assert ep.turns == 0


def _evaluate(tmp_path, checkpoint, *overrides):  # noqa: F811
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny_llama", "eval=smoke", "logger=none", "eval.steps.tasks=0",
            "eval.episodes=2", "eval.max_turns=3", f"checkpoint={checkpoint}",
            f"paths.output_dir={tmp_path}", *overrides])
    return evaluate_run(cfg)


def _served(group, name, cls, url):
    return [f"env@eval.{group}.{name}=remote", f"eval.{group}.{name}.name={name}",
            f"eval.{group}.{name}.client={cls}", f"eval.{group}.{name}.url={url}",
            f"eval.{group}.{name}.indices.test=0:2"]


def test_evaluate_on_served_environments_gives_the_in_process_table(tmp_path, checkpoint):  # noqa: F811
    """evaluate.py with both environments of the suite on loopback servers: the same episodes,
    the same results table as in process."""
    reference = _evaluate(tmp_path / "local", checkpoint)
    with EnvServer(_babyai) as babyai, EnvServer(_maze) as maze:
        served = _evaluate(tmp_path / "http", checkpoint, "eval.steps.tasks=1",
                           *_served("held_in", "babyai", "atlas.envs.babyai.BabyAIEnv", babyai.url),
                           *_served("held_out", "maze", MAZE, maze.url))
        assert babyai.wait_closed() and maze.wait_closed()

    def transcripts(path):
        return [[m["content"] for m in json.loads(line)["messages"]]
                for line in (path / "episodes.jsonl").read_text().splitlines()]

    assert transcripts(tmp_path / "http") == transcripts(tmp_path / "local")
    assert served["environments"] == reference["environments"]
    assert served["averages"] == reference["averages"]
    assert "steps" not in served  # no expert on a server: rollouts only (with a warning)


def test_evaluate_with_the_agentgym_suite(tmp_path, checkpoint):  # noqa: F811
    """eval=agentgym, with WebShop and SciWorld pointed at loopback servers in their wire
    formats (the other environments dropped): the episodes open as AgentGym's clients open
    them, the table has both, and test indices may be a list."""
    with EnvServer(_maze, style="webshop") as shop, EnvServer(_maze, style="sciworld") as sci:
        results = _evaluate(
            tmp_path, checkpoint, "eval=agentgym", "~eval.held_in.alfworld",
            "~eval.held_in.babyai", "~eval.held_in.textcraft", "eval.episodes=2",
            "eval.max_turns=2", "eval.batch_size=4", "eval.generation.max_new_tokens=12",
            f"eval.held_in.webshop.url={shop.url}", "eval.held_in.webshop.indices.test=[1,0]",
            f"eval.held_in.sciworld.url={sci.url}", "eval.held_in.sciworld.indices.test=0:2")
        assert shop.wait_closed() and sci.wait_closed()
    assert sorted(results["environments"]) == ["sciworld", "webshop"]
    assert all(r["episodes"] == 2 and r["errors"] == 0 for r in results["environments"].values())
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted(e["meta"]["id"] for e in episodes) == [
        "sciworld/sciworld/test/0", "sciworld/sciworld/test/1",
        "webshop/webshop/test/0", "webshop/webshop/test/1"]
    for e in episodes:
        first = e["messages"][0]["content"]
        assert first.startswith("You are web shopping." if e["env"] == "webshop"
                                else "You are an agent for science world.")
    assert shop.counts["step"] >= 2 and sci.counts["step"] >= 2


def test_the_agentgym_suite_composes_and_refuses_tool_calls(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval=agentgym", "action_format=tools",
                                             f"paths.output_dir={tmp_path}"])
    assert sorted(cfg.eval.held_in) == ["alfworld", "babyai", "sciworld", "textcraft", "webshop"]
    assert cfg.eval.held_in.webshop.url == "http://127.0.0.1:36006"
    configs = sorted(p.stem for p in (CONF / "env").glob("agentgym_*.yaml"))
    assert [c.removeprefix("agentgym_") for c in configs] == sorted(CLIENTS)  # one per client
    from atlas.evaluation import environments
    with pytest.raises(ConfigError, match="environment .* is played only with action_format=text"):
        environments(cfg.eval)
