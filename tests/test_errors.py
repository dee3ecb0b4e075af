"""What a user sees when their input or config is wrong: one line on stderr, naming the file and
line (or byte) or the config key, and exit status 1; tracebacks only for bugs and under
HYDRA_FULL_ERROR=1; finished work stays on disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from atlas.data import read_trajectories
from atlas.data.datamodule import load_trajectories, split_trajectories
from atlas.testing.fake_provider import FakeProvider
from atlas.utils import one_line_errors
from tests.helpers import ROOT

KEY = "sk-test-errors-0123456789abcdef"
TINY = ["model=tiny_llama", "logger=csv", "eval_after_training=false"]


def _run(script, tmp_path, *overrides, **env):
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY,
           "HF_HUB_OFFLINE": "1", **env}
    env.pop("PYTHONPATH", None)
    env.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run([sys.executable, script, f"hydra.run.dir={tmp_path / 'run'}",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _one_line(proc) -> str:
    """The run failed with exit status 1 and exactly one line on stderr."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def _entry_point(fn, *args):
    """What an entry point prints for an error raised by ``fn``: its SystemExit message."""
    with pytest.raises(SystemExit) as e:
        with one_line_errors():
            fn(*args)
    message = str(e.value.code)
    assert e.value.code != 0 and "\n" not in message and message.startswith("error: ")
    return message


@pytest.fixture
def files(tmp_path):
    ok = {"id": "a", "env": "e", "messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "Action: go"}]}
    paths = {
        "malformed": '{"messages": [{"role": "user", "content": "q"}\n',
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
        "empty": "",
        "no_steps": json.dumps({**ok, "messages": ok["messages"][:1]}) + "\n",
        "empty_turn": json.dumps(ok) + "\n" + json.dumps(
            {**ok, "id": "b", "messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "  "}]}) + "\n",
    }
    out = {}
    for name, data in paths.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        out[name] = path
    out["missing"] = tmp_path / "missing.jsonl"
    out["directory"] = tmp_path
    return out


@pytest.mark.parametrize("case, expected", [
    ("malformed", r"malformed.jsonl:1: invalid JSON at column \d+"),
    ("binary", r"binary.jsonl:byte 0: not UTF-8 text \(a binary file\?\)"),
    ("empty", r"empty.jsonl: no trajectories in file"),
    ("missing", r"missing.jsonl: no such file"),
    ("directory", r": is a directory, not a trajectory file"),
    ("no_steps", r"no_steps.jsonl:1: a trajectory needs at least one assistant turn"),
    ("empty_turn", r"empty_turn.jsonl:2: step 0 \(message 1\) is an empty assistant turn"),
])
def test_bad_data_files_are_one_line_naming_the_file_and_line(files, case, expected):
    message = _entry_point(load_trajectories, [str(files[case])])
    assert re.search(expected, message), message


@pytest.mark.parametrize("call, expected", [
    (lambda f: load_trajectories([str(f)], format="nope"),
     "error: data.format: unknown trajectory format 'nope'; expected auto or one of atlas"),
    (lambda f: load_trajectories([]), "error: data.files is empty"),
    (lambda f: load_trajectories([str(f), str(f)]), "error: data.files: trajectory ids repeat"),
    (lambda f: split_trajectories(read_trajectories(f), 1.5), "error: data.val_fraction must be"),
    (lambda f: load_trajectories([str(f)], tasks=["coin"]),
     "error: data.tasks needs trajectories that record their task family (meta.task"),
    (lambda f: load_trajectories([str(f)], tasks="coin"),
     "error: data.tasks must be a non-empty list of task families, got 'coin'"),
])
def test_bad_config_values_are_one_line_naming_the_key(files, call, expected):
    assert _entry_point(call, files["empty_turn"].with_name("ok.jsonl")).startswith(expected)


@pytest.fixture(autouse=True)
def _ok_file(files):
    ok = files["empty_turn"].read_text().splitlines()[0]
    files["empty_turn"].with_name("ok.jsonl").write_text(ok + "\n")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        with one_line_errors():
            {}["not a user error"]


def test_train_py_prints_one_line_and_exits_1(tmp_path, files):
    """End to end through Hydra: a bad data file, and a config value Hydra's instantiate wraps."""
    line = _one_line(_run("train.py", tmp_path, *TINY, f"data.files=[{files['binary']}]"))
    assert line == f"error: {files['binary']}:byte 0: not UTF-8 text (a binary file?); " \
                   f"expected JSONL or a JSON array of trajectories"
    line = _one_line(_run("train.py", tmp_path, *TINY, "selector=random", "ratio=abc"))
    assert line == "error: ratio must be a number in (0, 1], got 'abc'"
    # the job's log file has it too
    assert "ratio must be a number" in (tmp_path / "run" / "train.log").read_text()
    # the full traceback on request
    proc = _run("train.py", tmp_path, *TINY, "selector=random", "ratio=abc", HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_train_py_checks_the_evaluation_settings_before_training(tmp_path):
    """A bad evaluation setting fails the job before the model is loaded or trained, not after
    minutes of training."""
    line = _one_line(_run("train.py", tmp_path, "model=tiny_llama", "logger=csv", "eval=smoke",
                          "data.limit=4", "eval.episode_tasks={babyai: [BabyAI-GoTo-v0]}"))
    assert line == ("error: eval.episode_tasks.babyai: 'BabyAI-GoTo-v0' is not one of environment "
                    "babyai's task families (BabyAI-GoToLocal-v0, BabyAI-PickupLoc-v0, "
                    "BabyAI-OpenDoor-v0, BabyAI-PutNextLocal-v0)")
    assert not (tmp_path / "run" / "model").exists()
    assert "val/loss" not in (tmp_path / "run" / "train.log").read_text()


def _bad_answers(n, m, prompt_text):
    return {"plan": "p"}  # no critical_steps: every answer fails validation


def test_select_py_exits_1_when_too_many_selections_failed(tmp_path):
    """A server whose every answer is malformed: select.py writes what it has (summary, selection
    file), then exits 1 with the summary's path, instead of 0 with empty exports."""
    with FakeProvider(answer=_bad_answers) as fake:
        proc = _run("select.py", tmp_path, "selector=critical", "oracle=openai",
                    f"oracle.base_url={fake.url}/v1", "oracle.max_retries=0", "data.limit=6")
    line = _one_line(proc)
    assert "the oracle's answers failed for 5 of 5 trajectories" in line
    assert "selector.max_failed_fraction=0.2" in line and "selection_summary.json" in line
    summary = json.loads((tmp_path / "run" / "selection_summary.json").read_text())
    assert summary["failed"] == 5 and summary["trajectories"] == 5
    assert len(read_trajectories(tmp_path / "run" / "selection.jsonl")) == 5


def test_train_py_stops_after_a_failed_selection_before_loading_the_model(tmp_path):
    with FakeProvider(answer=_bad_answers) as fake:
        proc = _run("train.py", tmp_path, *TINY, "selector=critical", "oracle=openai",
                    f"oracle.base_url={fake.url}/v1", "oracle.max_retries=0", "data.limit=6",
                    "data.val_fraction=0")
    line = _one_line(proc)
    assert "the oracle's answers failed for 6 of 6 trajectories" in line
    assert "selection.jsonl" in line
    assert (tmp_path / "run" / "selection.jsonl").exists()
    assert not (tmp_path / "run" / "model").exists()
    assert "training steps supervised" not in (tmp_path / "run" / "train.log").read_text()
