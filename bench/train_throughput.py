"""Training throughput of the default model on this machine: tokens/s and peak RSS.

    python bench/train_throughput.py                      # SmolLM2-135M, seq 1024, batch 1, full and LoRA
    python bench/train_throughput.py --modes full --steps 3 --seq-len 512

Each mode runs in its own process so that peak RSS is that mode's alone. One step is what a
training step does: forward, masked NLL over the supervised tokens, backward, AdamW update.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(mode: str, model_name: str, seq_len: int, steps: int, threads: int | None) -> dict:
    import torch

    from atlas.data import read_trajectories
    from atlas.data.masking import tokenize_steps
    from atlas.model import load_model, load_tokenizer
    from atlas.module import masked_nll

    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_name)
    peft = None
    if mode == "lora":
        from peft import LoraConfig

        peft = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                          target_modules="all-linear")
    model = load_model(name=model_name, peft=peft)
    model.train()
    # real expert data: rendered default trajectories, concatenated up to seq_len tokens
    ids: list[int] = []
    for t in read_trajectories("pkg://atlas/data/fireact/fireact_hotpotqa.jsonl"):
        ids += tokenize_steps(t, tokenizer).input_ids
        if len(ids) >= seq_len:
            break
    input_ids = torch.tensor([ids[:seq_len]])
    step_ids = torch.zeros_like(input_ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = masked_nll(logits, input_ids, step_ids)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    per_step = sum(times) / len(times)
    return {"mode": mode, "seq_len": seq_len, "steps": steps, "s_per_step": round(per_step, 2),
            "tokens_per_s": round(seq_len / per_step, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.modes[0], a.model, a.seq_len, a.steps, a.threads)))
        return
    from atlas.model import resolve_model_name

    resolve_model_name(a.model)  # convert the embedded model first, outside the timings
    rows = []
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--child", "--modes", mode, "--model", a.model,
               "--seq-len", str(a.seq_len), "--steps", str(a.steps)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"model={a.model} seq_len={a.seq_len} batch=1 fp32 steps={a.steps} (after 1 warm-up)")
    print(f"{'mode':<6} {'s/step':>8} {'tokens/s':>9} {'peak RSS GB':>12} {'threads':>8}")
    for r in rows:
        print(f"{r['mode']:<6} {r['s_per_step']:>8} {r['tokens_per_s']:>9} {r['peak_rss_gb']:>12} {r['threads']:>8}")


if __name__ == "__main__":
    main()
