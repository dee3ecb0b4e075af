"""eval.backend=server: rollouts through an OpenAI-compatible completions server.

The tiny model is served through the completions API by atlas's reference server (in a thread,
or started by evaluate.py from ``eval.server.command`` as a real process); greedy responses and
whole episodes must equal those of the in-process ``hf`` backend.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hydra import compose, initialize_config_dir

from atlas.jobs.evaluate import evaluate as evaluate_run
from atlas.rollout import EnvPool, Policy, run_episodes
from atlas.serving import InferenceServer, ReferenceServer, ServerError, ServerPolicy
from atlas.utils import ConfigError
from tests.helpers import CONF
from tests.helpers import make_maze as _maze

CHATS = [[{"role": "system", "content": "You are an agent."},
          {"role": "user", "content": "Task: go north " * (i + 1)}] for i in range(4)]


@pytest.mark.parametrize("stop_after", [None, 12])
def test_server_responses_equal_the_hf_backend(chatty_model, tokenizer, stop_after):
    """Greedy, the same token ids in, the same text out; with a response that completes early
    (here: at 12 characters), both stop at the same token."""
    complete = (lambda t: len(t) >= stop_after) if stop_after else (lambda t: False)
    hf = Policy(chatty_model, tokenizer, max_new_tokens=24, complete=complete)
    prompts = [hf.prompt_ids(c) for c in CHATS]
    expected = hf.generate(prompts)
    with ReferenceServer(chatty_model, tokenizer, name="tiny") as server:
        policy = ServerPolicy(tokenizer, server.url, "tiny", max_new_tokens=24, complete=complete,
                              concurrency=4)
        assert policy.prompt_ids(CHATS[0]) == prompts[0]
        got = policy.generate(prompts)
        policy.close()
    assert got == expected
    assert len(set(got)) == len(got) and all(got)  # the prompts gave different, non-empty text
    if stop_after:
        assert all(len(t) < 24 * 4 for t in got) and all(len(t) >= stop_after - 1 for t in got)


def test_greedy_episodes_equal_the_hf_backend(chatty_model, tokenizer):
    """The rollout loop, three turns of four maze episodes, four in flight at once."""
    def play(policy):
        pool = EnvPool({"maze": _maze}, instances=4)
        try:
            tasks = pool.tasks("test", 4)
            episodes = run_episodes(policy, pool, tasks, batch_size=4, max_turns=3)
        finally:
            pool.close()
        return [[(m.role, m.content) for m in ep.trajectory.messages] for ep in episodes]

    expected = play(Policy(chatty_model, tokenizer, max_new_tokens=20))
    with ReferenceServer(chatty_model, tokenizer) as server:
        policy = ServerPolicy(tokenizer, server.url, "atlas", max_new_tokens=20, concurrency=4)
        assert play(policy) == expected
        policy.close()
    # each episode: its task, then 3 turns with the 2 replies between them
    assert [[role for role, _ in t].count("assistant") for t in expected] == [3] * 4


def _compose(tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=[
            "model=tiny_llama", "eval=smoke", "logger=none", "eval.steps.tasks=0",
            "eval.episodes=2", f"paths.output_dir={tmp_path}", *overrides])


def test_evaluate_starts_the_server_from_its_command_and_stops_it(tmp_path, checkpoint):
    """evaluate.py checkpoint=... eval.backend=server eval.server.command=...: the server is a
    real process started from the template, asked for its model name, and stopped at the end;
    the episodes are those of eval.backend=hf."""
    command = "{python} -m atlas.serving --model {model} --port {port} --name served"
    results = evaluate_run(_compose(tmp_path / "server", f"checkpoint={checkpoint}",
                                    "eval.backend=server", f"eval.server.command='{command}'"))
    log = (tmp_path / "server" / "server.log").read_text()
    pid = int(re.search(r"\(pid (\d+)\)", log).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped (and reaped) when the evaluation ended
    reference = evaluate_run(_compose(tmp_path / "hf", f"checkpoint={checkpoint}"))

    def transcripts(path):
        return [[m["content"] for m in json.loads(line)["messages"]]
                for line in (path / "episodes.jsonl").read_text().splitlines()]

    assert transcripts(tmp_path / "server") == transcripts(tmp_path / "hf")
    assert len(transcripts(tmp_path / "server")) == 4  # 2 tasks in each of 2 environments
    assert results["averages"] == reference["averages"]


def test_a_server_that_exits_before_it_is_ready_is_one_clear_error(tmp_path):
    cfg = _compose(tmp_path, "eval.backend=server",
                   "eval.server.command='{python} -c \"import sys; print(42); sys.exit(3)\"'")
    with pytest.raises(ServerError, match=r"eval.server.command exited with status 3 before it "
                                          r"answered \(its output: .*server.log\)"):
        evaluate_run(cfg)
    assert (tmp_path / "server.log").read_text().strip() == "42"


@pytest.mark.parametrize("overrides, message", [
    (["eval.backend=vllm"], "eval.backend must be one of ('hf', 'server'), got 'vllm'"),
    (["eval.backend=server"], "needs exactly one of eval.server.base_url"),
    (["eval.backend=server", "eval.server.command='serve {modle}'"],
     "eval.server.command='serve {modle}': KeyError 'modle'; placeholders are"),
])
def test_bad_server_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate_run(_compose(tmp_path, *overrides))


def test_an_unreachable_server_fails_the_request_clearly(tokenizer):
    from atlas.serving import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    policy = ServerPolicy(tokenizer, url, "m", max_new_tokens=4)
    policy.client = policy.client.with_options(max_retries=0)
    with pytest.raises(ServerError, match=f"completion request to {re.escape(url)} failed: "
                                          f"APIConnectionError"):
        policy.generate([[1, 2, 3]])
    policy.close()
    with pytest.raises(ServerError, match="did not answer"):
        InferenceServer(base_url=url, startup_timeout=0).wait_ready()


def test_an_adapter_needs_the_name_it_is_served_under():
    """Servers list the base model first: scoring it instead of the adapter would be silent."""
    server = InferenceServer(base_url="http://127.0.0.1:1/v1", adapter="/runs/0/model")
    with pytest.raises(ConfigError, match="eval.server.model must name the served LoRA adapter"):
        server.served_model(None)
    assert server.served_model("atlas") == "atlas"


def test_the_reference_server_is_ready_only_with_health(chatty_model, tokenizer):
    """Readiness needs /v1/models and /health (llama.cpp lists models while still loading)."""
    with ReferenceServer(chatty_model, tokenizer) as s:
        server = InferenceServer(base_url=s.url, startup_timeout=5)
        server.wait_ready()
        assert server._healthy()
