"""atlas vs TRL's SFTTrainer on the same data, model and masks: one epoch each, side by side.

    pip install -e '.[bench]'                       # TRL, only for this benchmark
    python bench/trl_compare.py                     # SmolLM2-135M, 16 default trajectories, ratio 0.3 and 1.0
    python bench/trl_compare.py --trajectories 64 --ratios 0.3

Both trainers get the same expert trajectories (the default data), the same model, the same
per-step masks: at ratio 1.0 every step (``selector=full``), at lower ratios the ATLaS selection
(``selector=critical``, heuristic oracle). TRL gets each whole trajectory with precomputed
``labels`` (-100 off the selected steps), which its collator uses as they are; atlas trains
through its own path (Lightning, :class:`atlas.module.AtlasLM`, examples cut after the last
selected step, LM head only at supervised positions). Batch size 1, AdamW, one epoch.

Each (trainer, ratio) runs in its own process, so peak memory is that run's alone: peak RSS on
a CPU, peak allocated CUDA memory on a GPU (bf16 there, fp32 on a CPU). Before training, each
computes its loss on the same first trajectory with the same initial weights; the two must
agree to 1e-4. Prints a table, each run's memory by phase (after loading the model, the peak
while training, next to what the weights, gradients and AdamW states take by themselves), and
one JSON line per run.

``--profile`` adds torch.profiler's operators by self time, side by side for the two trainers
(use few trajectories: the profiler slows training down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = [f"pkg://atlas/data/default/{env}.jsonl" for env in ("babyai", "scienceworld", "twx",
                                                               "wordle")]


def selected(n: int, ratio: float):
    from atlas.data.datamodule import load_trajectories
    from atlas.oracle import HeuristicOracle
    from atlas.selection import CriticalSelector, FullSelector

    trajectories = load_trajectories(DATA, limit=n)
    selector = FullSelector() if ratio >= 1.0 else CriticalSelector(HeuristicOracle(), ratio=ratio)
    return selector.select(trajectories)


def full_example(trajectory, tokenizer) -> dict:
    """What a TRL user passes: the whole trajectory, labels only on the selected steps."""
    from atlas.data.masking import IGNORE_INDEX, tokenize_steps

    tok = tokenize_steps(trajectory, tokenizer)
    labels = [IGNORE_INDEX] * len(tok.input_ids)
    for k in trajectory.selected_steps:
        a, b = tok.step_spans[k]
        labels[a:b] = tok.input_ids[a:b]
    return {"input_ids": tok.input_ids, "labels": labels}


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_mb(device: str) -> float:
    """Memory in use now: allocated CUDA memory, or the process's resident set."""
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@contextlib.contextmanager
def measured(device: str, profile: bool):
    """Times the block and records its peak memory (sampled every 20 ms on a CPU, where the
    process's lifetime peak would include model loading); with ``profile``, also the
    operators' self time under torch.profiler. Fills the yielded dict on exit."""
    import torch
    from torch.profiler import ProfilerActivity

    out: dict = {}
    done, peak = threading.Event(), [memory_mb(device)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], memory_mb(device))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = torch.profiler.profile(activities=activities) if profile else contextlib.nullcontext()
    t0 = time.perf_counter()
    with prof:
        yield out
    out["seconds"] = time.perf_counter() - t0
    done.set()
    sampler.join()
    out["train_peak_memory_mb"] = (peak_memory_mb(device) if device == "cuda"
                                   else max(peak[0], memory_mb(device)))
    if profile:
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
        out["profile_total_s"] = sum(getattr(e, key) for e in ops) / 1e6
        out["profile_s"] = {e.key: getattr(e, key) / 1e6 for e in ops[:15]}


def run_atlas(model, tokenizer, trajectories, device: str, bf16: bool,
              pack_length: int | None = None, profile: bool = False) -> dict:
    import lightning as L
    import torch

    from atlas.data.datamodule import TrajectoryDataModule, collate
    from atlas.module import AtlasLM

    data = TrajectoryDataModule(trajectories, [], tokenizer, max_length=None,
                                packing=pack_length is not None, pack_length=pack_length)
    data.setup("fit")
    module = AtlasLM(model, lr=1e-5, warmup_ratio=0.0)
    first = {k: v.to(device) for k, v in collate([data.train_examples[0]],
                                                  tokenizer.pad_token_id).items()}
    with torch_autocast(device, bf16), torch.no_grad():
        first_loss = module.loss(first)[0].item()
    trainer = L.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu",
                        devices=1, precision="bf16-mixed" if bf16 else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with measured(device, profile) as m:
        trainer.fit(module, datamodule=data)
    return {"first_loss": first_loss, **m,
            "tokens": sum(len(e.input_ids) for e in data.train_examples),
            "supervised_tokens": sum(e.num_supervised_tokens for e in data.train_examples)}


def run_trl(model, tokenizer, trajectories, device: str, bf16: bool, checkpointing: bool,
            profile: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [full_example(t, tokenizer) for t in trajectories]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=1, num_train_epochs=1,
                         learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                         logging_steps=10**6, save_strategy="no", report_to=[], max_length=None,
                         bf16=bf16, use_cpu=device == "cpu", gradient_checkpointing=checkpointing,
                         dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        first = {k: v.to(trainer.model.device)
                 for k, v in trainer.data_collator([rows[0]]).items()}
        with torch_autocast(device, bf16), torch.no_grad():
            first_loss = trainer.compute_loss(trainer.model, first).item()
        with measured(device, profile) as m:
            trainer.train()
    supervised = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    return {"first_loss": first_loss, **m,
            "tokens": sum(len(r["input_ids"]) for r in rows), "supervised_tokens": supervised}


def torch_autocast(device: str, bf16: bool):
    import contextlib

    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def child(trainer: str, ratio: float, n: int, model_name: str, model_config: str | None,
          tokenizer_name: str | None, checkpointing: bool, pack_length: int | None,
          profile: bool = False) -> dict:
    import torch

    from atlas.model import load_model, load_tokenizer, resolve_device

    device = resolve_device()
    bf16 = device == "cuda"
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_name or model_name)
    # fp32 weights everywhere; bf16 autocast on a GPU (both trainers' mixed precision)
    if model_config:  # the same architecture, randomly initialised (same cost, other numbers)
        cfg = {k: v for k, v in json.loads(Path(model_config).read_text()).items()
               if k not in ("_model_name_or_path", "architectures", "transformers_version",
                            "dtype")}
        model = load_model(config=cfg, gradient_checkpointing=checkpointing).to(device)
    else:
        model = load_model(name=model_name, gradient_checkpointing=checkpointing).to(device)
    model.train()
    trajectories = selected(n, ratio)
    with torch.no_grad():  # weights may be mapped from their file lazily: make them resident
        sum(float(p.float().sum()) for p in model.parameters())
    loaded = memory_mb(device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainer == "atlas":
        r = run_atlas(model, tokenizer, trajectories, device, bf16, pack_length, profile)
    else:
        r = run_trl(model, tokenizer, trajectories, device, bf16, checkpointing, profile)
    # fp32 weights, their gradients and AdamW's two moments, whatever the trainer
    r.update(loaded_memory_mb=loaded, weights_grads_adam_mb=4 * 4 * params / 2**20)
    return {"trainer": trainer, "ratio": ratio, "trajectories": len(trajectories),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "precision": "bf16-mixed" if bf16 else "fp32", **r,
            "supervised_tokens_per_s": r["supervised_tokens"] / r["seconds"],
            "peak_memory_mb": peak_memory_mb(device)}


def print_memory(rows: list[dict], kind: str) -> None:
    """Where each run's memory goes: before training, the fixed training state, the rest."""
    print(f"\nmemory ({kind} MB): loaded = libraries, weights and data before training; "
          f"peak = highest while training; weights+grads+adam = fp32 weights, their gradients "
          f"and AdamW's two moments; rest = peak - loaded - grads - adam (activations, "
          f"temporaries, allocator slack)")
    print(f"{'ratio':>5} {'trainer':<7} {'loaded':>8} {'peak':>8} {'weights+grads+adam':>19} "
          f"{'rest':>8}")
    for r in rows:
        rest = r["train_peak_memory_mb"] - r["loaded_memory_mb"] - 0.75 * r["weights_grads_adam_mb"]
        print(f"{r['ratio']:>5} {r['trainer']:<7} {r['loaded_memory_mb']:>8.0f} "
              f"{r['train_peak_memory_mb']:>8.0f} {r['weights_grads_adam_mb']:>19.0f} {rest:>8.0f}")


def print_profiles(rows: list[dict], ratios: list[float]) -> None:
    """The top operators of both trainers side by side."""
    for ratio in ratios:
        a, t = (next(r for r in rows if r["ratio"] == ratio and r["trainer"] == name)
                for name in ("atlas", "trl"))
        print(f"\nratio {ratio}: operators by self time (s), profiled totals "
              f"{a['profile_total_s']:.1f} (atlas) vs {t['profile_total_s']:.1f} (TRL)")
        ops = list(dict.fromkeys([*a["profile_s"], *t["profile_s"]]))
        ops.sort(key=lambda op: -max(a["profile_s"].get(op, 0), t["profile_s"].get(op, 0)))
        print(f"{'operator':<58} {'atlas':>8} {'TRL':>8}")
        for op in ops:
            fmt = lambda r: f"{r['profile_s'][op]:>8.2f}" if op in r["profile_s"] else f"{'<top15':>8}"
            print(f"{op[:58]:<58} {fmt(a)} {fmt(t)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--model-config", help="a config.json: random weights of that "
                        "architecture instead of --model's (where the weights cannot travel)")
    parser.add_argument("--tokenizer", help="tokenizer name or directory (default: --model's)")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="for both trainers (on: TRL's SFTConfig default)")
    parser.add_argument("--atlas-pack-length", type=int, help="atlas packs examples into rows "
                        "of this many tokens (data.loader.packing); TRL runs as before")
    parser.add_argument("--profile", action="store_true", help="memory at each phase and "
                        "torch.profiler's top operators (slow: use few trajectories)")
    parser.add_argument("--child", nargs=2, metavar=("TRAINER", "RATIO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], float(args.child[1]),
                                           args.trajectories, args.model, args.model_config,
                                           args.tokenizer, args.gradient_checkpointing == "on",
                                           args.atlas_pack_length, args.profile)))
        return
    rows = []
    for ratio in args.ratios:
        for trainer in ("atlas", "trl"):
            extra = [f"--{k.replace('_', '-')}={v}" for k, v in
                     (("model_config", args.model_config), ("tokenizer", args.tokenizer),
                      ("gradient_checkpointing", args.gradient_checkpointing),
                      ("atlas_pack_length", args.atlas_pack_length)) if v]
            extra += ["--profile"] if args.profile else []
            proc = subprocess.run([sys.executable, __file__, "--child", trainer, str(ratio),
                                   "--trajectories", str(args.trajectories), "--model",
                                   args.model, *extra], cwd=ROOT, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{trainer} at ratio {ratio} failed:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    memory = "peak CUDA MB" if rows[0]["device"] != "cpu" else "peak RSS MB"
    model = f"{args.model_config} (random init)" if args.model_config else args.model
    print(f"\n{args.trajectories} default trajectories, {model}, batch 1, one epoch, "
          f"{rows[0]['device']}, {rows[0]['precision']}, gradient checkpointing "
          f"{args.gradient_checkpointing}"
          + (f", atlas packed into rows of {args.atlas_pack_length} tokens"
             if args.atlas_pack_length else ""))
    print(f"{'ratio':>5} {'trainer':<7} {'tokens':>8} {'superv.':>8} {'epoch s':>8} "
          f"{'superv. tok/s':>13} {memory:>13} {'first loss':>11}")
    for r in rows:
        print(f"{r['ratio']:>5} {r['trainer']:<7} {r['tokens']:>8} {r['supervised_tokens']:>8} "
              f"{r['seconds']:>8.1f} {r['supervised_tokens_per_s']:>13.1f} "
              f"{r['peak_memory_mb']:>13.0f} {r['first_loss']:>11.5f}")
    ok = True
    for ratio in args.ratios:
        a, t = (next(r for r in rows if r["ratio"] == ratio and r["trainer"] == name)
                for name in ("atlas", "trl"))
        diff = abs(a["first_loss"] - t["first_loss"])
        ok &= diff <= 1e-4 or a["precision"] != "fp32"
        print(f"ratio {ratio}: atlas/TRL wall time {a['seconds'] / t['seconds']:.2f}x, "
              f"peak memory {a['peak_memory_mb'] / t['peak_memory_mb']:.2f}x, "
              f"first-batch loss difference {diff:.2e}")
    print_memory(rows, memory.split()[1])
    if args.profile:
        print_profiles(rows, args.ratios)
    for r in rows:
        print(json.dumps(r))
    if not ok:
        sys.exit("first-batch losses differ by more than 1e-4")


if __name__ == "__main__":
    main()
