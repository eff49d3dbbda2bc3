"""``windquant sweep``: runs fanned out on a local Ray (2 CPUs), skipped when finished,
resumed when killed, one leaderboard at the end."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from windquant_gym.errors import ConfigError, MissingDependencyError
from windquant_gym.sweep import SweepArgs, plan_runs, run_status, run_sweep
from windquant_gym.sweep.execute import import_ray
from windquant_gym.sweep.runs import FINISHED, INTERRUPTED, NEW, train_argv

RAY_REASON = 'windquant sweep needs Ray: pip install -e ".[sweep]"'


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _args(out, **changes):
    return SweepArgs(**{"model": "tiny-llama", "preset": "smoke", "seeds": [0, 1], "target_bits": [3.0, 2.0],
                        "out": str(out), "progress": False, **changes})


def test_a_2x2_sweep_writes_four_runs_and_one_leaderboard_and_a_rerun_trains_nothing(local_ray, tmp_path):
    args = _args(tmp_path / "sweep")
    result = run_sweep(args)
    assert not result.failed and len(result.trained) == 4 and not result.skipped
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert folders == ["bits2-seed0", "bits2-seed1", "bits3-seed0", "bits3-seed1"]
    for run in plan_runs(args):
        summary = json.loads((run.folder / "summary.json").read_text())
        assert summary["target_bits"] == run.target_bits and summary["agent_seed"] == run.seed
    board = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    learned = [r for r in board["leaderboard"] if r["allocator"] == "MaskablePPO smoke"]
    assert [(r["target_bits"], r["episodes"]) for r in learned] == [(3.0, 2), (2.0, 2)]
    for row in learned:  # median and spread of the two seeds' held-out perplexities
        seeds = [e["heldout_ppl"] for e in board["episodes"] if e["allocator"] == row["allocator"] and e["target_bits"] == row["target_bits"]]
        assert row["heldout_min"] == min(seeds) and row["heldout_max"] == max(seeds)
        assert row["heldout_ppl"] == pytest.approx(sum(seeds) / 2)
    baselines = {(r["allocator"], r["target_bits"]) for r in board["leaderboard"]}
    assert {("knapsack", 3.0), ("knapsack", 2.0), ("unquantized", 3.0)} <= baselines
    assert (tmp_path / "sweep" / "leaderboard.csv").exists()
    assert "| MaskablePPO smoke | 3.000 |" in (tmp_path / "sweep" / "leaderboard.md").read_text()

    stamps = {run.name: (run.folder / "summary.json").stat().st_mtime_ns for run in plan_runs(args)}
    again = run_sweep(args)
    assert again.trained == [] and len(again.skipped) == 4 and not again.failed
    assert stamps == {run.name: (run.folder / "summary.json").stat().st_mtime_ns for run in plan_runs(args)}
    # adding a seed runs only the new combinations
    grown = run_sweep(_args(tmp_path / "sweep", seeds=[0, 1, 2], target_bits=[2.0]))
    assert [r.name for r in grown.trained] == ["bits2-seed2"] and len(grown.skipped) == 2


def _pids_running(folder: Path):
    """Processes whose command line names ``folder`` (the run's ``windquant train``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(folder).encode() in cmdline and b"train" in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the run's process through /proc")
def test_a_run_killed_mid_training_fails_alone_and_resumes_on_the_next_sweep(local_ray, tmp_path):
    args = _args(tmp_path / "sweep", seeds=[0], episodes=60)
    victim, other = plan_runs(args)
    outcome = {}
    sweeping = threading.Thread(target=lambda: outcome.setdefault("result", run_sweep(args)))
    sweeping.start()
    deadline = time.monotonic() + 240
    killed = False
    while sweeping.is_alive() and time.monotonic() < deadline and not killed:
        if (victim.folder / "checkpoints" / "latest.json").exists():
            for pid in _pids_running(victim.folder):
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    sweeping.join(timeout=300)
    assert killed, "the run finished before the test could kill it"
    result = outcome["result"]
    assert list(result.failed) == [victim.name] and "killed by signal 9" in result.failed[victim.name]
    assert [r.name for r in result.trained] == [other.name]
    assert run_status(victim.folder) == INTERRUPTED and run_status(other.folder) == FINISHED
    board = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert board["meta"]["failed"].keys() == {victim.name}
    assert {e["target_bits"] for e in board["episodes"] if e["allocator"].startswith("MaskablePPO")} == {other.target_bits}

    resumed = run_sweep(args)
    assert [r.name for r in resumed.resumed] == [victim.name] and [r.name for r in resumed.skipped] == [other.name]
    summary = json.loads((victim.folder / "summary.json").read_text())
    assert summary["resumed_from_episode"] > 0 and summary["training_episodes"] == 60
    assert "--resume" in (victim.folder / "train.log").read_text()


# ----- without Ray, and bad input ------------------------------------------------------------
def test_without_ray_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[sweep\]"'):
        import_ray()


@pytest.mark.parametrize("changes, message", [
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [0, 0]}, "must not repeat"),
    ({"seeds": [-1]}, r"seeds must be integers >= 0, got \[-1\]"),
    ({"target_bits": [0.5]}, r"target_bits must lie in \[1, 16\].*got \[0.5\]"),
    ({"cpus_per_run": 0}, "cpus_per_run must be > 0"),
    ({"episodes": 0}, "episodes must be >= 1"),
])
def test_bad_sweep_arguments_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _args(tmp_path, **changes)


def test_a_rerun_with_other_settings_is_refused_before_anything_runs(tmp_path):
    from windquant_gym.sweep.config import check_sweep_folder

    check_sweep_folder(_args(tmp_path, episodes=3))
    with pytest.raises(ConfigError, match=r"other settings \(episodes: 3 there, 4 now\).*pick another --out"):
        run_sweep(_args(tmp_path, episodes=4))


def test_run_states_and_the_command_each_gets(tmp_path):
    args = _args(tmp_path)
    run = plan_runs(args)[0]
    assert run_status(run.folder) == NEW
    assert train_argv(run, args)[:2] == ["train", "--model"] and "--overwrite" in train_argv(run, args)
    # a checkpoint that does not read back (killed mid-write) is no checkpoint: start again
    (run.folder / "checkpoints" / "episode_000001").mkdir(parents=True)
    (run.folder / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "episode_000001", "episodes": 1}))
    assert run_status(run.folder) == NEW and "--overwrite" in train_argv(run, args)
    (run.folder / "summary.json").write_text('{"results": ')  # cut short: not finished
    assert run_status(run.folder) == NEW
    (run.folder / "summary.json").write_text('{"results": {}}')
    assert run_status(run.folder) == FINISHED
