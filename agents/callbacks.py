"""Callbacks: per-episode records (CSV, TensorBoard, best plan JSON) and a progress bar."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, List

from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from ..envs.windquant import BUDGET_TOLERANCE
from ..plan import QuantPlan
from .selection import top_plans

EPISODE_FIELDS = (
    "episode", "stage", "target_bits", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio",
    "return", "lagrange_lambda", "fallbacks", "episode_seconds", "proxy_blocks",
)


class EpisodeRecorder(BaseCallback):
    """At each episode end: a row in ``episodes.csv``, scalars in TensorBoard, and the best
    plan (lowest proxy perplexity within budget, or lowest KL for ``proxy_metric="kl"``) per
    target in ``best_plan_<target>.json``."""

    def __init__(self, out_dir: Path, problem, total_episodes: int, progress: bool = True, keep: int = 1):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.problem = problem
        self.best: Dict[float, Dict] = {}
        self.keep = keep
        self.top: Dict[float, List[Dict]] = {}
        """Per target, the ``keep`` best distinct plans measured (best first): what a choice on
        the validation split (:mod:`.selection`) chooses among."""
        self.episodes = 0
        self.complete_episodes = 0
        """Episodes measured on every proxy block (all of them unless the env races)."""
        self.evaluations = 0.0
        """Proxy passes training spent (full-pass equivalents): one per episode, fewer where the
        env races (``race_blocks``), plus the racing env's per-block baseline pass (train.py)."""
        self.total_episodes = total_episodes
        self.bar = tqdm(total=total_episodes, desc="training", unit="episode", disable=not progress)
        self.csv_path = self.out_dir / "episodes.csv"
        if not self.csv_path.exists():
            with self.csv_path.open("w", newline="") as handle:
                csv.writer(handle).writerow(EPISODE_FIELDS)

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "proxy_ppl" in info:
                self._record(info)
        # a rollout of several episodes may overrun the run's length: stop at exactly its episodes
        return self.episodes < self.total_episodes

    def _record(self, info: Dict) -> None:
        self.episodes += 1
        self.evaluations += float(info.get("proxy_passes", 1.0))
        self.complete_episodes += bool(info.get("proxy_complete", True))
        row = {k: info[k] for k in EPISODE_FIELDS if k in info}
        row["episode"] = self.episodes  # info["episode"] is Monitor's {"r", "l", "t"}
        row["stage"] = info.get("curriculum_stage", 0)
        row["return"] = info.get("episode", {}).get("r", float("nan"))
        with self.csv_path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(k, "") for k in EPISODE_FIELDS])
        for key in ("proxy_ppl", "effective_bits", "storage_bits", "ppl_ratio", "return", "lagrange_lambda", "target_bits"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.logger.record(f"windquant/{key}", value)
        self.logger.dump(self.num_timesteps)
        target = info["target_bits"]
        self.consider(info, self.episodes)
        self.bar.update(1)
        self.bar.set_postfix(target=target, bits=f"{info['effective_bits']:.3f}", ppl=f"{info['proxy_ppl']:.1f}")

    def consider(self, info: Dict, episode: int) -> bool:
        """Keep the measured plan of ``info`` (an episode's last ``info``) as its target's best
        if it is within budget and better by the env's proxy metric; episode 0 marks a plan
        measured before training (the warm start's). Only a measurement on every proxy block
        counts (not a racing env's estimate from some of them). Returns whether it was kept."""
        target = info["target_bits"]
        if not info.get("proxy_complete", True):
            return False
        within = info["effective_bits"] <= target + BUDGET_TOLERANCE
        best = self.best.get(target)
        score = "proxy_kl" if info.get("proxy_metric") == "kl" else "proxy_ppl"  # what the env's reward measures
        if not within:
            return False
        metrics = {k: info[k] for k in ("target_bits", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio", "proxy_dtype",
                                             "proxy_metric", "proxy_kl")
                   if k in info}
        entry = {**metrics, "episode": episode, "plan": list(info["plan"])}
        if self.keep > 1:
            self.top[target] = top_plans(self.top.get(target, []), entry, self.keep, score)
        if best is not None and info[score] >= best.get(score, float("inf")):
            return False
        self.best[target] = entry
        self._save_best(target)
        return True

    def _save_best(self, target: float) -> None:
        best = dict(self.best[target])
        actions = best.pop("plan")
        QuantPlan.from_problem(self.problem, actions, **best).save(self.out_dir / f"best_plan_{target:g}.json")

    def state_dict(self) -> Dict:
        return {"episodes": self.episodes, "evaluations": self.evaluations, "complete_episodes": self.complete_episodes,
                "best": {str(k): v for k, v in self.best.items()}, "top": {str(k): v for k, v in self.top.items()}}

    def load_state_dict(self, state: Dict) -> None:
        """Restore after a resume. Whatever the run wrote after its checkpoint is undone:
        ``episodes.csv`` loses those episodes' rows (they are trained again) and the
        ``best_plan_<target>.json`` files are rewritten from the restored bests."""
        self.episodes = int(state["episodes"])
        self.evaluations = float(state.get("evaluations", self.episodes))  # checkpoints before racing: 1 pass each
        self.complete_episodes = int(state.get("complete_episodes", self.episodes))
        self.best = {float(k): v for k, v in state["best"].items()}
        # checkpoints before the top plans were kept: the best alone
        self.top = {float(k): v for k, v in state.get("top", {str(k): [v] for k, v in self.best.items()}).items()}
        with self.csv_path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [list(EPISODE_FIELDS)] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= self.episodes]
        tmp = self.csv_path.with_suffix(".tmp")
        with tmp.open("w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(tmp, self.csv_path)  # a kill mid-write leaves the old file, never an empty one
        for stale in self.out_dir.glob("best_plan_*.json"):
            stale.unlink()
        for target in self.best:
            self._save_best(target)
        self.bar.update(self.episodes)

    def _on_training_end(self) -> None:
        self.bar.close()
