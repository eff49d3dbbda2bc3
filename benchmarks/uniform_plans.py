"""Uniform plans on one model: table build time, proxy and held-out perplexity, effective
vs storage bits, fallbacks. The engine's sanity sheet (issue 2's closing note).

    python benchmarks/uniform_plans.py --model smollm2-135m --salient-rates 0.03 0
    python benchmarks/uniform_plans.py --salient-rates 0.03 --compensation none gptq   # issue 13
"""

from __future__ import annotations

import argparse
import time

import windquant_gym as wq
from windquant_gym.data import eval_windows
from windquant_gym.quant import ACTION_BITS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--salient-rates", type=float, nargs="+", default=[0.03, 0.0])
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=96, help="held-out windows, spread over the whole eval split")
    parser.add_argument("--no-cache", action="store_true", help="rebuild tables (to time them)")
    parser.add_argument("--compensation", nargs="+", default=["gptq"], choices=["none", "gptq"],
                        help="QuantConfig.compensation of each table ('none': the paper's fit)")
    args = parser.parse_args()

    model, tokenizer = wq.load_model(args.model)
    held_out = eval_windows(wq.load_texts("wiki-sample", split="eval"), tokenizer, args.seq_len, args.eval_windows)
    print(f"model {args.model}, chunk {args.chunk_size}, proxy {args.n_samples}x{args.seq_len}, "
          f"held-out {len(held_out)}x{args.seq_len} tokens of the wiki-sample eval split")
    fp_heldout = None
    for rate, compensation in ((r, c) for r in args.salient_rates for c in args.compensation):
        config = wq.QuantConfig(chunk_size=args.chunk_size, salient_rate=rate, compensation=compensation)
        started = time.perf_counter()
        problem = wq.QuantProblem.build(model, tokenizer, "wiki-sample", config, n_samples=args.n_samples,
                                        seq_len=args.seq_len, cache=not args.no_cache, progress=False)
        print(f"\nsalient_rate {rate}, compensation {compensation}: {len(problem.units)} units, prepare {time.perf_counter() - started:.1f} s "
              f"(table build {problem.table.build_seconds:.1f} s), proxy PPL of the unquantized model {problem.baseline_ppl:.2f}")
        if fp_heldout is None:
            fp_heldout = wq.perplexity(model, held_out)
            print(f"held-out PPL of the unquantized model {fp_heldout:.2f}")
        print(f"{'bits':>5} {'effective':>9} {'storage':>8} {'fallbacks':>9} {'proxy PPL':>10} {'held-out PPL':>12} {'s':>6}")
        for action, bits in enumerate(ACTION_BITS):
            plan = [action] * len(problem.units)
            started = time.perf_counter()
            accounting = problem.table.plan_bits(plan)
            proxy = problem.proxy_ppl(plan)
            with wq.quantized_weights(model, problem.table, plan, problem._assembler):
                heldout = wq.perplexity(model, held_out)
            print(f"{bits:>5} {accounting['effective_bits']:9.3f} {accounting['storage_bits']:8.3f} "
                  f"{accounting['fallbacks']:9d} {proxy:10.2f} {heldout:12.2f} {time.perf_counter() - started:6.1f}", flush=True)


if __name__ == "__main__":
    wq.keep_freed_memory()  # our process: reuse freed memory (windquant_gym/compute/process.py)
    main()
