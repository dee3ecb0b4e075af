"""Oracle throughput: trajectories/s through the oracle path at concurrency 1 vs 16, and what a
re-run costs.

    python bench/oracle_throughput.py                        # 64 trajectories, 200 ms latency
    python bench/oracle_throughput.py --trajectories 128 --latency 0.5 --provider anthropic

Every request goes through the real SDK client (openai or anthropic), the real prompt, answer
validation and the on-disk cache, to a loopback server (atlas/testing/fake_provider.py) that answers
each request after ``--latency`` seconds, as a remote API would. Each concurrency starts from
an empty cache; the last run repeats the highest concurrency on its warm cache and should send
0 requests. Prints a table and one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "atlas" / "data" / "default"


def run(provider: str, url: str, trajectories, concurrency: int, cache_dir: str) -> dict:
    from atlas.oracle import AnthropicOracle, OpenAIOracle
    from atlas.selection import num_selected

    if provider == "openai":
        oracle = OpenAIOracle(base_url=url + "/v1", concurrency=concurrency, cache_dir=cache_dir)
    else:
        oracle = AnthropicOracle(base_url=url, concurrency=concurrency, cache_dir=cache_dir)
    candidates = [t.selected_steps for t in trajectories]
    t0 = time.perf_counter()
    judgements = oracle.judge(trajectories, candidates,
                              [num_selected(0.3, len(c)) for c in candidates])
    seconds = time.perf_counter() - t0
    assert all(j.ok for j in judgements), [j.error for j in judgements if not j.ok][:3]
    return {"provider": provider, "concurrency": concurrency,
            "trajectories": len(trajectories), "seconds": round(seconds, 3),
            "trajectories_per_s": round(len(trajectories) / seconds, 2),
            "requests": oracle.last_run["requests"], "from_cache": oracle.last_run["from_cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    args = parser.parse_args()

    import logging

    from atlas.data.datamodule import load_trajectories
    from atlas.testing.fake_provider import FakeProvider

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-loopback")  # the loopback server's only
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-bench-loopback")
    trajectories = load_trajectories([str(p) for p in sorted(DATA.glob("*.jsonl"))],
                                     limit=args.trajectories)
    rows = []
    with FakeProvider(latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            rows.append(run(args.provider, server.url, trajectories, c, f"{tmp}/c{c}"))
        rows.append(run(args.provider, server.url, trajectories, args.concurrency[-1],
                        f"{tmp}/c{args.concurrency[-1]}") | {"rerun": True})
    print(f"\n{args.provider} oracle, {len(trajectories)} trajectories, "
          f"{args.latency * 1000:.0f} ms per request (loopback server)")
    print(f"{'run':<22}{'seconds':>9}{'traj/s':>9}{'requests':>10}{'cached':>8}")
    for r in rows:
        name = f"concurrency {r['concurrency']}" + (" re-run" if r.get("rerun") else "")
        print(f"{name:<22}{r['seconds']:>9.2f}{r['trajectories_per_s']:>9.2f}"
              f"{r['requests']:>10}{r['from_cache']:>8}")
    base = rows[0]["trajectories_per_s"]
    for r in rows[1:-1]:
        print(f"speed-up at concurrency {r['concurrency']}: {r['trajectories_per_s'] / base:.1f}x")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
