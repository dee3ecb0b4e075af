"""The training job end to end on a tiny model: Hydra configs, saving, LoRA, resume, multirun."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from atlas.data import read_trajectories
from atlas.selection import num_selected
from atlas.jobs.train import train
from atlas.utils import ConfigError, redact
from tests.helpers import ROOT, compose_train


def test_train_saves_a_loadable_model_and_the_selection(tmp_path):
    cfg = compose_train(tmp_path, "selector=random", "ratio=0.5")
    summary = train(cfg)
    model_dir = Path(summary["model_dir"])
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.config.num_hidden_layers == 2
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "chat_template.jinja").exists()
    selection = read_trajectories(tmp_path / "selection.jsonl")
    assert len(selection) == summary["selection"]["train/examples"] == 6
    assert summary["global_step"] > 0 and "train/loss" in summary["metrics"]
    on_disk = json.loads((tmp_path / "train_summary.json").read_text())
    assert on_disk["selection_file"] == str((tmp_path / "selection.jsonl").resolve())
    # the saved weights are the trained ones: train() seeds, then builds the model, so the same
    # seed rebuilds its initial weights
    import lightning as L

    from atlas.model import load_model

    L.seed_everything(cfg.seed)
    initial = load_model(**cfg.model)
    assert torch.equal(initial.model.norm.weight, torch.ones_like(initial.model.norm.weight))
    name = "model.layers.0.mlp.up_proj.weight"
    trained, init = dict(reloaded.named_parameters())[name], dict(initial.named_parameters())[name]
    assert not torch.equal(trained, init)
    assert (trained - init).abs().max() < 0.1  # a few small steps from that init, not another one


def test_random_selection_at_0_3_logs_the_supervised_fraction(tmp_path, caplog):
    cfg = compose_train(tmp_path, "selector=random", "ratio=0.3", "data.limit=null",
                        "data.val_fraction=0.1", "trainer.max_steps=2")
    caplog.set_level("INFO")
    summary = train(cfg)
    frac = summary["selection"]["train/supervised_step_fraction"]
    # every trajectory keeps exactly k = min(n, max(1, floor(0.3 n))) of its n steps
    selection = read_trajectories(tmp_path / "selection.jsonl")
    assert len(selection) == summary["selection"]["train/examples"] == 360
    assert all(len(t.selected_steps) == num_selected(0.3, t.num_steps) for t in selection)
    # a selected step that ends past max_length is dropped, and counted
    assert (summary["selection"]["train/supervised_steps"]
            + summary["selection"]["train/steps_dropped_max_length"]
            == sum(len(t.selected_steps) for t in selection))
    assert 0.25 <= frac <= 0.35
    assert f"training steps supervised ({100 * frac:.1f}%)" in caplog.text
    assert "selector=random ratio=0.3" in caplog.text


def test_trains_without_any_logger(tmp_path):
    summary = train(compose_train(tmp_path, "logger=none", "trainer.max_steps=1"))
    assert summary["global_step"] == 1 and (tmp_path / "model" / "model.safetensors").exists()


def test_lora_saves_an_adapter(tmp_path):
    from peft import PeftModel

    summary = train(compose_train(tmp_path, "peft=lora", "trainer.max_steps=1"))
    model_dir = Path(summary["model_dir"])
    assert (model_dir / "adapter_config.json").exists()
    assert not (model_dir / "model.safetensors").exists()
    assert (model_dir / "adapter_model.safetensors").exists()
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    from atlas.model import load_model

    base = load_model(config=dict(compose_train(tmp_path).model.config))
    assert isinstance(PeftModel.from_pretrained(base, model_dir), PeftModel)


def _logged_losses(run_dir: Path) -> dict[int, float]:
    [metrics] = run_dir.glob("csv/*/metrics.csv")
    with open(metrics) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("loader,resume_at,steps", [
    ([], 3, 6),
    # 4 batches an epoch: resumed in the second epoch, which has an order of its own
    (["data.loader.group_by_length=true", "data.limit=8", "data.loader.batch_size=2",
      "trainer.max_epochs=2"], 5, 7)], ids=["shuffled", "length_grouped_epoch_1"])
def test_training_resumes_mid_epoch_exactly_where_it_stopped(tmp_path, loader, resume_at, steps):
    """Resumed from a mid-epoch checkpoint, a run sees the same batches with the same weights
    as the uninterrupted run: its step losses match."""
    common = ["trainer.accumulate_grad_batches=1", "data.limit=12", "data.val_fraction=0",
              "trainer.max_epochs=1", f"trainer.max_steps={steps}", "module.lr=1e-2",
              "validate_before_training=false", *loader]
    whole = train(compose_train(tmp_path / "whole", *common, "callbacks.model_checkpoint.save_top_k=-1",
                                "callbacks.model_checkpoint.every_n_train_steps=1"))
    assert whole["global_step"] == steps
    ckpt = tmp_path / "whole" / "checkpoints" / f"step{resume_at}.ckpt"
    assert ckpt.exists() and (tmp_path / "whole" / "checkpoints" / "last.ckpt").exists()
    resumed = train(compose_train(tmp_path / "b", *common, f"ckpt_path={ckpt}"))
    assert resumed["global_step"] == steps
    expected = _logged_losses(tmp_path / "whole")
    assert sorted(expected) == list(range(steps))
    # the resumed run trains only the missing steps, on the batches the whole run saw
    assert _logged_losses(tmp_path / "b") == pytest.approx(
        {k: expected[k] for k in range(resume_at, steps)}, abs=1e-4)


def test_loss_average_and_bad_values_are_checked(tmp_path):
    train(compose_train(tmp_path, "module.loss_average=step", "trainer.max_steps=1"))
    # Hydra wraps errors raised while instantiating; the message is the user's
    with pytest.raises(Exception, match="loss_average must be one of"):
        train(compose_train(tmp_path / "x", "module.loss_average=mean"))
    with pytest.raises(Exception, match=r"ratio must be a number in \(0, 1\]"):
        train(compose_train(tmp_path / "y", "selector=random", "ratio=0"))


def test_granularity_action_trains_on_fewer_tokens_and_is_a_dimension_of_the_report(tmp_path):
    """selector.granularity=action: the same steps chosen, only their actions supervised; the
    summary and the W&B run name carry it; the report splits its cells by it."""
    from atlas.report import aggregate

    common = ["selector=critical", "ratio=0.3", "trainer.max_steps=1", "logger=none"]
    step = train(compose_train(tmp_path / "step", *common))
    action = train(compose_train(tmp_path / "action", *common, "selector.granularity=action"))
    assert (step["granularity"], action["granularity"]) == ("step", "action")
    s, a = step["selection"], action["selection"]
    assert a["train/supervised_steps"] == s["train/supervised_steps"]
    assert 0 < a["train/supervised_tokens"] < s["train/supervised_tokens"]
    jobs = [{"dir": tmp_path / n, "summary": summary, "results": {}, "eval_dir": tmp_path / n}
            for n, summary in (("step", step), ("action", action))]
    choice_keys, _, rows = aggregate(jobs, "success")
    assert choice_keys == ["granularity"]
    assert [r["granularity"] for r in rows] == ["action", "step"]
    with pytest.raises(ConfigError, match="selector.granularity must be one of step, action, "
                                          "thought, got 'tokens'"):
        train(compose_train(tmp_path / "bad", "selector.granularity=tokens"))


def test_redact_hides_secrets():
    cfg = {"oracle": {"api_key": "sk-live-0123456789", "model": "gpt-4o"}, "note": "key sk-abcdefghijkl",
           "token": None, "n": 3}
    assert redact(cfg) == {"oracle": {"api_key": "***", "model": "gpt-4o"}, "note": "key ***",
                           "token": None, "n": 3}


def _run_cli(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_multirun_gives_one_offline_wandb_run_per_job_and_no_key_leaks(tmp_path, monkeypatch):
    secret = "sk-SENTINEL0123456789abcdef"
    sweep = tmp_path / "sweep"
    proc = _run_cli(["-m", "selector=critical,random", "ratio=0.1,0.3", "model=tiny_llama", "eval=smoke",
                     "data.limit=6", "data.val_fraction=0", "trainer.max_steps=1",
                     f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                    env_extra={"OPENAI_API_KEY": secret, "ANTHROPIC_API_KEY": secret,
                               "WANDB_API_KEY": secret})
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    run_ids, combos = set(), set()
    for job in jobs:
        summary = json.loads((job / "train_summary.json").read_text())
        assert summary["wandb"]["mode"] == "offline"
        assert Path(summary["wandb"]["dir"]).is_relative_to(job)  # each job logs into its own run
        run_ids.add(summary["wandb"]["run_id"])
        combos.add((summary["selector"], summary["ratio"]))
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
        # every combination is evaluated held-in and held-out, into its own run
        assert set(summary["eval"]["averages"]) == {"held_in", "held_out"}
        results = json.loads((job / "eval" / "results.json").read_text())
        assert set(results["environments"]) == {"babyai", "maze"}
        [run_dir] = (job / "wandb").glob("offline-run-*")
        record = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
        assert b"eval/held_out/success" in record
        # one W&B group for the sweep; the compared factors as tags and in the run's name
        ratio = f"{summary['ratio']:g}"
        for text in (f"train-{sweep.name}", f"selector:{summary['selector']}", f"ratio:{ratio}",
                     "model:tiny_llama", "oracle:heuristic", f"{summary['selector']}-r{ratio}-s0",
                     "heldin_avg", "heldout_avg", "select/cost_usd", "heldin_avg_step_acc",
                     "eval/steps/held_in/accuracy_low", "eval/steps/maze/nll", "train/masks"):
            assert text.encode() in record, text
        if summary["selector"] == "critical":  # how many steps each criterion chose
            assert summary["criteria"] and b"selection/criteria/" in record
    assert len(run_ids) == 4
    assert combos == {("critical", 0.1), ("critical", 0.3), ("random", 0.1), ("random", 0.3)}
    # the comparison report, from the jobs' local files
    from atlas.report import report

    monkeypatch.setenv("WANDB_MODE", "offline")
    result = report(sweep)
    assert [(r["selector"], r["ratio"], r["n_seeds"]) for r in result["rows"]] == [
        ("critical", 0.1, 1), ("critical", 0.3, 1), ("random", 0.1, 1), ("random", 0.3, 1)]
    table = result["markdown"].read_text()
    assert "babyai (in)" in table and "maze (out)" in table and "held-out avg" in table
    assert {p.name for p in result["plots"]} == {"ratio_critical.png", "ratio_random.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result["plots"])
    assert len(list((sweep / "report" / "wandb").glob("offline-run-*"))) == 1
    # API keys from the environment reach no saved config, log or W&B file
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in proc.stdout + proc.stderr


def test_lr_schedule_is_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    from atlas.module import AtlasLM

    module = AtlasLM(torch.nn.Linear(2, 2), warmup_ratio=0.1)
    module._total_steps = 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=50)
    for step in range(51):
        assert module.lr_factor(step) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-9)


@pytest.mark.parametrize("trainer,strategy", [("cpu", "SingleDeviceStrategy"), ("gpu", "SingleDeviceStrategy"),
                                              ("ddp", "DDPStrategy"), ("fsdp", None)])
def test_trainer_configs_build(tmp_path, trainer, strategy):
    from hydra.utils import instantiate

    if strategy is None:  # Lightning builds FSDP only on a GPU: check what the config asks for
        cfg = compose_train(tmp_path, f"trainer={trainer}")
        assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.precision) == (
            "fsdp", "gpu", "bf16-mixed")
        return
    overrides = [f"trainer={trainer}"]
    if trainer != "cpu":  # no GPU here: build the same strategy on the CPU
        overrides += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
    cfg = compose_train(tmp_path, *overrides)
    assert type(instantiate(cfg.trainer, logger=False).strategy).__name__ == strategy


@pytest.mark.parametrize("override", ["+oracle.api_key=abc123", "+note=sk-abcdefghijklmnop"])
def test_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path, override):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=tiny_llama", override],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "refusing to start" in proc.stderr and "environment" in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_first_step_uses_the_full_lr_without_warmup(tmp_path):
    train(compose_train(tmp_path, "module.warmup_ratio=0", "module.lr=0.001", "trainer.max_steps=2",
                        "trainer.accumulate_grad_batches=1"))
    [metrics] = tmp_path.glob("csv/*/metrics.csv")
    with open(metrics) as f:
        lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}
    assert lrs[0] == pytest.approx(0.001)  # not 0: the schedule is sized before the first step
    assert lrs[1] == pytest.approx(0.0005)  # cosine over 2 steps


@pytest.mark.parametrize("sweep", [["-m"], ["experiment=cpu_small"]], ids=["-m", "experiment"])
def test_multirun_with_ddp_runs_each_job_once_in_one_directory_tree(tmp_path, sweep):
    """Lightning starts DDP ranks by re-running the command line: in a sweep (-m, or an
    experiment that sets hydra.mode=MULTIRUN), a naive child would run the whole sweep again
    and, its ${now} re-evaluated, write a second tree."""
    _run_cli([*sweep, "selector=full,random", "ratio=0.3", "trainer=ddp", "trainer.accelerator=cpu",
              "trainer.devices=2", "trainer.precision=32-true", "model=tiny_llama", "data.limit=9",
              "data.val_fraction=0", "trainer.max_epochs=1", "trainer.accumulate_grad_batches=1",
              "logger=csv",
              "eval_after_training=false"], cwd=tmp_path, timeout=300)  # the pitfall hangs
    [sweep_dir] = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        summary = json.loads((job / "train_summary.json").read_text())
        # 9 trajectories over 2 ranks: 5 steps an epoch (9 on one process)
        assert summary["global_step"] == 5
        assert (job / "train_ddp_process_1.log").exists()  # rank 1 ran in its parent's job dir
    assert {json.loads((j / "train_summary.json").read_text())["selector"] for j in jobs} == \
        {"full", "random"}


def test_a_ddp_child_runs_its_parents_job_with_its_config_options(monkeypatch):
    from atlas.utils import DDP_JOB_ENV, ddp_child_argv

    parent = ["train.py", "-m", "-cn", "train", "--config-dir=/x", "selector=a,b", "ratio=0.1,0.3",
              "hydra.job.chdir=false", "hydra.sweep.dir=/s"]
    monkeypatch.setenv(DDP_JOB_ENV, json.dumps({
        "overrides": ["selector=b", "ratio=0.3"], "output_dir": "/s/3",
        "hydra_overrides": ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/s", "hydra.job.chdir=false",
                            "hydra/launcher=parallel"]}))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp_child_argv(parent) == parent  # rank 0 is the parent itself
    monkeypatch.setenv("LOCAL_RANK", "1")
    # what Lightning's launcher appends is replaced; the sweep settings are not inherited
    assert ddp_child_argv(parent + ['hydra.run.dir="x"', "hydra.output_subdir=null"]) == [
        "train.py", "-cn", "train", "--config-dir=/x", "selector=b", "ratio=0.3",
        "hydra.job.chdir=false", 'hydra.run.dir="/s/3"', "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null", "hydra.mode=RUN"]
    monkeypatch.delenv(DDP_JOB_ENV)  # torchrun / SLURM ranks keep their own command line
    assert ddp_child_argv(parent) == parent


def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path):
    _run_cli(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
              "model=tiny_llama", "data.limit=8", "logger=wandb", "eval=smoke"], cwd=tmp_path)
    [run] = (tmp_path / "logs" / "train" / "runs").iterdir()  # the second rank reuses the run dir
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] > 0 and summary["wandb"]["mode"] == "offline"
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    # rank zero alone plays the evaluation episodes, once
    episodes = (run / "eval" / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 2
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.num_hidden_layers == 2


@pytest.mark.parametrize("name,model,jobs", [("cpu_small", "embedded:smollm2-135m-instruct", 8),
                                             ("cpu_steps", "embedded:smollm2-135m-instruct", 8),
                                             ("cpu_focus", "embedded:smollm2-135m-instruct", 8),
                                             ("paper", "meta-llama/Llama-3.1-8B-Instruct", 15)])
def test_experiment_configs_compose(name, model, jobs):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.model.name == model and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert len(params.selector.split(",")) * len(str(params.ratio).split(",")) * len(
        str(params.get("seed", 0)).split(",")) == jobs
    assert f"multiruns/{name}_" in cfg.hydra.sweep.dir
    if name == "paper":  # the paper's oracle and the multi-GPU strategy
        assert cfg.oracle.model == "gpt-4o" and cfg.trainer.strategy == "fsdp"
    else:  # the experiment's values win over train.yaml's
        assert cfg.module.lr == 2e-4
        if name == "cpu_focus":  # two task families, played in rollouts and scored by step
            assert cfg.data.tasks == ["BabyAI-GoToLocal-v0", "coin"]
            assert {k: list(e.tasks) for k, e in cfg.eval.held_in.items() if e} == {
                "babyai": ["BabyAI-GoToLocal-v0"], "twx": ["coin"]}
            assert cfg.eval.episodes == {"held_in": 16}
        else:
            assert (cfg.data.limit, cfg.eval.episodes) == ((64, 2) if name == "cpu_small" else (48, 0))


def test_experiment_cpu_small_starts_its_sweep(tmp_path):
    """`python train.py experiment=cpu_small` runs the sweep itself (hydra.mode=MULTIRUN),
    here shrunk to 2 jobs of a tiny model (command-line sweeps replace the experiment's)."""
    _run_cli(["experiment=cpu_small", "model=tiny_llama", "eval=smoke", "data.limit=6",
              "trainer.max_steps=1", "logger=csv", "selector=critical,full", "ratio=0.3"], cwd=tmp_path)
    [sweep] = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sweep.name.startswith("cpu_small_")
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/train_summary.json"))]
    assert [(s["selector"], s["ratio"]) for s in summaries] == [("critical", 0.3), ("full", 0.3)]
    assert all("held_out" in s["eval"]["averages"] for s in summaries)


def test_a_sweep_trains_full_once_whatever_the_ratios(tmp_path):
    """`full` ignores the ratio: in a ratio sweep its second job is the first one again, and is
    not run; the report counts full once."""
    sweep = tmp_path / "sweep"
    proc = _run_cli(["-m", "selector=full,random", "ratio=0.3,0.5", "model=tiny_llama", "eval=smoke",
                     "eval.steps.tasks=0", "data.limit=6", "data.val_fraction=0",
                     "trainer.max_steps=1", "logger=csv", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/train_summary.json")}
    assert len(summaries) == 4
    [dup] = [s for s in summaries.values() if "duplicate_of" in s]
    assert Path(dup["duplicate_of"]).name in summaries and dup["ratio"] == 0.5
    assert not (Path(dup["duplicate_of"]).parent / next(
        k for k, v in summaries.items() if v is dup) / "model").exists()
    assert "not run again" in proc.stdout + proc.stderr
    from atlas.report import report

    rows = report(sweep, use_wandb=False)["rows"]
    assert [(r["selector"], r["ratio"], r["n_seeds"]) for r in rows] == [
        ("full", 1.0, 1), ("random", 0.3, 1), ("random", 0.5, 1)]


def test_parallel_launcher_runs_a_sweep_in_separate_processes(tmp_path):
    """hydra/launcher=parallel (joblib, the `launchers` extra) runs the jobs side by side, each
    with its own offline W&B run and result files."""
    sweep = tmp_path / "sweep"
    _run_cli(["-m", "hydra/launcher=parallel", "selector=critical,random", "model=tiny_llama",
              "eval=smoke", "data.limit=6", "data.val_fraction=0", "trainer.max_steps=1",
              f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/train_summary.json"))]
    assert [s["selector"] for s in summaries] == ["critical", "random"]
    assert len({s["wandb"]["run_id"] for s in summaries}) == 2
    logs = [(sweep / str(i) / "train.log").read_text() for i in range(2)]
    assert all("selector=" in log for log in logs)


@pytest.mark.parametrize("launcher,target", [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_deepspeed_config_names_a_lightning_strategy(tmp_path):
    """trainer=deepspeed needs CUDA and the `deepspeed` extra: here only its config is checked."""
    from lightning.pytorch.strategies import StrategyRegistry

    cfg = compose_train(tmp_path, "trainer=deepspeed")
    assert cfg.trainer.strategy in StrategyRegistry and cfg.trainer.accelerator == "gpu"


def test_the_model_trains_in_training_mode_with_checkpointing_active(tmp_path):
    """from_pretrained hands back a model in eval mode: training must switch it, or dropout and
    gradient checkpointing (which transformers applies only in training mode) are silently off."""
    import lightning as L

    from atlas.data.datamodule import TrajectoryDataModule
    from atlas.model import load_model, load_tokenizer
    from atlas.module import AtlasLM

    cfg = compose_train(tmp_path, "model.gradient_checkpointing=true")
    model = load_model(**cfg.model)
    model.eval()
    trajectories = [t.with_selection(range(t.num_steps))
                    for t in read_trajectories("pkg://atlas/data/default/babyai.jsonl")[:2]]
    data = TrajectoryDataModule(trajectories, [], load_tokenizer(cfg.model.tokenizer or cfg.model.name))
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            layer = pl_module.model.model.layers[0]
            seen.append((pl_module.model.training, layer.training and layer.gradient_checkpointing))

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Probe()])
    trainer.fit(AtlasLM(model), datamodule=data)
    assert seen == [(True, True), (True, True)]


def test_deepspeed_stage_3_is_refused(tmp_path):
    with pytest.raises(ValueError, match="deepspeed_stage_3 shards the weights"):
        train(compose_train(tmp_path, "trainer=deepspeed", "trainer.strategy=deepspeed_stage_3"))


def test_ranks_above_zero_wait_for_rank_zeros_selection(tmp_path):
    """Ranks that torchrun or SLURM start alongside rank 0 train on its selection file, written
    when it is ready; a rank 0 that never writes it ends the wait with a clear error."""
    import threading

    from atlas.jobs.train import wait_for_file
    from atlas.utils import atomic_write

    target = tmp_path / "selection.jsonl"
    threading.Timer(0.3, atomic_write, args=(target, "{}\n")).start()
    assert wait_for_file(target, timeout_s=10, what="rank 0's selection", poll_s=0.05) == target
    with pytest.raises(TimeoutError, match="did rank 0 fail"):
        wait_for_file(tmp_path / "never.jsonl", timeout_s=0.2, what="rank 0's selection", poll_s=0.05)


def test_a_redirected_run_prints_a_readable_log(tmp_path):
    """Output to a file (not a terminal): each message once, no library noise, progress lines
    for training, step evaluation and episodes, and a closing block that says where things are."""
    proc = _run_cli(["model=tiny_llama", "eval=smoke", "data.limit=6", "trainer.max_steps=2",
                     "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                    env_extra={"ATLAS_PROGRESS_INTERVAL": "0"})
    out = proc.stdout + proc.stderr
    messages = [line.split("] - ", 1)[1] for line in out.splitlines() if "] - " in line]
    assert messages.count("GPU available: False, used: False") == 1  # Lightning's lines once
    for noise in ("Tip", "litlogger", "anonymous", "Warning", "deprecated", "Loading weights",
                  "it/s]", "INFO: "):
        assert noise not in out, noise
    assert any(m.startswith("epoch 0, step ") and "tokens/s" in m for m in messages)
    assert any(m.startswith("steps: ") for m in messages)
    assert any(m.startswith("episodes: ") for m in messages)
    block = out[out.index("train.py done in"):]
    for row in ("run", "model", "selection", "eval", "W&B", "log", "summary"):
        assert re.search(rf"^  {row} +\S", block, re.M), row
    assert "wandb sync" in block
