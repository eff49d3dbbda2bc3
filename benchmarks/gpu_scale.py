"""WindQuant-v0 at LLaMA-3.2-1B and LLaMA-3.1-8B scale on one GPU (issue 5, part 4).

    python benchmarks/gpu_scale.py --size 1b 8b            # needs CUDA; nothing is downloaded
    python benchmarks/gpu_scale.py --size 1b 8b --json "$OUT/gpu_scale.json"   # on the device tool

Models are built from the published configs' shapes with random weights (bf16), the
proxy is 64 x 256 random tokens, chunk 256, 3% protection. Printed per size: table build
time, episode time of our path (decisions + assembly + proxy), peak GPU memory during
episodes, and the paper-faithful episode (every unit refitted, one at a time) for the
(a)/(b) ratio. Targets: 1B episode <= 5 s; 8B episode <= 30 s with peak memory <= 20 GB.

For 8B the table (six quantized copies of 7B weights) is kept in host memory and each
decoder layer's weights are assembled only while it runs (``--stream``, the default for
8B), so the GPU holds the bf16 model plus one layer's quantized weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import windquant_gym as wq
from windquant_gym.problem import _cached_calibration
from windquant_gym.quant.build import build_table
from windquant_gym.quant.units import find_units

sys.path.insert(0, str(Path(__file__).parent))
from episode_speed import paper_faithful_proxy_nll  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings (the published configs)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    # a smoke test of this script on a CPU: `--size test --device cpu`
    "test": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, head_dim=64),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_llama(size: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[size], rope_theta=500000.0, max_position_embeddings=8192, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 8B would not fit beside the rest
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def random_policy_episode(env: gym.Env, rng: np.random.Generator, device: torch.device) -> dict:
    started = time.perf_counter()
    env.reset()
    done = False
    while not done:
        allowed = np.flatnonzero(env.unwrapped.action_masks())
        _, _, done, _, info = env.step(int(rng.choice(allowed)))
    sync(device)
    info["wall"] = time.perf_counter() - started
    return info


def run(size: str, episodes: int, paper_episodes: int, stream: bool | None, device: torch.device) -> dict:
    torch.manual_seed(0)
    stream = size == "8b" if stream is None else stream
    started = time.perf_counter()
    model = random_llama(size, device)
    n_params = sum(p.numel() for p in model.parameters())
    where_table = "host memory" if stream else "the model's device"
    print(f"\n== {size}: {n_params / 1e9:.2f} B parameters, built in {time.perf_counter() - started:.0f} s, "
          f"stream={stream}, table on {where_table}")
    blocks = torch.randint(0, model.config.vocab_size, (64, 256), generator=torch.Generator().manual_seed(0))
    config = wq.QuantConfig(chunk_size=256, salient_rate=0.03)
    units = find_units(model, config.chunk_size)
    t = time.perf_counter()
    calibration = _cached_calibration(model, units, blocks, 8, False, True)
    sync(device)
    print(f"calibration (64 x 256): {time.perf_counter() - t:.1f} s, {len(units)} units")
    t = time.perf_counter()
    table = build_table(model, calibration.act_scales, config, hessians=calibration.hessians, cache=False, progress=True,
                        storage_device="cpu" if stream else None)
    sync(device)
    table_seconds = time.perf_counter() - t
    print(f"table build: {table_seconds:.1f} s")
    problem = wq.QuantProblem(model, None, units, blocks, calibration, table, batch_size=8, stream=stream)
    env = gym.make("WindQuant-v0", model=model, problem=problem, target_bits=2.5)
    rng = np.random.default_rng(0)
    random_policy_episode(env, rng, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = [random_policy_episode(env, rng, device) for _ in range(episodes)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    b = statistics.median(e["wall"] for e in ours)
    print(f"our episode: {b:.2f} s (assembly {statistics.median(e['assemble_seconds'] for e in ours):.2f} s, "
          f"proxy {statistics.median(e['forward_seconds'] for e in ours):.2f} s), peak GPU memory {peak:.1f} GiB")
    result = {"size": size, "parameters": n_params, "units": len(units), "stream": stream, "table_seconds": table_seconds,
              "episode_seconds": b, "assemble_seconds": statistics.median(e["assemble_seconds"] for e in ours),
              "forward_seconds": statistics.median(e["forward_seconds"] for e in ours), "peak_gpu_gib": peak}
    if paper_episodes:
        problem.stream = False  # the paper-faithful path holds a full quantized copy: not part of the peak above
        paper = []
        for episode in ours[:paper_episodes]:
            t = time.perf_counter()
            paper_faithful_proxy_nll(problem, episode["plan"])
            sync(device)
            paper.append(time.perf_counter() - t)
        a = statistics.median(paper)
        print(f"paper-faithful episode: {a:.1f} s   (a)/(b) = {a / b:.1f}")
        result.update(paper_episode_seconds=a, a_over_b=a / b)
    env.close()
    del env, problem, table, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--paper-episodes", type=int, default=1)
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with --size test)")
    parser.add_argument("--json", help="also write the figures here, rewritten after each size (kept if a later size fails)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_scale.py needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU, smoke-test it "
                         "with --size test --device cpu, and measure with benchmarks/episode_speed.py.")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    results = {"device": name, "torch": torch.__version__, "sizes": []}
    for size in args.size:
        results["sizes"].append(run(size, args.episodes, args.paper_episodes,
                                    None if args.stream == "auto" else args.stream == "on", device))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    # keep_freed_memory() is left off here: its memory cost was measured at 135M only, not with
    # a 1B/8B model and a host-memory table.
    main()
