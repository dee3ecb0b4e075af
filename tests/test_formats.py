"""Readers and writers: round trips on real files, file:line:field errors, atomic writes."""

import json
import re

import pytest

from atlas.data import DataFormatError, Message, Trajectory, read_trajectories, write_trajectories
from atlas.data.formats import WRITABLE
from tests.helpers import ROOT

REAL_FILES = [  # (file under ../shared/data, format)
    ("fireact/hotpotqa.jsonl", "openai"),
    ("fireact/multitask.jsonl", "openai"),
    ("agentinstruct-sample/agenttuning_alfworld_sample_record0.json", "agentgym"),
]


def _json_records(path):
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _content(trajectories, with_selection=True):
    return [(t.system, [(m.role, m.content, m.selected if with_selection else None)
                        for m in t.messages]) for t in trajectories]


@pytest.mark.parametrize("name,fmt", REAL_FILES)
def test_reads_real_files(shared_data, name, fmt):
    path = shared_data / name
    auto = read_trajectories(path)
    assert _content(auto) == _content(read_trajectories(path, format=fmt))
    raw = _json_records(path)
    assert len(auto) == len(raw)
    n_turns = sum(len(r.get("messages") or r["conversations"]) for r in raw)
    assert sum(len(t.messages) + (t.system is not None) for t in auto) == n_turns
    assert all(t.num_steps >= 1 for t in auto)


def test_agentgym_loss_flags_are_the_selection(shared_data):
    [t] = read_trajectories(shared_data / "agentinstruct-sample/agenttuning_alfworld_sample_record0.json")
    assert t.id == "alfworld_0" and t.env == "alfworld"
    # the scripted "OK. I'll follow your instructions" reply is loss: false
    assert t.steps[0].message.content.startswith("OK.") and not t.steps[0].selected
    assert t.selected_steps == list(range(1, t.num_steps))


@pytest.mark.parametrize("name,fmt", REAL_FILES)
def test_native_round_trip_is_lossless(shared_data, tmp_path, name, fmt):
    """Reading a real file and writing it back in its own format gives the same records."""
    src = shared_data / name
    out = write_trajectories(tmp_path / "out.jsonl", read_trajectories(src), format=fmt)
    original, written = _json_records(src), _json_records(out)
    if fmt == "openai":  # the writer states every assistant turn's weight explicitly
        for rec in original:
            for m in rec["messages"]:
                if m["role"] == "assistant":
                    m.setdefault("weight", 1)
    assert written == original


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("name,_", REAL_FILES)
def test_every_format_round_trips_real_trajectories(shared_data, tmp_path, fmt, name, _):
    trajs = read_trajectories(shared_data / name)[:200]
    # a partial selection with criteria, so the formats that can carry it are checked on it
    trajs = [t.with_selection(range(0, t.num_steps, 2), criteria={0: "Plan Creation"},
                              reasons={0: "sets the plan"}) for t in trajs]
    back = read_trajectories(write_trajectories(tmp_path / f"x.{fmt}.jsonl", trajs, format=fmt),
                             format=fmt)
    assert _content(back, with_selection=fmt not in ("sharegpt", "anthropic")) == _content(
        trajs, with_selection=fmt not in ("sharegpt", "anthropic"))
    if fmt in ("atlas", "agentgym", "sharegpt"):
        assert [t.id for t in back] == [t.id for t in trajs]
    if fmt == "atlas":
        assert [(t.env, t.meta) for t in back] == [(t.env, t.meta) for t in trajs]
        assert back[0].steps[0].message.criterion == "Plan Creation"
        assert back[0].steps[0].message.reason == "sets the plan"


def test_sharegpt_warns_that_it_cannot_hold_a_selection(tmp_path, caplog):
    t = Trajectory("a", "e", [Message("user", "q"), Message("assistant", "x"),
                              Message("user", "o"), Message("assistant", "y")]).with_selection([1])
    write_trajectories(tmp_path / "s.jsonl", [t], format="sharegpt")
    assert "cannot record step selection" in caplog.text


@pytest.mark.parametrize("line,field,message", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
     "messages[1].content", "missing"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}',
     "messages[1].role", "role must be one of"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "weight": 2}]}',
     "messages[1].weight", "expected 0 or 1"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content", "expected str"),
    ('{"messages": [{"role": "user", "content": "q"}]}', None, "at least one assistant turn"),
    ('{"conversations": [{"from": "human", "value": "q", "loss": null}, {"from": "bot", "value": "x", "loss": true}], "id": "a_1"}',
     "conversations[1].from", "expected one of ['gpt', 'human'], got 'bot'"),
    ('{"conversations": [{"from": "human", "value": "q", "loss": null}, {"from": "gpt", "value": "x", "loss": "yes"}], "id": "a_1"}',
     "conversations[1].loss", "expected bool"),
    ('{"id": "t", "env": "e", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "selected": "no"}]}',
     "messages[1].selected", "expected bool"),
    ('{"id": "t", "env": "e", "messages": "oops"}', "messages", "expected list"),
    ('{"trajectory": []}', None, "cannot tell the format"),
    ('[1, 2]', None, "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}', None,
     "invalid JSON"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, field, message):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n")  # the bad record is on line 3
    with pytest.raises(DataFormatError) as e:
        read_trajectories(path)
    assert e.value.where == "3" and e.value.field == field
    assert str(e.value).startswith(f"{path}:3")
    assert message in str(e.value)
    if field:
        assert f"field '{field}'" in str(e.value)


def test_json_array_errors_name_the_record(tmp_path):
    path = tmp_path / "gym.json"
    path.write_text(json.dumps([
        {"id": "x_0", "conversations": [{"from": "human", "value": "q", "loss": None},
                                        {"from": "gpt", "value": "a", "loss": True}]},
        {"id": "x_1", "conversations": [{"from": "human", "value": "q", "loss": None},
                                        {"from": "gpt", "loss": True}]}]))
    with pytest.raises(DataFormatError, match=r"gym.json:record 1: field 'conversations\[1\].value': missing"):
        read_trajectories(path)


def test_duplicate_ids_and_empty_files_are_errors(tmp_path):
    rec = {"id": "t", "env": "e", "messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}]}
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataFormatError, match="dup.jsonl:2: field 'id': duplicate trajectory id 't'"):
        read_trajectories(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="no trajectories"):
        read_trajectories(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="unknown trajectory format"):
        read_trajectories(path, format="csv")


def test_write_is_atomic(tmp_path):
    """A writer that fails half-way leaves the previous file intact and no temporary file."""
    path = tmp_path / "sel.jsonl"
    t = Trajectory("a", "e", [Message("user", "q"), Message("assistant", "x")])
    write_trajectories(path, [t])
    before = path.read_bytes()

    def broken():
        yield t
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_trajectories(path, broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sel.jsonl"]


def test_crash_while_writing_the_file_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "sel.jsonl"
    t = Trajectory("a", "e", [Message("user", "q"), Message("assistant", "x")])
    write_trajectories(path, [t])
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_trajectories(path, [t, t.with_selection([])])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sel.jsonl"]


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode())
    assert read_trajectories(path)[0].messages[1].content == "a"


def test_packaged_default_data_reads(tmp_path):
    trajs = read_trajectories("pkg://atlas/data/fireact/fireact_hotpotqa.jsonl")
    assert len(trajs) == 100 and trajs[0].env == "fireact_hotpotqa"
    assert trajs[0].messages[1].content.startswith("Thought:")


@pytest.mark.parametrize("fmt", ["openai", "sharegpt"])
def test_missing_ids_come_from_the_content_not_the_file_name(tmp_path, fmt):
    """Renaming or re-exporting a file, or selecting other steps, keeps the ids (and so the
    validation split); files that give ids keep theirs; identical records stay distinct."""
    from atlas.data.datamodule import split_trajectories

    trajs = read_trajectories(ROOT / "atlas" / "data" / "default" / "wordle.jsonl")[:20]
    trajs.append(trajs[0])  # the same text twice in one file
    a = write_trajectories(tmp_path / "a.jsonl", trajs, fmt)
    records = [json.loads(line) for line in a.read_text().splitlines()]
    a.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n"
                         for r in records))  # sharegpt records often have none
    first = read_trajectories(a, format=fmt)
    renamed = a.rename(tmp_path / "renamed_export.jsonl")
    second = read_trajectories(renamed, format=fmt)
    ids = [t.id for t in first]
    assert ids == [t.id for t in second]
    assert len(set(ids)) == len(ids) and ids[-1] == ids[0] + "-2"
    assert all(re.fullmatch(r"t-[0-9a-f]{12}(-\d+)?", i) for i in ids)
    assert ([t.id for t in split_trajectories(first, 0.25)[1]]
            == [t.id for t in split_trajectories(second, 0.25)[1]])
    if fmt == "openai":  # another selection of the same text: same id
        other = [t.with_selection(t.selected_steps[:1]) for t in trajs]
        b = write_trajectories(tmp_path / "b.jsonl", other, fmt)
        assert [t.id for t in read_trajectories(b, format=fmt)] == ids
    # files that give ids keep them
    given = write_trajectories(tmp_path / "given.jsonl", trajs[:3], "atlas")
    assert [t.id for t in read_trajectories(given)] == [t.id for t in trajs[:3]]


def test_load_keeps_the_task_families_asked_for_then_the_limit():
    """``data.tasks`` filters each file before the round-robin ``limit``, so a limit still
    alternates between the environments whose families are kept."""
    from atlas.data.datamodule import load_trajectories

    files = [str(ROOT / "atlas" / "data" / "default" / f"{env}.jsonl")
             for env in ("babyai", "scienceworld", "twx")]
    kept = load_trajectories(files, tasks=["BabyAI-GoToLocal-v0", "coin"], limit=6)
    assert [t.meta["task"] for t in kept] == ["BabyAI-GoToLocal-v0", "coin"] * 3
    every = load_trajectories(files, tasks=["coin"])
    assert len(every) == sum(1 for line in open(files[2]) if '"task": "coin"' in line) > 0
