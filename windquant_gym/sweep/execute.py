"""Running a sweep on Ray: the problem (calibration and table) is prepared by one task, then
every unfinished run is one task that starts or resumes ``windquant train`` in its own
process (its output in the run's ``train.log``); a failed run leaves the others going."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ..errors import ConfigError, MissingDependencyError, RunFailedError, WindQuantError
from ..compute.process import PARENT_PID_VAR
from .config import SweepArgs, check_sweep_folder
from .report import write_sweep_leaderboard
from .runs import FINISHED, INTERRUPTED, SweepRun, plan_runs, run_argv, status_of

PIP_HINT = 'pip install -e ".[sweep]" (in a clone of windquant-gym), or pip install "ray>=2.44"'


@dataclass
class SweepResult:
    runs: List[SweepRun]
    skipped: List[SweepRun] = field(default_factory=list)
    """Finished before this call: not run again."""
    trained: List[SweepRun] = field(default_factory=list)
    """Started (or resumed) and finished by this call."""
    resumed: List[SweepRun] = field(default_factory=list)
    """Of ``trained``, those continued from a checkpoint."""
    failed: Dict[str, str] = field(default_factory=dict)
    """Run name -> why (the run can be resumed by calling the sweep again)."""
    leaderboard: Dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise MissingDependencyError(f"windquant sweep runs on Ray, which is not installed: {PIP_HINT}.") from error
    return ray


def run_sweep(args: SweepArgs) -> SweepResult:
    """Run every combination of ``args.seeds`` x ``args.target_bits`` not finished yet in
    ``args.out`` (resuming interrupted ones), then write the leaderboard there. Uses the Ray
    instance this process is connected to, else connects to ``args.address``, else starts
    one on this machine (and stops it at the end)."""
    from ..agents.hyperparams import load_hyperparams

    started = time.perf_counter()
    args = absolute_paths(args)
    hp = load_hyperparams(args.preset, args.hyperparams)  # an unknown preset fails before Ray starts
    cpus, gpus = resources(args, hp)
    with sweep_lock(Path(args.out)):
        return _sweep(args, hp, cpus, gpus, started)


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One sweep at a time per folder: two would start (and --overwrite) the same runs."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"Another windquant sweep is running in {out}: wait for it to end (then run this one to "
                          "resume or extend it), or pick another --out.") from None
    try:
        yield
    finally:
        lock.release()


def _sweep(args: SweepArgs, hp, cpus: float, gpus: float, started: float) -> SweepResult:
    check_sweep_folder(args, hp)
    runs = plan_runs(args)
    result = SweepResult(runs)
    todo = []
    status = {run: status_of(run) for run in runs}  # (reads each run's summary and checkpoints once)
    for run in runs:
        (result.skipped if status[run] == FINISHED else todo).append(run)
    resuming = sum(status[r] == INTERRUPTED for r in todo)
    _say(f"sweep {args.out}: {len(runs)} runs, {len(result.skipped)} finished before (skipped), "
         f"{resuming} to resume, {len(todo) - resuming} to start; {cpus:g} CPU, {gpus:g} GPU per run")
    if todo:
        _run_on_ray(args, hp, todo, cpus, gpus, result)
    result.leaderboard = write_sweep_leaderboard(args, runs, result)
    result.seconds = time.perf_counter() - started
    _say(f"sweep {args.out}: {len(result.trained)} trained ({len(result.resumed)} resumed), {len(result.skipped)} skipped, "
         f"{len(result.failed)} failed, {result.seconds:.0f} s; leaderboard {result.leaderboard['md']}")
    if result.failed:
        _say(f"failed runs keep their checkpoints: run the same command again to resume them ({', '.join(result.failed)})")
    return result


def absolute_paths(args, **paths: str):
    """``args`` (a frozen dataclass with ``out``, ``model``, ``hyperparams``) with its paths, and
    the named extra ``paths``, made absolute: the tasks' processes start in other folders (Tune
    trials in their own, runs on a cluster's nodes). A model name stays a name."""
    resolve = lambda value: str(Path(value).resolve())  # noqa: E731
    return replace(args, out=resolve(args.out), model=resolve(args.model) if Path(args.model).exists() else args.model,
                   hyperparams=resolve(args.hyperparams) if args.hyperparams else None,
                   **{name: resolve(value) for name, value in paths.items()})


def resources(args: SweepArgs, hp) -> Tuple[float, float]:
    """CPUs and GPUs per run: the flags, else the preset's ``sweep_resources``, else 1 CPU."""
    preset = hp.get("sweep_resources") or {}
    cpus = args.cpus_per_run if args.cpus_per_run is not None else float(preset.get("cpus", 1))
    gpus = args.gpus_per_run if args.gpus_per_run is not None else float(preset.get("gpus", 0))
    return cpus, gpus


def _run_on_ray(args: SweepArgs, hp, todo: List[SweepRun], cpus: float, gpus: float, result: SweepResult) -> None:
    ray = import_ray()
    owned = not ray.is_initialized()
    if owned:
        connect(ray, args.address, args.num_cpus)
    try:
        forwarded = forwarded_env()
        # the table is built once, by one task, before the runs fan out: with all of this machine's
        # CPUs when Ray runs here (nothing else runs yet), with one run's share on a cluster
        node_cpus = cpus if args.address else max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [cpus])
        prepare = ray.remote(num_cpus=max(cpus, node_cpus), num_gpus=gpus, max_calls=1, max_retries=0)(prepare_problem)
        try:
            ray.get(prepare.remote(args, forwarded, int(max(cpus, node_cpus))))
        except ray.exceptions.RayTaskError as error:  # a bad model name, a missing corpus: its own message
            if isinstance(error.cause, WindQuantError):
                raise error.cause from None
            raise
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1, max_retries=args.retries,
                          retry_exceptions=args.retries > 0)(execute_run)
        pending = {task.remote(run, args, hp, forwarded, max(1, int(cpus))): run for run in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
            if not done:
                continue
            run = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as error:  # a killed worker, a failed run: the others go on
                cause = getattr(error, "cause", None) or error
                result.failed[run.name] = f"{type(cause).__name__}: {cause}".strip()
                _say(f"  {run.name} FAILED: {str(cause).splitlines()[-1] if str(cause) else type(cause).__name__}")
                continue
            result.trained.append(run)
            if outcome["resumed"]:
                result.resumed.append(run)
            _say(f"  {run.name} finished in {outcome['seconds']:.0f} s{' (resumed)' if outcome['resumed'] else ''} "
                 f"[{len(result.trained) + len(result.failed)}/{len(todo)}]")
    finally:
        if owned:
            ray.shutdown()


_PATH_VARS = ("WINDQUANT_CACHE", "WINDQUANT_MODEL_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")


def connect(ray, address, num_cpus) -> None:
    """Start Ray here (``address`` None) or join the cluster at ``address``, with a named error."""
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
        return
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as error:
        raise ConfigError(
            f"Could not join the Ray cluster at --address {address} ({error}). Check that `ray start --head` runs "
            "there and that this machine reaches the address `ray start` printed; a cluster with Ray's token "
            "authentication needs its token here too (on a trusted network both sides may set RAY_AUTH_MODE=disabled)."
        ) from None


def forwarded_env() -> Dict[str, str]:
    """This process's cache and offline settings, for the tasks' processes (Ray's workers
    inherit the environment Ray was started with, not the driver's current one, and start in
    other folders: cache paths are made absolute, so that every run shares one cache)."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(("WINDQUANT_", "HF_")) or k == "XDG_CACHE_HOME"}
    forwarded.pop(PARENT_PID_VAR, None)
    return {k: str(Path(v).resolve()) if k in _PATH_VARS and v else v for k, v in forwarded.items()}


def prepare_problem(args: SweepArgs, forwarded: Dict[str, str], threads: int) -> None:
    """Build the runs' problem once (calibration and table land in the cache the runs read)."""
    import torch

    from ..agents.hyperparams import load_hyperparams
    from ..agents.train import TrainArgs, make_env

    os.environ.update(forwarded)
    torch.set_num_threads(threads)
    hp = load_hyperparams(args.preset, args.hyperparams)
    train_args = TrainArgs(model=args.model, preset=args.preset, calibration_seed=args.calibration_seed, device=args.device,
                           hyperparams=args.hyperparams, progress=args.progress)
    make_env(train_args, hp).close()


def execute_run(run: SweepRun, args: SweepArgs, hp, forwarded: Dict[str, str], threads: int) -> Dict[str, object]:
    """Start or resume one run (``windquant train``, or ``windquant bench`` for a bench
    allocator) in a child process, its output in the run folder's ``train.log`` /
    ``bench.log``; raise :class:`~windquant_gym.errors.RunFailedError` (with the end of its
    log) when it fails or is killed."""
    started = time.perf_counter()
    resumed = status_of(run) == INTERRUPTED
    argv = run_argv(run, args, hp)
    run.folder.mkdir(parents=True, exist_ok=True)
    log = run.folder / f"{argv[0]}.log"
    environment = {**os.environ, **forwarded, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   PARENT_PID_VAR: str(os.getpid())}
    with log.open("a") as handle:
        handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} windquant {' '.join(argv)}\n")
        handle.flush()
        code = subprocess.run([sys.executable, "-m", "windquant_gym.cli", *argv], stdout=handle, stderr=subprocess.STDOUT,
                              env=environment).returncode
    if code != 0:
        # the log's last lines, without progress bars (they hold no cause)
        lines = [line for line in re.split(r"[\r\n]+", log.read_text()) if line.strip() and "it/s]" not in line]
        tail = lines[-3:]
        how = f"killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exited with {code}"
        raise RunFailedError(f"{run.name}: windquant {argv[0]} {how} (log {log}): {' | '.join(tail)}")
    return {"resumed": resumed, "seconds": time.perf_counter() - started}


def _say(text: str) -> None:
    print(text, flush=True)
