"""GPTQ damping chosen on a validation split (issue 13): the output error of compensated
codes over rounding's, on calibration-split text disjoint from the Hessian's blocks (never
the eval split the leaderboard reports), for several dampings and bit widths.

    python benchmarks/damping_validation.py --n-samples 16 --seq-len 128    # the cpu preset's Hessian
    python benchmarks/damping_validation.py --n-samples 64 --seq-len 256    # the default calibration

Per module and width: the scales are fitted as the table does, the codes chosen with the
Hessian of the calibration blocks, and the error measured with the validation blocks'
Hessian; printed is the geometric mean over a spread of modules of (compensated / rounded).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import windquant_gym as wq
from windquant_gym.data import sample_token_blocks
from windquant_gym.quant.accounting import n_protected
from windquant_gym.quant.bitwidths import BIT_WIDTHS
from windquant_gym.quant.compensation import (
    activation_order, compensated_codes, inverse_cholesky, permute_columns, permute_square,
)
from windquant_gym.quant.quantizers import dequantize_codes, fit_scales, int8_outliers, protect_salient

MODULES = [(0, "self_attn.q_proj"), (4, "self_attn.o_proj"), (8, "mlp.down_proj"), (12, "mlp.gate_proj"),
           (16, "self_attn.v_proj"), (20, "self_attn.o_proj"), (24, "mlp.up_proj"), (28, "mlp.down_proj"),
           (29, "self_attn.o_proj")]


def inputs(model, names, blocks):
    captured = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: captured.setdefault(n, []).append(i[0].detach().reshape(-1, i[0].shape[-1]).float()))
        for n in names]
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), 8):
                model(blocks[start : start + 8])
    finally:
        for hook in hooks:
            hook.remove()
    return {n: torch.cat(v) for n, v in captured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-samples", type=int, default=16, help="calibration blocks (the Hessian's tokens)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--validation-blocks", type=int, default=32, help="128-token blocks, another seed, proxy blocks removed")
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = wq.load_model(args.model)
    texts = wq.load_texts("wiki-sample", split="calibration")
    calibration = sample_token_blocks(texts, tokenizer, args.n_samples, args.seq_len, 0)
    candidates = sample_token_blocks(texts, tokenizer, args.validation_blocks + 16, 128, 7)
    # a validation block must not be a stretch of a calibration block
    flat = {tuple(row[i : i + 8].tolist()) for row in calibration for i in range(0, row.numel() - 7)}
    validation = torch.stack([b for b in candidates if tuple(b[:8].tolist()) not in flat][: args.validation_blocks])
    names = [f"model.layers.{layer}.{module}" for layer, module in MODULES]
    x_cal, x_val = inputs(model, names, calibration), inputs(model, names, validation)
    g = args.chunk_size
    print(f"{args.model}: Hessian from {calibration.numel()} calibration tokens, error on {validation.numel()} "
          f"validation tokens (calibration split, other blocks), {len(names)} modules, chunk {g}")
    ratios = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach().float()
        starts = [c for c in range(0, weight.shape[1], g) if weight.shape[1] - c >= g]
        w = torch.stack([weight[:, c : c + g] for c in starts])
        s = torch.stack([x_cal[name].abs().mean(0)[c : c + g] for c in starts])[:, None, :]
        hessian = lambda x: torch.stack([x[:, c : c + g].T @ x[:, c : c + g] for c in starts]) / x.shape[0]
        h_cal, h_val = hessian(x_cal[name]), hessian(x_val[name])
        protected = protect_salient(w, s, n_protected(w[0].numel(), 0.03))
        o_scale, o_codes = int8_outliers(w, protected)
        outliers = o_codes.float() * o_scale
        order = activation_order(h_cal)
        restore = torch.argsort(order, dim=-1)
        for action in (2, 3, 4, 5):
            spec = BIT_WIDTHS[action]
            fit = fit_scales(w, ~protected, s * s, spec, 10, 0.1)

            def error(codes):
                diff = w - torch.where(protected, outliers, dequantize_codes(codes, fit.alpha, spec))
                return float((torch.bmm(diff, h_val) * diff).sum())

            rounded = error(fit.codes)
            for damping in args.dampings:
                hinv = inverse_cholesky(permute_square(h_cal, order), damping)
                ordered = compensated_codes(permute_columns(w, order), fit.alpha, spec, hinv,
                                            permute_columns(protected, order), permute_columns(outliers, order))
                ratios.setdefault((action, damping), []).append(error(permute_columns(ordered, restore)) / rounded)
    for action in (2, 3, 4, 5):
        cells = "  ".join(f"{d:g}: {np.exp(np.mean(np.log(ratios[(action, d)]))):.3f}" for d in args.dampings)
        print(f"{BIT_WIDTHS[action].bits:>4} bit, validation output error / rounding's, by damping:  {cells}")


if __name__ == "__main__":
    main()
