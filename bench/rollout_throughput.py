"""Rollout throughput: episodes/s with batched generation vs one episode at a time.

    python bench/rollout_throughput.py                     # SmolLM2-135M, 16 test tasks
    python bench/rollout_throughput.py --envs babyai maze --episodes 2 --max-turns 3

Both modes play the same test tasks with the same model, greedy decoding and the same turn and
token caps, through the same rollout loop (atlas/rollout.py); only ``batch_size`` differs. The
optional third mode turns off the per-episode KV cache reuse, to show what it contributes.
Prints a table and one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def play(model, tokenizer, env_cfgs, episodes: int, batch_size: int, max_turns: int,
         max_new_tokens: int, reuse_cache: bool) -> dict:
    from hydra.utils import instantiate

    from atlas.rollout import EnvPool, Policy, run_episodes

    pool = EnvPool({name: (lambda c=c: instantiate(c)) for name, c in env_cfgs.items()},
                   instances=batch_size)
    tasks = pool.tasks("test", episodes)  # starts one instance per engine, before the clock
    policy = Policy(model, tokenizer, max_new_tokens=max_new_tokens, reuse_cache=reuse_cache)
    t0 = time.perf_counter()
    try:
        done = run_episodes(policy, pool, tasks, batch_size=batch_size,
                            max_turns={n: max_turns for n in env_cfgs})
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    turns = sum(e.turns for e in done)
    generated = sum(len(tokenizer(m.content)["input_ids"]) for e in done
                    for m in e.trajectory.messages if m.role == "assistant")
    return {"batch_size": batch_size, "reuse_cache": reuse_cache, "episodes": len(done),
            "turns": turns, "generated_tokens": generated, "seconds": round(seconds, 1),
            "episodes_per_s": len(done) / seconds, "turns_per_s": turns / seconds,
            "success": sum(e.success for e in done), "prompt_tokens_fed": policy.computed_tokens,
            "prompt_tokens_reused": policy.reused_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--envs", nargs="+", default=["babyai", "maze", "wordle", "twx"])
    p.add_argument("--episodes", type=int, default=4, help="test tasks per environment")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-cache-mode", action="store_true",
                   help="also run batched without the per-episode KV cache reuse")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch
    from omegaconf import OmegaConf

    from atlas.model import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(name=args.model), load_tokenizer(args.model)
    env_cfgs = {name: OmegaConf.load(CONF / "env" / f"{name}.yaml") for name in args.envs}
    modes = [(1, True), (args.batch_size, True)] + ([(args.batch_size, False)]
                                                     if args.no_cache_mode else [])
    rows = []
    for batch_size, reuse in modes:
        row = play(model, tokenizer, env_cfgs, args.episodes, batch_size, args.max_turns,
                   args.max_new_tokens, reuse)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["episodes_per_s"]
    print(f"\n{args.model}, {rows[0]['episodes']} episodes "
          f"({', '.join(args.envs)}; {args.episodes} test tasks each), <= {args.max_turns} turns, "
          f"<= {args.max_new_tokens} new tokens/turn, greedy, {torch.get_num_threads()} threads")
    print(f"{'batch':>6}{'kv reuse':>10}{'seconds':>9}{'episodes/s':>12}{'turns/s':>9}"
          f"{'gen tokens':>12}{'speedup':>9}")
    for r in rows:
        print(f"{r['batch_size']:>6}{str(r['reuse_cache']):>10}{r['seconds']:>9.1f}"
              f"{r['episodes_per_s']:>12.3f}{r['turns_per_s']:>9.2f}{r['generated_tokens']:>12}"
              f"{r['episodes_per_s'] / base:>8.1f}x")


if __name__ == "__main__":
    main()
