"""What this machine allows for greedy decoding of a small model, against its fp32 matmul rate.

    python bench/decode_throughput.py                    # SmolLM2-135M, batches 1/16/64, contexts 256/1500

Prints the fp32 matmul rate (a 2048x2048 product), the compute-bound ceiling it implies for the
model (2 FLOPs per parameter per token), and measured decode steps: one new token per row
against a KV cache of the given context, at several batch sizes. At small batches a decode step
reads every weight once (memory-bound); at long contexts it reads every row's cache too.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1500])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from atlas.model import load_model

    from rollout_throughput import matmul_ceiling  # bench/, beside this script

    model = load_model(args.model).eval()
    params = sum(p.numel() for p in model.parameters())
    gflops, ceiling = matmul_ceiling(model)
    print(f"fp32 matmul: {gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads; "
          f"{params / 1e6:.0f}M parameters -> compute-bound ceiling {ceiling:.0f} tokens/s")
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            for context in args.contexts:
                ids = torch.randint(0, 1000, (batch, context))
                cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
                x = torch.randint(0, 1000, (batch, 1))
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    model(input_ids=x, past_key_values=cache, use_cache=True)
                step = (time.perf_counter() - t0) / args.repeats
                rows.append({"batch": batch, "context": context, "ms_per_step": round(1000 * step),
                             "tokens_per_s": round(batch / step, 1)})
                print(f"batch {batch:>3}, context {context:>5}: {1000 * step:6.0f} ms a step, "
                      f"{batch / step:6.1f} tokens/s ({100 * batch / step / ceiling:.0f}% of the ceiling)")
    print(json.dumps({"matmul_gflops": round(gflops, 1), "ceiling_tokens_per_s": round(ceiling),
                      "decode": rows}))


if __name__ == "__main__":
    main()
