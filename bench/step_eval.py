"""Cost of the step-level evaluation (atlas/step_eval.py) of the default suite.

    python bench/step_eval.py                       # SmolLM2-135M, conf/eval/default.yaml's suite
    python bench/step_eval.py --checkpoint logs/train/runs/<time>/model   # a trained model
    python bench/step_eval.py --engine policy       # the batched Policy.generate path, to compare
    python bench/step_eval.py --override eval.steps.tasks=4 --override eval.steps.batch_size=64

Builds (or reads from the cache) the expert test trajectories of every held-in and held-out
environment, then times ``step_eval.score`` on them: scored steps per group, seconds, steps/s,
tokens teacher-forced and generated. Test-set generation and model loading happen before the
clock. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a train.py model/ directory (default: base)")
    p.add_argument("--override", action="append", default=[], help="a Hydra override of evaluate.yaml")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engine", choices=["shared_prefix", "policy"], default="shared_prefix",
                   help="policy: the batched Policy.generate path (models the decoder cannot run)")
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from atlas import step_eval
    from atlas.evaluation import environments, load_agent
    from atlas.rollout import Policy

    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=args.override)
    envs = environments(cfg.eval)
    items, _ = step_eval.load_suite(envs, cfg.eval.steps)
    model, tokenizer = load_agent(args.checkpoint, cfg.model)
    steps = cfg.eval.steps
    policy = None  # the default: the shared-prefix decoder where the model supports it
    if args.engine == "policy":
        policy = Policy(model, tokenizer, max_new_tokens=steps.max_new_tokens, segment=steps.get("segment"))
    engine = args.engine if policy or step_eval.SharedPrefixDecoder.supports(model) else "policy"
    t0 = time.perf_counter()
    records = step_eval.score(model, tokenizer, items, steps.batch_size, steps.max_new_tokens,
                              policy=policy, segment=steps.get("segment"))
    seconds = time.perf_counter() - t0
    generated = sum(len(tokenizer(r["response"])["input_ids"]) for r in records)
    trajectory_tokens = sum(len(step_eval.tokenize_steps(t, tokenizer).input_ids) for t, *_ in items)
    groups = {}
    for r in records:
        groups[r["group"]] = groups.get(r["group"], 0) + 1
    summary = step_eval.summarize(records, {n: g for n, (g, _) in envs.items()})
    row = {"model": args.checkpoint or cfg.model.name, "engine": engine,
           "threads": torch.get_num_threads(), "slots": steps.batch_size,
           "trajectories": len(items), "steps": len(records), "steps_per_group": groups,
           "seconds": round(seconds, 1), "steps_per_s": round(len(records) / seconds, 2),
           "teacher_forced_tokens": trajectory_tokens, "generated_tokens": generated,
           "generated_per_s": round(generated / seconds, 1),
           "accuracy": {g: a["accuracy"]["value"] for g, a in summary["averages"].items()}}
    print(step_eval.format_table(summary))
    print(f"\n{engine}: {len(records)} steps ({groups}) in {seconds:.1f} s = {row['steps_per_s']} "
          f"steps/s; {trajectory_tokens} tokens teacher-forced once; {generated} generated")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
