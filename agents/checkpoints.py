"""Resumable checkpoints: the SB3 model (weights, optimizer, timestep count) together with
the env's own state (Lagrange multiplier, curriculum stage, episode count) and the
recorder's (episodes written, best plans), so ``windquant train --resume DIR`` continues
where a run stopped.

A checkpoint is written at the start of a rollout, i.e. after the previous episode's PPO
update: model and env state then describe the same point. Each is a folder written under
a temporary name and renamed into place, so a run killed mid-write leaves the previous
checkpoint intact; ``latest.json`` names the newest.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from stable_baselines3.common.callbacks import BaseCallback

from ..errors import ConfigError

LATEST = "latest.json"
CHECKPOINT_FORMAT = 1


class ResumableCheckpoint(BaseCallback):
    """Every ``every`` episodes: ``checkpoints/episode_<n>/{model.zip, state.json}``."""

    def __init__(self, folder: Path, every: int, env, recorder, keep: int = 2):
        super().__init__()
        if every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 episode, got {every}.")
        self.folder = Path(folder)
        self.every = every
        self.env = env
        self.recorder = recorder
        self.keep = keep
        self._saved_at = recorder.episodes

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        episodes = self.recorder.episodes
        if episodes > self._saved_at and episodes % self.every == 0:
            self.save()

    def save(self) -> Path:
        episodes = self.recorder.episodes
        final = self.folder / f"episode_{episodes:06d}"
        tmp = self.folder / f".tmp_episode_{episodes:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save(tmp / "model.zip")
        state = {
            "format": CHECKPOINT_FORMAT,
            "episodes": episodes,
            "num_timesteps": self.model.num_timesteps,
            "env": self.env.unwrapped.state_dict(),
            "curriculum": self.env.get_wrapper_attr("state_dict")(),
            "recorder": self.recorder.state_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for path in (tmp / "model.zip", tmp / "state.json", tmp):
            _fsync(path)  # on disk before anything points at it (power loss, preemption)
        if final.exists():  # the same episode saved again (a finished run resumed): keep it until replaced
            os.replace(final, self.folder / f".old_episode_{episodes:06d}")
        os.replace(tmp, final)
        shutil.rmtree(self.folder / f".old_episode_{episodes:06d}", ignore_errors=True)
        latest = self.folder / LATEST
        latest.with_suffix(".tmp").write_text(json.dumps({"checkpoint": final.name, "episodes": episodes}))
        _fsync(latest.with_suffix(".tmp"))
        os.replace(latest.with_suffix(".tmp"), latest)
        _fsync(self.folder)
        self._saved_at = episodes
        older = [p for p in _checkpoints(self.folder) if _episode(p) < episodes]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _episode(folder: Path) -> int:
    return int(folder.name.rsplit("_", 1)[1])


def _checkpoints(folder: Path) -> List[Path]:
    """Complete checkpoint folders, oldest first (by episode, not by name)."""
    return sorted((p for p in Path(folder).glob("episode_*") if p.is_dir()), key=_episode)


def _readable(folder: Path) -> bool:
    try:
        json.loads((folder / "state.json").read_text())
        with zipfile.ZipFile(folder / "model.zip") as archive:
            return archive.testzip() is None
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest readable checkpoint of a run folder, or None. ``latest.json`` names the
    newest; if that one is damaged (a crash mid-write on a filesystem that reorders
    writes), the newest older one that reads back whole is used instead."""
    folder = Path(run_dir) / "checkpoints"
    candidates = _checkpoints(folder)[::-1]
    pointer = folder / LATEST
    if pointer.exists():
        try:
            named = folder / json.loads(pointer.read_text())["checkpoint"]
            candidates = [named] + [c for c in candidates if c != named]
        except (ValueError, KeyError):
            pass
    return next((c for c in candidates if c.is_dir() and _readable(c)), None)


def has_run(run_dir: Path) -> bool:
    """Whether a folder already holds a training run's checkpoints or episode log."""
    run_dir = Path(run_dir)
    return (run_dir / "episodes.csv").exists() or bool(_checkpoints(run_dir / "checkpoints"))


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's outputs from a folder (``--overwrite``)."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    plans = [*run_dir.glob("best_plan*.json"), *run_dir.glob("policy_plan_*.json"), *run_dir.glob("returned_plan*.json")]
    for path in [run_dir / "episodes.csv", *plans, run_dir / "final_plan.json", run_dir / "warm_start_plans.json",
                 run_dir / "final_model.zip", run_dir / "summary.json", run_dir / "training_curves.png"]:
        path.unlink(missing_ok=True)


def read_state(checkpoint: Path) -> Dict[str, Any]:
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{checkpoint} holds checkpoint format {state.get('format')}, this version reads {CHECKPOINT_FORMAT}.")
    return state
