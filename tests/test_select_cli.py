"""select.py as users run it: against loopback provider servers, killed and resumed, and never
shadowing the standard library's `select` module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from atlas.data.formats import read_trajectories
from atlas.testing.fake_provider import FakeProvider
from atlas.oracle import JsonlCache
from tests.helpers import ROOT

KEY = "sk-test-SENTINEL-0123456789abcdef"


def _env(tmp_path, **extra):
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY,
           "ANTHROPIC_API_KEY": KEY, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("PYTHONPATH", None)
    return env


def _select(tmp_path, run_dir, *overrides, **popen):
    cmd = [sys.executable, "select.py", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.parametrize("command", [
    [sys.executable, "-c", "import subprocess, select; assert callable(select.select); "
                           "subprocess.run(['true'], check=True)"],
    [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_envs.py"],
    [sys.executable, "train.py", "--cfg", "job"],
])
def test_select_py_does_not_shadow_the_stdlib_module(command):
    """From the project root, `import select` finds select.py first; it must hand over."""
    assert (ROOT / "select.py").exists()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("oracle", ["openai", "anthropic"])
def test_select_py_with_a_provider_writes_the_selection_and_reuses_paid_answers(tmp_path, oracle):
    with FakeProvider() as fake:
        base = fake.url + "/v1" if oracle == "openai" else fake.url
        args = ["selector=critical", f"oracle={oracle}", f"oracle.base_url={base}", "ratio=0.3",
                "data.limit=12"]
        out = _finish(_select(tmp_path, tmp_path / "a", *args))
        asked = len(fake.requests)
        summary = json.loads((tmp_path / "a" / "selection_summary.json").read_text())
        n = summary["trajectories"]
        assert n == 11 and asked == n  # data.val_fraction=0.1 of 12 is held out, as in train.py
        assert summary["failed"] == 0 and summary["input_tokens"] > 0 and summary["cost_usd"] > 0
        assert summary["selector"]["oracle"] == oracle
        selection = read_trajectories(tmp_path / "a" / "selection.jsonl")
        meta = selection[0].meta["selection"]
        assert meta["plan"] and meta["steps"] and meta["input_tokens"] > 0
        assert meta["signature"]["prompt_version"] == "atlas-critical-v1"
        assert selection[0].selected_steps == sorted(meta["steps"])
        assert (tmp_path / "a" / "selection.agentgym.jsonl").exists()
        assert f"oracle {oracle}" in out and "this run" in out  # token and dollar totals
        # a second run pays nothing: every answer comes from the cache
        _finish(_select(tmp_path, tmp_path / "b", *args))
        assert len(fake.requests) == asked
        again = json.loads((tmp_path / "b" / "selection_summary.json").read_text())
        assert again["oracle_from_cache"] == n and again["cost_usd"] == 0
    # the key lives only in the environment: no config, log or output holds it
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="ignore"), path
    assert KEY not in out


def test_a_killed_selection_resumes_without_paying_twice(tmp_path):
    with FakeProvider(latency=0.4) as fake:
        args = ["selector=critical", "oracle=openai", f"oracle.base_url={fake.url}/v1",
                "oracle.concurrency=1", "data.limit=12", "data.val_fraction=0"]
        proc = _select(tmp_path, tmp_path / "a", *args, start_new_session=True)
        cache_file = tmp_path / "cache" / "oracle" / "openai.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not cache_file.exists()
                                          or len(cache_file.read_text().splitlines()) < 3):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        cached = len(JsonlCache(cache_file).entries)
        assert 3 <= cached < 12, cached
        before = len(fake.requests)
        _finish(_select(tmp_path, tmp_path / "b", *args))
        assert len(fake.requests) - before == 12 - cached  # only the unanswered ones
    summary = json.loads((tmp_path / "b" / "selection_summary.json").read_text())
    assert summary["trajectories"] == 12 and summary["oracle_from_cache"] == cached


def test_keys_on_the_command_line_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "select.py", "oracle=openai", f"+oracle.api_key={KEY}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert proc.returncode != 0 and "refusing to start" in proc.stderr
    assert not (ROOT / "logs" / "select").exists() or not any(
        KEY in p.read_text(errors="ignore") for p in (ROOT / "logs" / "select").rglob("*.yaml"))
