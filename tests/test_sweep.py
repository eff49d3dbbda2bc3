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


def test_a_2x2_sweep_writes_four_runs_and_one_leaderboard_and_a_rerun_trains_nothing(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))  # the runs' processes get it too
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
    # the table was built once, before any run started, and shared through the cache
    [table] = (tmp_path / "cache" / "tables").glob("*.safetensors")
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 1
    started = min((run.folder / "config.json").stat().st_mtime_ns for run in plan_runs(args))
    assert table.stat().st_mtime_ns < started

    stamps = {run.name: (run.folder / "summary.json").stat().st_mtime_ns for run in plan_runs(args)}
    again = run_sweep(args)
    assert again.trained == [] and len(again.skipped) == 4 and not again.failed
    assert stamps == {run.name: (run.folder / "summary.json").stat().st_mtime_ns for run in plan_runs(args)}
    # adding a seed runs only the new combinations
    grown = run_sweep(_args(tmp_path / "sweep", seeds=[0, 1, 2], target_bits=[2.0]))
    assert [r.name for r in grown.trained] == ["bits2-seed2"] and len(grown.skipped) == 2


def test_the_leaderboard_shows_the_median_and_range_over_seeds(tmp_path):
    from windquant_gym.sweep.report import run_rows

    args = _args(tmp_path, seeds=[0, 1, 2], target_bits=[2.0])
    for run, heldout in zip(plan_runs(args), (30.0, 10.0, 20.0)):
        run.folder.mkdir(parents=True)
        result = {"effective_bits": 2.0, "storage_bits": 2.4, "proxy_ppl": heldout / 2, "heldout_ppl": heldout}
        (run.folder / "summary.json").write_text(json.dumps({
            "results": {"policy": result, "knapsack": {**result, "heldout_ppl": 40.0}, "unquantized": {**result, "heldout_ppl": 5.0}},
            "returned": "policy", "evaluations": 11, "setup_seconds": 1.0, "train_seconds": 2.0}))
    from windquant_gym.harness.leaderboard import aggregate

    learned, knapsack, unquantized = aggregate(run_rows(args, plan_runs(args)))
    assert (learned["heldout_ppl"], learned["heldout_min"], learned["heldout_max"], learned["episodes"]) == (20.0, 10.0, 30.0, 3)
    assert (knapsack["allocator"], knapsack["heldout_ppl"], unquantized["heldout_ppl"]) == ("knapsack", 40.0, 5.0)


def test_two_sweeps_in_one_folder_are_refused(tmp_path):
    from filelock import FileLock

    (tmp_path / "sweep").mkdir()
    with FileLock(str(tmp_path / "sweep" / ".sweep.lock")):  # what a running sweep holds
        with pytest.raises(ConfigError, match=r"Another windquant sweep is running in .*pick another --out"):
            run_sweep(_args(tmp_path / "sweep"))


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

    from windquant_gym.agents.hyperparams import load_hyperparams

    check_sweep_folder(_args(tmp_path, episodes=3), load_hyperparams("smoke"))
    with pytest.raises(ConfigError, match=r"other settings \(episodes: 3 there, 4 now\).*pick another --out"):
        run_sweep(_args(tmp_path, episodes=4))
    # the same preset name with other values (an edited YAML, another version of the package)
    edited = tmp_path / "hp.yml"
    edited.write_text("smoke:\n  learning_rate: 1.0e-3\n")
    check_sweep_folder(_args(tmp_path / "b", hyperparams=str(edited)), {"learning_rate": 5.0e-4, "gamma": 1.0})
    with pytest.raises(ConfigError, match=r"the preset's values \(learning_rate\)"):
        check_sweep_folder(_args(tmp_path / "b", hyperparams=str(edited)), {"learning_rate": 1.0e-3, "gamma": 1.0})
    (tmp_path / "b" / "sweep.json").write_text("{")
    with pytest.raises(ConfigError, match=r"sweep.json is damaged.*restore it, or pick another --out"):
        check_sweep_folder(_args(tmp_path / "b", hyperparams=str(edited)), {})


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


# ----- windquant tune: Ray Tune + Optuna ----------------------------------------------------------
def test_tune_searches_on_the_proxy_writes_the_best_block_and_a_rerun_restores(local_ray, tmp_path):
    pytest.importorskip("optuna", reason='windquant tune needs Optuna: pip install -e ".[tune]"')
    from windquant_gym.agents.hyperparams import load_hyperparams
    from windquant_gym.sweep.tune import TuneArgs, run_tune

    space = tmp_path / "space.yml"
    space.write_text("learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\nwarm_start.epochs: {randint: [5, 30]}\n")
    args = TuneArgs(space=str(space), model="tiny-llama", preset="smoke", trials=2, target_bits=2.0,
                    out=str(tmp_path / "tune"), cpus_per_trial=1)
    report = run_tune(args)
    trials = report["trials"]
    assert len(trials) == 2 and not any(t["error"] for t in trials)
    assert report["best"]["proxy_ppl"] == min(t["proxy_ppl"] for t in trials)  # chosen by proxy, not held-out
    for t in trials:
        assert 1e-5 <= t["config"]["learning_rate"] <= 1e-3 and 5 <= t["config"]["warm_start.epochs"] < 30
        config = json.loads((Path(t["run"]) / "config.json").read_text())["hyperparams"]
        assert config["learning_rate"] == t["config"]["learning_rate"]
        assert config["warm_start"]["epochs"] == t["config"]["warm_start.epochs"]
        assert config["warm_start"]["demonstrations"] == "calibrated-knapsack"  # the rest of the block kept
    best = load_hyperparams("tuned", str(tmp_path / "tune" / "best_hyperparams.yml"))
    assert best["learning_rate"] == report["best"]["config"]["learning_rate"]
    assert "| proxy PPL | held-out PPL |" in (tmp_path / "tune" / "trials.md").read_text()

    stamps = {t["run"]: (Path(t["run"]) / "summary.json").stat().st_mtime_ns for t in trials}
    again = run_tune(args)  # restored: the finished trials are not trained again
    assert {t["trial"] for t in again["trials"]} == {t["trial"] for t in trials}
    assert stamps == {t["run"]: (Path(t["run"]) / "summary.json").stat().st_mtime_ns for t in again["trials"]}


@pytest.mark.parametrize("text, message", [
    ("learning_rat: {uniform: [0.1, 0.2]}", r"'learning_rat' is not a hyperparameter of the preset"),
    ("warm_start.epoch: {randint: [1, 5]}", r"'warm_start.epoch' is not a hyperparameter.*warm_start has \["),
    ("learning_rate: {normal: [0, 1]}", r"is not a distribution; use one of \['choice', 'loguniform', 'randint', 'uniform'\]"),
    ("learning_rate: {uniform: [0.3, 0.1]}", r"uniform needs low < high"),
    ("learning_rate: {loguniform: [0, 0.1]}", r"loguniform needs low > 0"),
    ("learning_rate: {choice: []}", r"choice takes a non-empty list of options"),
])
def test_bad_search_spaces_are_named(tmp_path, text, message):
    from windquant_gym.agents.hyperparams import load_hyperparams
    from windquant_gym.sweep.tune import load_space

    path = tmp_path / "space.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_space(path, load_hyperparams("smoke"))


def test_tune_without_ray_tune_names_the_pip_command(monkeypatch):
    from windquant_gym.sweep.tune import _ray_tune

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[tune\]"'):
        _ray_tune()


def test_a_sweep_over_allocators_benches_each_once_per_target_or_seed(local_ray, tmp_path):
    args = _args(tmp_path / "sweep", seeds=[0, 1], target_bits=[2.0], allocators=["knapsack", "search"],
                 search_evaluations=6)
    result = run_sweep(args)
    assert not result.failed
    assert sorted(r.name for r in result.trained) == ["bits2-knapsack", "bits2-search-seed0", "bits2-search-seed1"]
    board = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    groups = {r["allocator"]: r for r in board["leaderboard"]}
    search = next(r for name, r in groups.items() if name.startswith("search"))  # named by its fitness
    assert groups["knapsack"]["episodes"] == 1 and search["episodes"] == 2  # the two seeds, one row
    assert search["budget"] == 6 and search["evaluations"] <= 6
    for row in board["episodes"]:
        assert Path(row["plan_file"]).exists()  # plans resolved from the bench run's folder
    again = run_sweep(args)
    assert again.trained == [] and len(again.skipped) == 3


def test_unknown_allocators_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"allocators must be distinct names from \['learned', .*'calibrated-knapsack'.*got \['knapsak'\]"):
        _args(tmp_path, allocators=["knapsak"])
    with pytest.raises(ConfigError, match="--hyperparams applies to training runs only"):
        _args(tmp_path, allocators=["learned", "knapsack"], hyperparams="x.yml")


def test_a_run_whose_sweep_worker_is_gone_does_not_start(tmp_path):
    import subprocess

    from windquant_gym.compute.process import PARENT_PID_VAR

    code = "from windquant_gym.compute.process import die_with_parent; die_with_parent(); print('started')"
    env = {**os.environ, PARENT_PID_VAR: "999999999"}  # not this child's parent: the worker died before it started
    gone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert gone.returncode != 0 and "is gone; not starting this run" in gone.stderr and "started" not in gone.stdout
    env[PARENT_PID_VAR] = str(os.getpid())  # its real parent
    alive = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert alive.returncode == 0 and alive.stdout.strip() == "started"
