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
from pathlib import Path
from typing import Any, Dict, Optional

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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = self.folder / LATEST
        latest.with_suffix(".tmp").write_text(json.dumps({"checkpoint": final.name, "episodes": episodes}))
        os.replace(latest.with_suffix(".tmp"), latest)
        self._saved_at = episodes
        for old in sorted(self.folder.glob("episode_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
    return folder if (folder / "model.zip").exists() and (folder / "state.json").exists() else None


def read_state(checkpoint: Path) -> Dict[str, Any]:
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{checkpoint} holds checkpoint format {state.get('format')}, this version reads {CHECKPOINT_FORMAT}.")
    return state
