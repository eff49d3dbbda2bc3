"""benchmarks/scale.py (issue 24): the pipeline per size in a process of its own, its JSON, the
fitted exponents and the projections."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fit_recovers_a_power_law_and_needs_two_sizes(scale):
    weights = [1e8, 3e8, 1e9]
    k, c = scale.fit_exponent(weights, [2.0 * w**1.07 for w in weights])
    assert k == pytest.approx(1.07) and c == pytest.approx(2.0)
    assert scale.fit_exponent([1e8], [3.0]) is None
    assert scale.fit_exponent(weights, [None, 5.0, None]) is None  # a stage measured at one size only


def test_the_report_projects_each_stage_from_its_own_exponent(scale, tmp_path):
    def size(name, w):
        return {"size": name, "weights": w, "proxy_tokens": 2048, "forward_gflops": 100.0, "episode_over_forward": 1.1,
                "paper_over_ours": 5.0, "table_seconds": 1e-7 * w, "calibration_seconds": 1e-8 * w,
                "forward_seconds": 1e-8 * w, "episode_seconds": 1.1e-8 * w, "paper_episode_seconds": 5.5e-8 * w,
                "heldout_seconds": 2e-8 * w, "export_seconds": 1e-9 * w, "peak_rss_bytes": 20.0 * w}
    results = {"machine": {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "x", "gemm_fp32_gflops": 200.0},
               "sizes": {"135m": size("135m", 1.06e8), "360m": size("360m", 3.15e8), "1b": size("1b", 9.7e8)}}
    text = scale.report(results, str(tmp_path / "scale.png"))
    assert "| table | 1.00 | 698 s | 6850 s |" in text  # linear stages: exponent 1, 1e-7 s per weight
    assert "| peak_rss | 1.00 | 130 GiB | 1276 GiB |" in text
    assert "100 (50%)" in text  # achieved proxy GFLOP/s against the machine's large-product peak
    assert "H200 floor of one episode at 8b" in text and "511 s at 1B" in text
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    assert "on this CPU from the 3 sizes" in text


def test_a_gpu_report_holds_the_pass_against_the_bf16_peak_and_shows_gpu_memory(scale):
    """On a GPU the model is bf16: its pass is measured against the bf16 product, its memory is the GPU's."""
    def size(name, w):
        return {"size": name, "weights": w, "proxy_tokens": 2048, "forward_gflops": 400_000.0, "episode_over_forward": 30.0,
                "table_seconds": 1e-8 * w, "forward_seconds": 1e-11 * w, "episode_seconds": 1e-9 * w,
                "peak_rss_bytes": 4e9, "peak_gpu_bytes": 12.0 * w, "estimated_peak_bytes": 9.6 * w}
    results = {"machine": {"cpu": "Host CPU", "cores": 16, "threads": 16, "torch": "x", "device": "NVIDIA H200",
                           "gemm_fp32_gflops": 50_000.0, "gemm_bf16_gflops": 800_000.0},
               "sizes": {"1b": size("1b", 1e9), "8b": size("8b", 7e9)}}
    text = scale.report(results, None)
    assert "400000 (50%)" in text  # against bf16's 800 TFLOP/s, not fp32's 50
    assert "| 11.18 GiB |" in text and "(0.80)" in text  # peak GPU memory, and the estimate against it
    assert "on NVIDIA H200 from the 2 sizes" in text


def test_the_test_shape_runs_the_whole_pipeline_in_its_own_process(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "WINDQUANT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # streamed (8B's layout; CI's own run of the script covers the default one)
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "test", "--json", str(out), "--episodes", "1",
                           "--heldout-windows", "4", "--stream", "on"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    record = results["sizes"]["test"]
    for key in ("weights", "table_seconds", "calibration_seconds", "forward_seconds", "episode_seconds",
                "paper_episode_seconds", "peak_rss_bytes", "heldout_seconds", "export_seconds", "export_bytes"):
        assert record[key] > 0, key
    # the cpu preset's statistics set (64 x 256 tokens) is its own stage: the table is fitted with its Hessians
    assert set(record["stage_seconds"]) == set(record["stage_peak_rss_bytes"]) == set(
        ("load", "calibration", "statistics", "table", "forward", "episode", "paper_episode", "heldout", "export"))
    assert record["statistics_tokens"] == 64 * 256 and record["statistics_seconds"] > 0
    assert record["weights"] == 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)  # q, o + k, v + gate, up, down
    assert record["proxy_gflop"] == pytest.approx(2 * 2048 * (record["weights"] + 128 * 512) / 1e9)
    assert math.isfinite(record["heldout_ppl"])
    assert record["stream"] is True
    assert record["estimated_peak_bytes"] == pytest.approx(record["peak_rss_bytes"], rel=0.25)
    assert record["estimate_parts_bytes"]["assembled weights"] == 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)  # one layer
    assert results["machine"]["cores"] == os.cpu_count() and results["machine"]["gemm_fp32_gflops"] > 0
    assert "| test |" in done.stdout
