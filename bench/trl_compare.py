"""atlas vs TRL's SFTTrainer on the same data, model and masks: one epoch each, side by side.

    pip install -e '.[bench]'                       # TRL, only for this benchmark
    python bench/trl_compare.py                     # SmolLM2-135M, 16 default trajectories, ratio 0.3 and 1.0
    python bench/trl_compare.py --trajectories 64 --ratios 0.3
    python bench/trl_compare.py --atlas adamw adamw+bwd adamw8bit+bwd adamw+b4   # atlas variants

Each ``--atlas`` variant is ``OPTIMIZER[+bwd][+bN]``: ``module.optimizer`` (adamw, adamw8bit,
adamw4bit), ``+bwd`` for ``module.optimizer_in_backward=true``, ``+b4`` for batches of 4
length-grouped examples (``data.loader.batch_size=4 data.loader.group_by_length=true``).

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
one JSON line per run. Every atlas variant sees the same examples in the same order, so their
per-step losses are compared with the first variant's (plain AdamW by default): the table gives
the largest difference over the epoch. Time per fed token is each run's epoch time over the
tokens it fed, so each trainer is measured against its own floor.

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


def variant(name: str) -> dict:
    """``OPTIMIZER[+bwd][+bN]`` as AtlasLM and data module settings."""
    optimizer, *flags = name.split("+")
    out = {"optimizer": optimizer, "optimizer_in_backward": False, "batch_size": 1}
    for flag in flags:
        if flag == "bwd":
            out["optimizer_in_backward"] = True
        elif flag[:1] == "b" and flag[1:].isdigit():
            out["batch_size"] = int(flag[1:])
        else:
            raise SystemExit(f"--atlas {name}: unknown flag {flag!r} (bwd, or bN for a batch size)")
    return out


def state_mb(name: str, params: int) -> tuple[float, float]:
    """(gradients, optimizer states) in MB that a variant holds by construction: fp32 gradients
    unless stepped in the backward pass (then one parameter's at a time), and AdamW's two
    moments in fp32, 8 or 4 bits (plus their block scales, ignored here)."""
    v = variant(name)
    bytes_per_moment = {"adamw": 4, "adamw8bit": 1, "adamw4bit": 0.5}[v["optimizer"]]
    return (0.0 if v["optimizer_in_backward"] else 4 * params / 2**20,
            2 * bytes_per_moment * params / 2**20)


def run_atlas(model, tokenizer, trajectories, device: str, bf16: bool,
              pack_length: int | None = None, profile: bool = False,
              name: str = "adamw", lr: float = 1e-5) -> dict:
    import lightning as L
    import torch

    from atlas.data.datamodule import TrajectoryDataModule, collate
    from atlas.module import AtlasLM

    v = variant(name)
    data = TrajectoryDataModule(trajectories, [], tokenizer, max_length=None,
                                packing=pack_length is not None, pack_length=pack_length,
                                batch_size=v["batch_size"], group_by_length=v["batch_size"] > 1,
                                seed=0)
    data.setup("fit")
    module = AtlasLM(model, lr=lr, warmup_ratio=0.0, optimizer=v["optimizer"],
                     optimizer_in_backward=v["optimizer_in_backward"])
    first = {k: v.to(device) for k, v in collate([data.train_examples[0]],
                                                  tokenizer.pad_token_id).items()}
    with torch_autocast(device, bf16), torch.no_grad():
        first_loss = module.loss(first)[0].item()
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = L.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu",
                        devices=1, precision="bf16-mixed" if bf16 else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Losses()])
    module.check_trainer(trainer)
    with measured(device, profile) as m:
        trainer.fit(module, datamodule=data)
    return {"first_loss": first_loss, **m, "losses": losses,
            "tokens": sum(len(e.input_ids) for e in data.train_examples),
            "supervised_tokens": sum(e.num_supervised_tokens for e in data.train_examples)}


def run_trl(model, tokenizer, trajectories, device: str, bf16: bool, checkpointing: bool,
            profile: bool = False, lr: float = 1e-5) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [full_example(t, tokenizer) for t in trajectories]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=1, num_train_epochs=1,
                         learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
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
          profile: bool = False, name: str = "adamw", lr: float = 1e-5) -> dict:
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
        r = run_atlas(model, tokenizer, trajectories, device, bf16, pack_length, profile, name, lr)
    else:
        r = run_trl(model, tokenizer, trajectories, device, bf16, checkpointing, profile, lr)
    # fp32 weights, their gradients and AdamW's two moments, whatever the trainer
    grads, states = state_mb(name if trainer == "atlas" else "adamw", params)
    r.update(loaded_memory_mb=loaded, grads_mb=grads, states_mb=states, params=params)
    return {"trainer": trainer, "variant": name if trainer == "atlas" else "adamw",
            "ratio": ratio, "trajectories": len(trajectories),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "precision": "bf16-mixed" if bf16 else "fp32", **r,
            "supervised_tokens_per_s": r["supervised_tokens"] / r["seconds"],
            "ms_per_fed_token": 1000 * r["seconds"] / r["tokens"],
            "peak_memory_mb": peak_memory_mb(device)}


def label(r: dict) -> str:
    return "TRL" if r["trainer"] == "trl" else f"atlas {r['variant']}"


def print_memory(rows: list[dict], kind: str) -> None:
    """Where each run's memory goes: before training, the fixed training state, the rest."""
    print(f"\nmemory by phase ({kind} MB): loaded = libraries, fp32 weights and data before "
          f"training; grads = fp32 gradients held at once (0 when stepped in the backward pass); "
          f"states = AdamW's two moments (fp32, 8 or 4 bits); rest = peak - loaded - grads - "
          f"states (activations, temporaries, allocator slack); peak = highest while training")
    print(f"{'ratio':>5} {'run':<22} {'loaded':>8} {'grads':>8} {'states':>8} {'rest':>8} "
          f"{'peak':>8}")
    for r in rows:
        rest = r["train_peak_memory_mb"] - r["loaded_memory_mb"] - r["grads_mb"] - r["states_mb"]
        print(f"{r['ratio']:>5} {label(r):<22} {r['loaded_memory_mb']:>8.0f} {r['grads_mb']:>8.0f} "
              f"{r['states_mb']:>8.0f} {rest:>8.0f} {r['train_peak_memory_mb']:>8.0f}")


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
    parser.add_argument("--atlas", nargs="+", default=["adamw", "adamw+bwd", "adamw8bit",
                                                      "adamw8bit+bwd", "adamw4bit+bwd"],
                        help="atlas variants OPTIMIZER[+bwd][+bN], each against TRL; the "
                        "first is the loss curves' reference")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of both "
                        "trainers (atlas: cosine decay over the epoch; TRL: constant)")
    parser.add_argument("--variant", default="adamw", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("TRAINER", "RATIO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], float(args.child[1]),
                                           args.trajectories, args.model, args.model_config,
                                           args.tokenizer, args.gradient_checkpointing == "on",
                                           args.atlas_pack_length, args.profile,
                                           args.variant, args.lr)))
        return
    rows = []
    runs = [(ratio, trainer, name) for ratio in args.ratios
            for trainer, name in [("trl", "adamw")] + [("atlas", v) for v in args.atlas]]
    for v in args.atlas:
        variant(v)  # a wrong name stops here, not after the first runs
    for ratio, trainer, name in runs:
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in
                 (("model_config", args.model_config), ("tokenizer", args.tokenizer),
                  ("gradient_checkpointing", args.gradient_checkpointing),
                  ("atlas_pack_length", args.atlas_pack_length)) if v]
        extra += ["--profile"] if args.profile else []
        print(f"ratio {ratio}: {trainer} {name if trainer == 'atlas' else ''}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", trainer, str(ratio),
                               "--variant", name, "--lr", str(args.lr),
                               "--trajectories", str(args.trajectories),
                               "--model", args.model, *extra], cwd=ROOT, capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{trainer} {name} at ratio {ratio} failed:\n{proc.stdout[-3000:]}"
                     f"{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    memory = "peak CUDA MB" if rows[0]["device"] != "cpu" else "peak RSS MB"
    model = f"{args.model_config} (random init)" if args.model_config else args.model
    print(f"\n{args.trajectories} default trajectories, {model}, one epoch at lr {args.lr:g}, "
          f"{rows[0]['device']}, {rows[0]['precision']}, gradient checkpointing "
          f"{args.gradient_checkpointing}"
          + (f", atlas packed into rows of {args.atlas_pack_length} tokens"
             if args.atlas_pack_length else ""))
    print("x TRL: against TRL at the same ratio; |dloss|: largest per-step loss difference from "
          f"atlas {args.atlas[0]} at the same batch size, over the epoch")
    print(f"{'ratio':>5} {'run':<22} {'tokens fed':>10} {'superv.':>8} {'epoch s':>8} "
          f"{'ms/fed tok':>10} {memory:>12} {'time x TRL':>10} {'peak x TRL':>10} "
          f"{'ms/tok x TRL':>12} {'first loss':>11} {'|dloss|':>8}")
    ok, goal = True, []
    for r in rows:
        t = next(x for x in rows if x["ratio"] == r["ratio"] and x["trainer"] == "trl")
        ref = next((x for x in rows if x["ratio"] == r["ratio"] and x["trainer"] == "atlas"
                    and x["variant"] == args.atlas[0]), None)
        dloss = "-"
        if r["trainer"] == "atlas" and ref is not None and r is not ref and \
                variant(r["variant"])["batch_size"] == variant(ref["variant"])["batch_size"]:
            dloss = f"{max(abs(a - b) for a, b in zip(r['losses'], ref['losses'])):.4f}"
        peak_x = r["peak_memory_mb"] / t["peak_memory_mb"]
        print(f"{r['ratio']:>5} {label(r):<22} {r['tokens']:>10} {r['supervised_tokens']:>8} "
              f"{r['seconds']:>8.1f} {r['ms_per_fed_token']:>10.2f} {r['peak_memory_mb']:>12.0f} "
              f"{r['seconds'] / t['seconds']:>10.2f} {peak_x:>10.2f} "
              f"{r['ms_per_fed_token'] / t['ms_per_fed_token']:>12.2f} {r['first_loss']:>11.5f} "
              f"{dloss:>8}")
        if r["trainer"] == "atlas" and dloss != "-" and r["variant"].split("+")[0] == "adamw" \
                and "bwd" in r["variant"] and args.atlas[0] == "adamw" and float(dloss) > 1e-4 \
                and r["precision"] == "fp32":
            ok = False  # the same update, only earlier: the losses must not move
            print(f"  {r['variant']}: per-step losses differ from {args.atlas[0]}'s by {dloss}")
        if r["trainer"] == "atlas":
            diff = abs(r["first_loss"] - t["first_loss"])
            ok &= diff <= 1e-4 or r["precision"] != "fp32"
            if r["ratio"] == 0.3 and peak_x <= 0.7:
                goal.append(f"{r['variant']} ({peak_x:.2f}x)")
    if 0.3 in args.ratios:
        print(f"goal, peak at ratio 0.3 <= 0.7x TRL's: "
              + (f"met by {', '.join(goal)}" if goal else "not met by any variant"))
    print_memory(rows, memory.split()[1])
    print("\nper-step losses (first 8 steps)")
    for r in rows:
        if r["trainer"] == "atlas":
            print(f"{r['ratio']:>5} {label(r):<22} " + " ".join(f"{x:.4f}" for x in r["losses"][:8]))
    if args.profile:
        print_profiles(rows, args.ratios)
    for r in rows:
        print(json.dumps(r))
    if not ok:
        sys.exit("first-batch losses differ by more than 1e-4, or AdamW in the backward pass "
                 "moved the loss curve by more than 1e-4")


if __name__ == "__main__":
    main()
