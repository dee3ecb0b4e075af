"""python -m atlas.report: the comparison report of a multirun, from job directories on disk."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import pytest

from atlas.report import main, report

PNG = b"\x89PNG\r\n\x1a\n"
# Per-environment success of each (selector, ratio, seed); held-in: babyai, wordle, held-out: maze.
SUCCESS = {
    ("critical", 0.1, 0): (50.0, 40.0, 20.0), ("critical", 0.1, 1): (60.0, 44.0, 30.0),
    ("critical", 0.3, 0): (70.0, 50.0, 35.0), ("critical", 0.3, 1): (74.0, 56.0, 25.0),
    ("random", 0.1, 0): (30.0, 20.0, 10.0), ("random", 0.1, 1): (40.0, 30.0, 12.0),
    ("random", 0.3, 0): (45.0, 35.0, 15.0), ("random", 0.3, 1): (55.0, 25.0, 25.0),
    ("full", 0.3, 0): (80.0, 60.0, 40.0),
}


def write_job(job_dir: Path, selector: str, ratio: float, seed: int, success: tuple[float, ...],
              choices: dict | None = None, wandb_run: bool = False, eval_results: bool = True) -> Path:
    """A finished train.py job as a multirun leaves it: .hydra/, train_summary.json, eval/."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- selector={selector}\n- ratio={ratio}\n")
    envs = {name: {"group": group, "episodes": 8, "success": s, "reward": s / 2, "turns": 14.0,
                   "invalid_actions": 0, "errors": 0}
            for (name, group), s in zip([("babyai", "held_in"), ("maze", "held_out"),
                                         ("wordle", "held_in")],
                                        (success[0], success[2], success[1]))}
    averages = {g: {m: statistics.fmean(e[m] for e in envs.values() if e["group"] == g)
                    for m in ("success", "reward")} for g in ("held_in", "held_out")}
    results_file = job_dir / "eval" / "results.json"
    summary = {"choices": {"selector": selector, "oracle": "heuristic", "model": "smollm2_135m",
                           "data": "default", **(choices or {})},
               "selector": selector, "ratio": ratio, "seed": seed,
               "selection": {"train/supervised_steps": 10, "train/steps": 40,
                             "train/supervised_tokens": 500, "train/tokens": 4000},
               "criteria": {"plan": 3}, "oracle_run": None, "metrics": {"val/loss": 1.0},
               "global_step": 4, "wall_time_s": 12.3}
    if eval_results:
        results_file.parent.mkdir()
        results_file.write_text(json.dumps({"environments": envs, "averages": averages,
                                            "split": "test", "episodes_file": "x", "config": {}}))
        summary["eval"] = {"averages": averages, "results_file": str(results_file.resolve())}
    if wandb_run:
        summary["wandb"] = {"mode": "offline", "dir": str(job_dir / "wandb" / "offline-run-x"),
                            "run_id": f"run{seed}"}
    (job_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return job_dir


def sweep(root: Path, **kwargs) -> Path:
    for num, ((selector, ratio, seed), success) in enumerate(SUCCESS.items()):
        write_job(root / str(num), selector, ratio, seed, success, **kwargs)
    return root


def test_table_csv_and_plots(tmp_path, capsys):
    root = sweep(tmp_path / "sweep")
    result = report(root, use_wandb=False)
    out = root / "report"

    rows = {(r["selector"], r["ratio"]): r for r in result["rows"]}
    assert list(rows) == [("critical", 0.1), ("critical", 0.3), ("full", 1.0),
                          ("random", 0.1), ("random", 0.3)]
    # critical 0.1, babyai: seeds 50 and 60 -> mean 55, sample std sqrt(((-5)^2 + 5^2) / 1) = 7.07
    cell = rows[("critical", 0.1)]
    assert cell["babyai_mean"] == pytest.approx(55.0)
    assert cell["babyai_std"] == pytest.approx(7.0711, abs=1e-4)
    # held-in average per seed: (50+40)/2 = 45 and (60+44)/2 = 52 -> 48.5 ± 4.95
    assert cell["held_in_mean"] == pytest.approx(48.5)
    assert cell["held_in_std"] == pytest.approx(4.9497, abs=1e-4)
    assert cell["n_seeds"] == 2 and cell["seeds"] == [0, 1]
    # what training did: validation loss and supervised share, from train_summary.json
    assert cell["val_loss_mean"] == pytest.approx(1.0) and cell["val_loss_std"] == 0.0
    assert cell["supervised_steps_mean"] is None  # not in these summaries: shown as "–"
    assert rows[("full", 1.0)]["n_seeds"] == 1 and rows[("full", 1.0)]["maze_std"] is None

    md = (out / "report.md").read_text()
    assert md == result["markdown"].read_text()
    assert str(root.resolve()) in md.splitlines()[0] and "success" in md.splitlines()[0]
    assert "9 jobs" in md.splitlines()[0]
    header = next(line for line in md.splitlines() if line.startswith("| selector"))
    assert header == ("| selector | ratio | babyai (in) | wordle (in) | maze (out) | held-in avg "
                      "| held-out avg | val loss | supervised steps (%) | seeds |")
    assert ("| critical | 0.1 | 55.0 ± 7.1 | 42.0 ± 2.8 | 25.0 ± 7.1 | 48.5 ± 4.9 | 25.0 ± 7.1 "
            "| 1.000 ± 0.000 | – | 2 |") in md
    assert "| full | all | 80.0 | 60.0 | 40.0 | 70.0 | 40.0 | 1.000 | – | 1 |" in md
    assert header in capsys.readouterr().out

    with (out / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["selector", "ratio", "n_seeds", "metric",
                              "babyai_mean", "babyai_std", "wordle_mean", "wordle_std",
                              "maze_mean", "maze_std", "held_in_mean", "held_in_std",
                              "held_out_mean", "held_out_std", "val_loss_mean", "val_loss_std",
                              "supervised_steps_mean", "supervised_steps_std"]
    assert len(table) == 5 and float(table[0]["babyai_mean"]) == pytest.approx(55.0)

    assert sorted(p.name for p in result["plots"]) == ["ratio_critical.png", "ratio_random.png"]
    for p in result["plots"]:
        data = p.read_bytes()
        assert p.parent == out and len(data) > 1000 and data[:8] == PNG
    assert result["wandb_dir"] is None


def test_reward_metric_and_out_dir(tmp_path):
    root = sweep(tmp_path / "sweep")
    result = report(root, out=tmp_path / "elsewhere", metric="reward", use_wandb=False)
    cell = next(r for r in result["rows"] if r["selector"] == "critical" and r["ratio"] == 0.1)
    assert cell["babyai_mean"] == pytest.approx(27.5)
    assert result["csv"] == tmp_path / "elsewhere" / "report.csv"
    assert "reward" in result["markdown"].read_text().splitlines()[0]
    assert not (root / "report").exists()


def test_unfinished_jobs_are_named(tmp_path, caplog):
    root = sweep(tmp_path / "sweep")
    (root / "9" / ".hydra").mkdir(parents=True)  # crashed before writing its summary
    write_job(root / "10", "random", 0.1, 2, (0.0, 0.0, 0.0), eval_results=False)
    with caplog.at_level(logging.WARNING, logger="atlas.report"):
        result = report(root, use_wandb=False)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "9 (no train_summary.json" in warnings and "10 (no eval results)" in warnings
    assert [m.split()[0] for m in result["missing"]] == ["9", "10"]
    random_01 = next(r for r in result["rows"] if r["selector"] == "random" and r["ratio"] == 0.1)
    assert random_01["n_seeds"] == 2  # job 10 left out
    md = result["markdown"].read_text()
    assert "Missing jobs" in md and "`9 (no train_summary.json" in md


def test_nested_sweeps(tmp_path):
    sweep(tmp_path / "a" / "sweep")
    write_job(tmp_path / "b" / "0", "random", 0.1, 5, (10.0, 10.0, 10.0))
    result = report(tmp_path, use_wandb=False)
    random_01 = next(r for r in result["rows"] if r["selector"] == "random" and r["ratio"] == 0.1)
    assert random_01["seeds"] == [0, 1, 5]


def test_malformed_summary_names_the_file(tmp_path):
    root = sweep(tmp_path / "sweep")
    bad = root / "3" / "train_summary.json"
    bad.write_text('{"selector": "random",\n  "ratio": }')
    with pytest.raises(ValueError, match=r"3/train_summary\.json: malformed JSON \(line 2"):
        report(root, use_wandb=False)


def test_no_results_is_an_error(tmp_path, capsys):
    write_job(tmp_path / "sweep" / "0", "random", 0.1, 0, (1.0, 1.0, 1.0), eval_results=False)
    with pytest.raises(ValueError, match=f"no finished job with eval results under {tmp_path / 'sweep'}"):
        report(tmp_path / "sweep", use_wandb=False)
    with pytest.raises(SystemExit, match="no finished job with eval results"):
        main([str(tmp_path / "sweep"), "--no-wandb"])


def test_differing_choices_are_not_averaged(tmp_path):
    root = tmp_path / "sweep"
    write_job(root / "0", "critical", 0.3, 0, (50.0, 50.0, 20.0), choices={"model": "smollm2_135m"})
    write_job(root / "1", "critical", 0.3, 0, (90.0, 90.0, 60.0), choices={"model": "qwen"})
    write_job(root / "2", "full", 0.3, 0, (95.0, 95.0, 70.0), choices={"model": "qwen"})
    result = report(root, use_wandb=False)
    critical = [r for r in result["rows"] if r["selector"] == "critical"]
    assert [(r["model"], r["babyai_mean"], r["n_seeds"]) for r in critical] == [
        ("qwen", 90.0, 1), ("smollm2_135m", 50.0, 1)]
    md = result["markdown"].read_text()
    assert "| selector | ratio | model | babyai (in)" in md
    assert "| critical | 0.3 | qwen | 90.0 |" in md
    with result["csv"].open() as f:
        assert next(csv.reader(f))[:3] == ["selector", "ratio", "model"]
    assert [p.name for p in result["plots"]] == ["ratio_critical.png"]


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    root = sweep(tmp_path / "sweep", wandb_run=True)
    result = report(root, use_wandb=True)
    runs = list((root / "report" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and result["wandb_dir"] == str(runs[0].resolve())
    assert list(runs[0].glob("*.wandb"))  # the logged table and images, ready for `wandb sync`


def test_wandb_skipped_when_disabled_or_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = sweep(tmp_path / "sweep", wandb_run=True)
    assert report(root)["wandb_dir"] is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report(root, use_wandb=False)["wandb_dir"] is None
    assert not (root / "report" / "wandb").exists()


def test_full_at_several_ratios_is_one_seed_and_other_overrides_split_cells(tmp_path):
    root = tmp_path / "sweep"
    # full ignores the ratio: a ratio sweep runs it once per ratio, with the same seed
    write_job(root / "0", "full", 0.3, 0, (80.0, 60.0, 40.0))
    write_job(root / "1", "full", 0.5, 0, (70.0, 60.0, 40.0))
    write_job(root / "2", "full", 0.3, 1, (90.0, 60.0, 40.0))
    [full] = report(root, use_wandb=False)["rows"]
    # seed 0: (80 + 70) / 2 = 75; seed 1: 90 -> two seeds, mean 82.5, std of (75, 90)
    assert full["n_seeds"] == 2 and full["seeds"] == [0, 1]
    assert full["babyai_mean"] == pytest.approx(82.5)
    assert full["babyai_std"] == pytest.approx(statistics.stdev([75.0, 90.0]))

    # jobs that differ in another override are different experiments, not seeds
    other = tmp_path / "lr"
    for num, lr in enumerate(("1e-4", "2e-4")):
        job = write_job(other / str(num), "random", 0.3, 0, (50.0 + num, 40.0, 20.0))
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- selector=random\n- ratio=0.3\n- module.lr={lr}\n")
    rows = report(other, use_wandb=False)["rows"]
    assert [(r["overrides"], r["n_seeds"], r["babyai_mean"]) for r in rows] == [
        ("module.lr=1e-4", 1, 50.0), ("module.lr=2e-4", 1, 51.0)]


def _step_records(env_groups: dict[str, str], correct_rate: dict[str, float], tasks: int = 12,
                  steps: int = 6, seed: int = 0, plan_rate: float | None = None) -> list[dict]:
    """Step records as evaluate() writes them: per env, ``tasks`` tasks of ``steps`` steps, the
    first marked Plan Creation (right at ``plan_rate``, default the environment's rate)."""
    import random

    rng = random.Random(seed)
    out = []
    for env, group in env_groups.items():
        for t in range(tasks):
            for s in range(steps):
                rate = correct_rate[env] if s or plan_rate is None else plan_rate
                out.append({"env": env, "group": group, "task": f"{env}/t{t}", "step": s,
                            "criterion": "unmarked" if s else "Plan Creation",
                            "expert_action": "a", "action": "a",
                            "correct": rng.random() < rate, "nll": 1.0, "response": ""})
    return out


def write_step_job(job_dir: Path, selector: str, ratio: float, seed: int, rates: dict[str, float],
                   base_rates: dict[str, float], plan_rate: float | None = None) -> Path:
    from atlas import step_eval

    groups = {"babyai": "held_in", "wordle": "held_in", "maze": "held_out"}
    write_job(job_dir, selector, ratio, seed, (0.0, 0.0, 0.0))
    records = _step_records(groups, rates, seed=seed, plan_rate=plan_rate)
    base = _step_records(groups, base_rates, seed=99)
    eval_dir = job_dir / "eval"
    for name, recs in (("steps.jsonl", records), ("steps_base.jsonl", base)):
        (eval_dir / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    results = json.loads((eval_dir / "results.json").read_text())
    results["steps"] = step_eval.summarize(records, groups)
    (eval_dir / "results.json").write_text(json.dumps(results))
    return job_dir


def test_step_accuracy_report_with_intervals_and_paired_differences(tmp_path):
    root = tmp_path / "sweep"
    strong = {"babyai": 0.8, "wordle": 0.7, "maze": 0.5}
    weak = {"babyai": 0.1, "wordle": 0.1, "maze": 0.5}
    write_step_job(root / "0", "full", 0.3, 0, strong, weak)
    write_step_job(root / "1", "critical", 0.3, 0, strong, weak)
    write_step_job(root / "2", "random", 0.3, 0, {**strong, "babyai": 0.75}, weak)
    result = report(root, use_wandb=False)
    assert result["metric"] == "step_accuracy"  # every job has step-level results
    rows = {r["selector"]: r for r in result["rows"]}
    for r in rows.values():
        assert r["held_in_low"] <= r["held_in_mean"] <= r["held_in_high"]
        assert r["held_in_high"] - r["held_in_low"] > 1  # a real interval, not a point
    diffs = {(d["a"], d["b"], d["group"]): d for d in result["differences"]}
    # every cell against the base model, paired: a large held-in gain, resolved
    for cell in ("full", "critical 0.3", "random 0.3"):
        d = diffs[(cell, "base model", "held_in")]
        assert d["resolved"] and d["low"] > 0
        assert not diffs[(cell, "base model", "held_out")]["resolved"]  # same rate: no claim
    # the paper's comparisons at the same ratio; full is not compared with itself
    assert {(a, b) for a, b, _ in diffs} >= {("critical 0.3", "full"), ("critical 0.3", "random 0.3"),
                                              ("random 0.3", "full")}
    assert not any(a == "full" and b != "base model" for a, b, _ in diffs)
    md = result["markdown"].read_text()
    assert "## Paired differences" in md and "**Resolved**" in md and "**Not resolved**" in md
    assert "full > base model on held-in avg" in md
    # the cells carry their interval in the table
    full_line = next(line for line in md.splitlines() if line.startswith("| full |"))
    assert full_line.count("[") >= 5
    with (result["markdown"].parent / "differences.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(result["differences"])
    assert result["plots"]  # with error bars from the intervals


def test_accuracy_by_criterion_of_the_test_step_and_each_pair_compared_once(tmp_path):
    """The report splits held-in step accuracy by the criterion of the test step, per cell with
    a task-bootstrap interval; random and noncritical are compared once, not both ways."""
    root = tmp_path / "sweep"
    rates, base = {"babyai": 0.5, "wordle": 0.5, "maze": 0.5}, {"babyai": 0.1, "wordle": 0.1, "maze": 0.1}
    write_step_job(root / "0", "full", 0.3, 0, rates, base, plan_rate=0.0)
    write_step_job(root / "1", "critical", 0.3, 0, rates, base, plan_rate=1.0)
    write_step_job(root / "2", "critical", 0.3, 1, rates, base, plan_rate=1.0)
    write_step_job(root / "3", "random", 0.3, 0, rates, base)
    write_step_job(root / "4", "noncritical", 0.3, 0, rates, base)
    result = report(root, use_wandb=False)
    cells = {e["selector"]: e["criteria"] for e in result["by_criterion"]}
    assert cells["critical"]["Plan Creation"] == {"steps": 24, "value": 100.0, "low": 100.0, "high": 100.0}
    assert cells["full"]["Plan Creation"]["value"] == 0.0
    for criteria in cells.values():  # 2 held-in environments x 12 tasks x 5 unmarked steps
        unmarked = criteria["unmarked"]
        assert unmarked["steps"] == 120 and unmarked["low"] < 50.0 < unmarked["high"]
    md = result["markdown"].read_text()
    assert "## held-in step accuracy by the criterion of the test step" in md
    assert "| critical | 0.3 | 100.0 [100.0, 100.0] |" in md and "Plan Creation (24 steps)" in md
    pairs = {(d["a"], d["b"]) for d in result["differences"]}
    assert ("random 0.3", "noncritical 0.3") in pairs and ("noncritical 0.3", "random 0.3") not in pairs
