"""Table build time, the paper's fit against chunk-local error compensation (issue 13),
measured side by side in one process on the same calibration.

    python benchmarks/table_build.py --model smollm2-135m --preset cpu --repeats 2

Each config is built ``--repeats`` times, alternating, uncached; the last build of each is
reported (the first build in a process also pays page faults: see RESULTS.md). Also times
the calibration pass with and without the Hessian blocks. Prints ratios to the paper's fit.
"""

from __future__ import annotations

import argparse
import time

import torch

import windquant_gym as wq
from windquant_gym.agents import load_hyperparams
from windquant_gym.data import sample_token_blocks, statistics_blocks
from windquant_gym.envs.windquant import quant_config_from_kwargs
from windquant_gym.quant.build import build_table
from windquant_gym.quant.units import find_units
from windquant_gym.compute.process import cpu_name

CONFIGS = {
    "paper (round, activation metric)": dict(compensation="none", error_metric="activation"),
    "round, output metric": dict(compensation="none", error_metric="output"),
    "gptq, output metric (default)": dict(compensation="gptq", error_metric="output"),
    "gptq, output metric, scale refit": dict(compensation="gptq", error_metric="output", scale_refit="output"),
    "gptq, output metric, scale refit, asymmetric": dict(compensation="gptq", error_metric="output",
                                                        scale_refit="output", grid="asymmetric"),
    "gptq, output metric, scale refit, rotation": dict(compensation="gptq", error_metric="output",
                                                      scale_refit="output", rotation="hadamard"),
    "gptq, output metric, scale refit, rotation, obs": dict(compensation="gptq", error_metric="output",
                                                           scale_refit="output", rotation="hadamard",
                                                           salient_metric="obs"),
}
# Every config names its saliency rule, so that a preset's own (e.g. the cpu preset's "obs") does
# not leak into the configs built before that lever existed.
for _fields in CONFIGS.values():
    _fields.setdefault("salient_metric", "activation")


def time_statistics_pass(model, tokenizer, units, blocks, env_kwargs, n: int, length: int, proxy_seconds: float) -> None:
    """Time the calibration pass on a statistics set of ``n x length`` tokens apart from the proxy."""
    statistics = statistics_blocks(wq.load_texts("wiki-sample"), tokenizer, n, length, tuple(blocks.shape) + (
        int(env_kwargs.get("seed", 0)),))
    started = time.perf_counter()
    wq.calibrate(model, units, statistics, progress=False)
    elapsed = time.perf_counter() - started
    print(f"calibration pass on the statistics set ({n} x {length}, with Hessians): {elapsed:.2f} s (paid once per "
          f"model and set, cached; {elapsed / proxy_seconds:.2f}x the proxy's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="cpu", help="hyperparams.yml block whose env_kwargs give chunk and calibration size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                        help="which configs to build (default: all): " + "; ".join(CONFIGS))
    parser.add_argument("--statistics-blocks", type=int, nargs=2, default=[64, 256], metavar=("N", "LEN"),
                        help="also time the calibration pass on a statistics set of N x LEN tokens apart from the "
                             "proxy (QuantConfig.hessian_blocks / hessian_seq_len; issue 26) (default: 64 256; 0 0: not timed)")
    args = parser.parse_args()
    env_kwargs = load_hyperparams(args.preset)["env_kwargs"]
    model, tokenizer = wq.load_model(args.model)
    blocks = sample_token_blocks(wq.load_texts("wiki-sample"), tokenizer, env_kwargs["n_calibration_samples"],
                                 env_kwargs["calibration_seq_len"], int(env_kwargs.get("seed", 0)))
    units = find_units(model, env_kwargs["chunk_size"])
    print(f"{args.model}, {len(units)} units, calibration {tuple(blocks.shape)}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    timings = {}
    for hessians in (False, True, False, True):
        started = time.perf_counter()
        calibration = wq.calibrate(model, units, blocks, progress=False, hessians=hessians)
        timings[hessians] = time.perf_counter() - started
    print(f"calibration pass: {timings[False]:.2f} s without Hessians, {timings[True]:.2f} s with "
          f"({timings[True] / timings[False]:.2f}x)")
    n, length = args.statistics_blocks
    if n > 0:
        time_statistics_pass(model, tokenizer, units, blocks, env_kwargs, n, length, timings[True])
    seconds = {}
    for _ in range(args.repeats):
        for name, fields in ((n, CONFIGS[n]) for n in args.configs):
            preset = dict(env_kwargs.get("quant_config") or {}, **fields)  # e.g. the preset's damping
            config = quant_config_from_kwargs(env_kwargs["chunk_size"], env_kwargs.get("salient_rate", 0.03), preset)
            started = time.perf_counter()
            build_table(model, calibration.act_scales, config, hessians=calibration.hessians, cache=False, progress=False)
            seconds[name] = time.perf_counter() - started
    base_name = args.configs[0]
    for name, value in seconds.items():
        print(f"table build, {name:46} {value:6.1f} s  ({value / seconds[base_name]:.2f}x {base_name!r})")


if __name__ == "__main__":
    wq.keep_freed_memory()
    main()
