"""A packed export where it runs (issue 23): memory, speed and equality against the float model.

    python benchmarks/packed_inference.py --out bench/packed \\
        --plan 2.0=benchmarks/results/front/search/search_s0_2.0_plans/search-nll_from_calibrated-knapsack-2b-213ev-s0.json \\
        --plan 2.5=... --plan 3.0=... --uniform 4

Every plan is exported (``windquant export``) and each model runs in its own process, one
after another, so that peak RSS is the process's own: the float32 model, the bf16 model and
every packed export (``AutoModelForCausalLM.from_pretrained`` after ``import
windquant_gym``). Per model: bytes of the quantized Linears resident in memory (against
``storage_bits * n / 8`` for the packed ones), whole-process peak RSS of load + a 256-token
greedy generation, prefill tokens/s (1 x 512, best of 3 after a warm-up) and decode tokens/s
(batch 1, 256 new tokens after a 32-token prompt), once per decode path (``--decode-path``: the
native kernel and the tensor-op path, side by side). Then, in this process, per plan: the
packed model's logits against the dequantized model's (``load_quantized(...,
dequantize=True)``), its greedy text against theirs for 64 tokens, and its held-out PPL
against the env's for the plan (the model with the plan's weights applied). Prints the CPU,
and every speed as a ratio to the float32 model measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from windquant_gym.compute.process import cpu_name
from windquant_gym.memory import peak_rss_bytes

PROMPT_TOKENS, DECODE_TOKENS, PREFILL_TOKENS, TEXT_TOKENS = 32, 256, 512, 64




def _peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``: ``ru_maxrss`` would carry the parent's peak over
    fork and exec, and the parent holds the problem; ``ru_maxrss`` only where /proc is missing)."""
    return peak_rss_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(tokenizer, n: int) -> torch.Tensor:
    import windquant_gym as wq

    text = " ".join(wq.load_texts("wiki-sample", split="eval")[:50])
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :n]


def worker(kind: str, source: str, model_name: str, out: Path) -> None:
    """One model in this process: load, measure, generate; writes ``out`` (JSON)."""
    import windquant_gym as wq
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    started = time.perf_counter()
    if kind == "packed":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        tokenizer = wq.load_tokenizer(source)
        linears = [m for m in model.modules() if isinstance(m, wq.PackedLinear)]
        resident = sum(m.resident_bytes() for m in linears)
    else:
        dtype = torch.float32 if kind == "float32" else torch.bfloat16
        model, tokenizer = wq.load_model(model_name, device="cpu", dtype=dtype)
        units = wq.find_units(model, 256)
        names = {u.module for u in units}
        resident = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in names)
    load_seconds = time.perf_counter() - started
    with torch.no_grad():
        long = _prompt(tokenizer, PREFILL_TOKENS)
        model(long)  # warm-up
        prefill = []
        for _ in range(3):
            t = time.perf_counter()
            model(long)
            prefill.append(time.perf_counter() - t)
        prompt = long[:, :PROMPT_TOKENS]
        t = time.perf_counter()
        generated = model.generate(prompt, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        decode_seconds = time.perf_counter() - t
    peak_bytes = _peak_rss_bytes()
    out.write_text(json.dumps({
        "kind": kind, "source": source, "load_seconds": load_seconds, "quantized_linear_bytes": resident,
        "peak_rss_bytes": peak_bytes, "prefill_tokens_per_s": PREFILL_TOKENS / min(prefill),
        "decode_tokens_per_s": DECODE_TOKENS / decode_seconds, "threads": torch.get_num_threads(),
        "generated": generated[0, PROMPT_TOKENS:].tolist(),
    }))


#: The packed model's decode path per run: the native kernel (``packed_gemv.c``) or tensor ops.
DECODE_PATHS = {"native": "on", "tensor-ops": "off"}


def _run_worker(kind: str, source: str, model_name: str, folder: Path, decode_path: str = "native") -> dict:
    out = folder / f"worker_{kind}_{Path(source).name or 'model'}_{decode_path}.json"
    env = {**os.environ, "WINDQUANT_NATIVE_GEMV": DECODE_PATHS[decode_path]}
    subprocess.run([sys.executable, __file__, "--worker", kind, "--source", source, "--model", model_name,
                    "--worker-out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def checks(folder: Path, plan_path: Path, problem, n_windows: int) -> dict:
    """Packed vs dequantized logits and greedy text; packed vs the env's held-out PPL."""
    import windquant_gym as wq
    from windquant_gym.data import eval_windows, load_texts

    packed = wq.load_quantized(folder)
    dense = wq.load_quantized(folder, dequantize=True)
    tokenizer = problem.tokenizer
    ids = _prompt(tokenizer, 128)
    with torch.no_grad():
        a, b = packed(ids).logits, dense(ids).logits
        a1, b1 = packed(ids[:, :4]).logits, dense(ids[:, :4]).logits  # the table (decode) path
        rel = max(float((a - b).abs().max() / b.abs().max()), float((a1 - b1).abs().max() / b1.abs().max()))
        prompt = ids[:, :PROMPT_TOKENS]
        kw = dict(max_new_tokens=TEXT_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text_equal = torch.equal(packed.generate(prompt, **kw), dense.generate(prompt, **kw))
    blocks = eval_windows(load_texts("wiki-sample", split="eval"), tokenizer, 256, n_windows)
    ppl_packed = wq.perplexity(packed, blocks, batch_size=8)
    plan = wq.plan.QuantPlan.load(plan_path)
    with wq.quantized_weights(problem.model, problem.table, plan.actions) as env_model:
        ppl_env = wq.perplexity(env_model, blocks, batch_size=8)
    return {"logits_max_rel_diff": rel, "greedy_64_equal": text_equal, "heldout_ppl_packed": ppl_packed,
            "heldout_ppl_env": ppl_env}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PLAN.json",
                        help="a plan to export and measure (repeatable)")
    parser.add_argument("--uniform", type=float, action="append", default=[], help="also a uniform plan at these bits")
    parser.add_argument("--out", type=Path, default=Path("bench/packed"))
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows (x 256 tokens) of the PPL check")
    parser.add_argument("--decode-path", nargs="+", choices=sorted(DECODE_PATHS), default=["native", "tensor-ops"],
                        help="the packed models' decode paths to measure, each export once per path (side by side)")
    parser.add_argument("--worker", choices=("float32", "bfloat16", "packed"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.source, args.model, args.worker_out)
        return

    import windquant_gym as wq
    from windquant_gym.quant.bitwidths import action_index

    if not args.plan:
        raise SystemExit("give at least one --plan NAME=PLAN.json (e.g. a bench row's plan file)")
    args.out.mkdir(parents=True, exist_ok=True)
    named = [(name, Path(path)) for name, _, path in (p.partition("=") for p in args.plan)]
    first = wq.plan.QuantPlan.load(named[0][1])
    problem = first.problem_spec().build(progress=False)
    for bits in args.uniform:
        path = args.out / f"uniform-{bits:g}.json"
        wq.plan.QuantPlan.from_problem(problem, [action_index(bits)] * len(problem.units)).save(path)
        named.append((f"uniform {bits:g}", path))
    rows = []
    print(f"{args.model}, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    base = {kind: _run_worker(kind, "", args.model, args.out) for kind in ("float32", "bfloat16")}
    for kind, result in base.items():
        rows.append({"model": kind, **{k: v for k, v in result.items() if k != "generated"}})
    for name, plan_path in named:
        folder = args.out / name.replace(" ", "-")
        wq.export_plan(plan_path, problem, folder, overwrite=True)
        size = wq.packed_size(folder)
        check = checks(folder, plan_path, problem, args.eval_windows)
        plan_bits = problem.table.plan_bits(wq.plan.QuantPlan.load(plan_path).actions)
        for path in args.decode_path:
            result = _run_worker("packed", str(folder), args.model, args.out, path)
            rows.append({"model": f"packed {name} ({path})", "decode_path": path,
                         **{k: v for k, v in result.items() if k != "generated"},
                         "storage_bits": plan_bits["storage_bits"], "effective_bits": plan_bits["effective_bits"],
                         "accounted_bytes": size.accounted_bytes, "file_packed_bytes": size.packed_bytes, **check})
    f32 = rows[0]
    for row in rows:
        row["prefill_vs_float32"] = row["prefill_tokens_per_s"] / f32["prefill_tokens_per_s"]
        row["decode_vs_float32"] = row["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
        if "accounted_bytes" in row:
            row["resident_vs_accounted"] = row["quantized_linear_bytes"] / row["accounted_bytes"]
            saving = f32["quantized_linear_bytes"] - row["quantized_linear_bytes"]
            row["weights_saving_bytes"] = saving
            row["rss_saving_bytes"] = f32["peak_rss_bytes"] - row["peak_rss_bytes"]
    (args.out / "packed_inference.json").write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    header = ("| model | quantized Linears in memory | vs storage bits / 8 | peak RSS load+generate | RSS saved / weights saved "
              "| prefill tok/s (1x512) | decode tok/s | logits rel. diff | greedy 64 equal | held-out PPL packed / env |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        mib = row["quantized_linear_bytes"] / 2**20
        lines.append(
            f"| {row['model']} | {mib:.1f} MiB | "
            + (f"{row['resident_vs_accounted']:.3f}" if "resident_vs_accounted" in row else "-") + " | "
            f"{row['peak_rss_bytes'] / 2**20:.0f} MiB | "
            + (f"{row['rss_saving_bytes'] / 2**20:.0f} / {row['weights_saving_bytes'] / 2**20:.0f} MiB" if "rss_saving_bytes" in row else "-")
            + f" | {row['prefill_tokens_per_s']:.0f} ({row['prefill_vs_float32']:.2f}x) | {row['decode_tokens_per_s']:.1f} "
            f"({row['decode_vs_float32']:.2f}x) | "
            + (f"{row['logits_max_rel_diff']:.1e} | {row['greedy_64_equal']} | {row['heldout_ppl_packed']:.2f} / "
               f"{row['heldout_ppl_env']:.2f} |" if "logits_max_rel_diff" in row else "- | - | - |")
        )
    table = "\n".join(lines)
    (args.out / "packed_inference.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
