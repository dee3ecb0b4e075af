"""Rollout throughput and where its time goes: episodes/s, generated tokens/s, prefill vs decode.

    python bench/rollout_throughput.py                     # SmolLM2-135M, 4 test tasks x 4 envs
    python bench/rollout_throughput.py --model logs/train/runs/<run>/model --envs babyai wordle
    python bench/rollout_throughput.py --modes batched segmented --max-new-tokens 160

Every mode plays the same test tasks with the same model, greedy decoding and the same turn and
token caps, through the same rollout loop (atlas/rollout.py); only the Policy's batching differs:

    one         one episode at a time
    batched     16 episodes a batch, each batch decoding until its last row stops
    segmented   the same, but rows that have stopped leave the batch every ``--segment`` tokens
    nocache     batched, without the per-episode KV cache reuse across turns

Greedy decoding gives the same episodes in every mode (the table's success column shows it).
For each mode it prints where the time went: model forwards that read a prompt (prefill), model
forwards that write one token per row (decode), the environments' reset/step, and the rest
(tokenizing, the generate loop, cache copies). "decode rows" counts every row of every decode
forward: a row that has already stopped but stays in its batch still costs one; "useful" is the
share of those that wrote a token of a response (the first token of a response comes from its
prefill; tokens are counted by re-tokenizing the responses, so the share is approximate). Generated tokens/s is set against the
compute-bound ceiling fp32 matmul on this machine allows (2 FLOPs per parameter per token).
Prints a table and one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
MODES = {"one": (1, True, None), "batched": (None, True, None), "segmented": (None, True, "seg"),
         "nocache": (None, False, None)}


class Clock:
    """Model forwards split into prefill (several new tokens a row) and decode (one a row)."""

    def __init__(self, model):
        self.prefill = self.decode = 0.0
        self.prefill_tokens = self.decode_rows = 0
        self._t0 = 0.0
        self.hooks = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                      model.register_forward_hook(self._stop, with_kwargs=True)]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _start(self, module, args, kwargs):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, kwargs, output):
        seconds = time.perf_counter() - self._t0
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[1] > 1:
            self.prefill += seconds
            self.prefill_tokens += ids.numel()
        else:
            self.decode += seconds
            self.decode_rows += ids.shape[0]


def timed_env(env, totals: dict):
    """The environment, with its reset/step time added to ``totals['env']``."""
    for name in ("reset", "step"):
        method = getattr(env, name)

        def wrapped(*a, _method=method, **k):
            t0 = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                totals["env"] += time.perf_counter() - t0
        setattr(env, name, wrapped)
    return env


def play(model, tokenizer, env_cfgs, args, mode: str) -> dict:
    from hydra.utils import instantiate

    from atlas.rollout import EnvPool, Policy, run_episodes

    batch_size, reuse, segment = MODES[mode]
    batch_size = batch_size or args.batch_size
    segment = args.segment if segment else None
    totals = {"env": 0.0}
    pool = EnvPool({name: (lambda c=c: timed_env(instantiate(c), totals))
                    for name, c in env_cfgs.items()}, instances=batch_size)
    tasks = pool.tasks("test", args.episodes)  # starts one instance per engine, before the clock
    totals["env"] = 0.0
    policy = Policy(model, tokenizer, max_new_tokens=args.max_new_tokens, reuse_cache=reuse,
                    segment=segment)
    clock = Clock(model)
    t0 = time.perf_counter()
    try:
        done = run_episodes(policy, pool, tasks, batch_size=batch_size,
                            max_turns={n: args.max_turns for n in env_cfgs})
    finally:
        pool.close()
        clock.close()
    seconds = time.perf_counter() - t0
    turns = sum(e.turns for e in done)
    generated = sum(len(tokenizer(m.content)["input_ids"]) for e in done
                    for m in e.trajectory.messages if m.role == "assistant")
    return {"mode": mode, "batch_size": batch_size, "reuse_cache": reuse, "segment": segment,
            "episodes": len(done), "turns": turns, "generated_tokens": generated,
            "seconds": round(seconds, 1), "episodes_per_s": len(done) / seconds,
            "generated_tokens_per_s": generated / seconds,
            "success": sum(e.success for e in done),
            "success_by_env": {n: f"{sum(e.success for e in done if e.trajectory.env == n)}/"
                                  f"{sum(e.trajectory.env == n for e in done)}" for n in env_cfgs},
            "invalid_actions": sum(e.invalid for e in done),
            "prefill_s": round(clock.prefill, 1), "decode_s": round(clock.decode, 1),
            "env_s": round(totals["env"], 1),
            "other_s": round(seconds - clock.prefill - clock.decode - totals["env"], 1),
            "prefill_tokens": clock.prefill_tokens, "decode_rows": clock.decode_rows,
            "prompt_tokens_reused": policy.reused_tokens}


def matmul_ceiling(model) -> tuple[float, float]:
    """fp32 matmul GFLOP/s here (a 2048x2048 product) and the tokens/s it allows the model."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    gflops = 2 * 2048 ** 3 / ((time.perf_counter() - t0) / 10) / 1e9
    params = sum(p.numel() for p in model.parameters())
    return gflops, gflops * 1e9 / (2 * params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="hub id, embedded:<key> or a saved model directory (train.py's model/)")
    p.add_argument("--envs", nargs="+", default=["babyai", "maze", "wordle", "twx"])
    p.add_argument("--episodes", type=int, default=4, help="test tasks per environment")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--segment", type=int, default=48)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["one", "batched", "segmented"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch
    from omegaconf import OmegaConf

    from atlas.model import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(name=args.model).eval(), load_tokenizer(args.model)
    gflops, ceiling = matmul_ceiling(model)
    env_cfgs = {name: OmegaConf.load(CONF / "env" / f"{name}.yaml") for name in args.envs}
    rows = []
    for mode in args.modes:
        row = play(model, tokenizer, env_cfgs, args, mode)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["episodes_per_s"]
    print(f"\n{args.model}, {rows[0]['episodes']} episodes "
          f"({', '.join(args.envs)}; {args.episodes} test tasks each), <= {args.max_turns} turns, "
          f"<= {args.max_new_tokens} new tokens/turn, greedy, {torch.get_num_threads()} threads")
    print(f"fp32 matmul {gflops:.0f} GFLOP/s -> compute-bound ceiling {ceiling:.0f} tokens/s")
    print(f"{'mode':>10}{'batch':>6}{'seconds':>9}{'episodes/s':>11}{'gen tok/s':>10}{'% ceil':>7}"
          f"{'success':>8}{'prefill s':>10}{'decode s':>9}{'env s':>7}{'other s':>8}"
          f"{'decode rows':>12}{'useful':>7}{'speedup':>8}")
    for r in rows:
        print(f"{r['mode']:>10}{r['batch_size']:>6}{r['seconds']:>9.1f}{r['episodes_per_s']:>11.3f}"
              f"{r['generated_tokens_per_s']:>10.1f}{100 * r['generated_tokens_per_s'] / ceiling:>6.0f}%"
              f"{r['success']:>8}{r['prefill_s']:>10.1f}{r['decode_s']:>9.1f}{r['env_s']:>7.1f}"
              f"{r['other_s']:>8.1f}{r['decode_rows']:>12}"
              f"{100 * (r['generated_tokens'] - r['turns']) / max(r['decode_rows'], 1):>6.0f}%"
              f"{r['episodes_per_s'] / base:>7.1f}x")
    print("success by environment: " + "; ".join(
        f"{r['mode']}: " + ", ".join(f"{n} {v}" for n, v in r["success_by_env"].items())
        for r in rows))


if __name__ == "__main__":
    main()
