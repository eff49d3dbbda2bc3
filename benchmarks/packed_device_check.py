"""A packed export loaded on a device computes what the CPU-loaded one does (issue 23's CUDA check).

    python benchmarks/packed_device_check.py cuda     # on a GPU machine; `cpu` runs the same here

tiny-llama with random weights, a plan that uses every action, `wq.load_quantized(folder, device=...)` in
float32 and bf16, packed and with `dequantize=True`: prints each one's largest logit difference from the
CPU-loaded float32 model, relative to the largest logit, and fails above 1e-3 (float32) or 0.1 (bf16)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch

import windquant_gym as wq
from windquant_gym.models.tiny import byte_tokenizer, tiny_llama
from windquant_gym.quant.bitwidths import N_ACTIONS

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
"""Largest logit difference allowed, relative to the largest logit, per dtype."""


def check(device: str) -> Dict[str, float]:
    model, tokenizer = tiny_llama(), byte_tokenizer()
    texts = ["The quick brown fox jumps over the lazy dog. " * 40 + f" document {i}." for i in range(20)]
    problem = wq.QuantProblem.build(model, tokenizer, texts, wq.QuantConfig(chunk_size=48), n_samples=8, seq_len=64,
                                    cache=False, progress=False)
    plan = (np.arange(len(problem.units)) % N_ACTIONS).tolist()  # every action, the skip included
    errors = {}
    with tempfile.TemporaryDirectory() as folder:
        exported = wq.export_plan(plan, problem, Path(folder) / "mixed")
        ids = problem.blocks[:2]
        with torch.no_grad():
            want = wq.load_quantized(exported)(ids).logits
        for dtype in (torch.float32, torch.bfloat16):
            for dequantize in (False, True):
                loaded = wq.load_quantized(exported, device=device, dtype=dtype, dequantize=dequantize)
                with torch.no_grad():
                    got = loaded(ids.to(device)).logits.float().cpu()
                name = str(dtype).removeprefix("torch.") + ("-dequantized" if dequantize else "")
                errors[name] = float((got - want).abs().max() / want.abs().max())
                print(f"{name:22s} max relative logit difference {errors[name]:.3g}", flush=True)
    return errors


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    errors = check(device)
    print(json.dumps({"device": device, "max_relative_error": errors}))
    bad = {k: v for k, v in errors.items() if v > TOLERANCE[k.split("-")[0]]}
    if bad:
        raise SystemExit(f"packed model on {device} differs from the CPU's beyond {TOLERANCE}: {bad}")
    print("PACKED CHECK PASSED")


if __name__ == "__main__":
    main()
