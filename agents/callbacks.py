"""Callbacks: per-episode records (CSV, TensorBoard, best plan JSON) and a progress bar."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Optional

from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from ..plan import QuantPlan

EPISODE_FIELDS = (
    "episode", "stage", "target_bits", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio",
    "return", "lagrange_lambda", "fallbacks", "episode_seconds",
)


class EpisodeRecorder(BaseCallback):
    """At each episode end: a row in ``episodes.csv``, scalars in TensorBoard, and the best
    plan (lowest proxy perplexity within budget) per target in ``best_plan_<target>.json``."""

    def __init__(self, out_dir: Path, table, model_name: str, total_episodes: int, progress: bool = True):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.table = table
        self.model_name = model_name
        self.best: Dict[float, Dict] = {}
        self.episodes = 0
        self.bar = tqdm(total=total_episodes, desc="training", unit="episode", disable=not progress)
        self.csv_path = self.out_dir / "episodes.csv"
        if not self.csv_path.exists():
            with self.csv_path.open("w", newline="") as handle:
                csv.writer(handle).writerow(EPISODE_FIELDS)

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "proxy_ppl" in info:
                self._record(info)
        return True

    def _record(self, info: Dict) -> None:
        self.episodes += 1
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
        within = info["effective_bits"] <= target + 1e-6
        best = self.best.get(target)
        if within and (best is None or info["proxy_ppl"] < best["proxy_ppl"]):
            self.best[target] = {"proxy_ppl": info["proxy_ppl"], "plan": info["plan"]}
            plan = QuantPlan.from_table(
                self.table, info["plan"], self.model_name, episode=self.episodes,
                **{k: info[k] for k in ("target_bits", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio")},
            )
            plan.save(self.out_dir / f"best_plan_{target:g}.json")
        self.bar.update(1)
        self.bar.set_postfix(target=target, bits=f"{info['effective_bits']:.3f}", ppl=f"{info['proxy_ppl']:.1f}")

    def state_dict(self) -> Dict:
        return {"episodes": self.episodes, "best": {str(k): v for k, v in self.best.items()}}

    def load_state_dict(self, state: Dict) -> None:
        """Restore after a resume; ``episodes.csv`` loses the rows of episodes the
        checkpoint does not hold (they are trained again)."""
        self.episodes = int(state["episodes"])
        self.best = {float(k): v for k, v in state["best"].items()}
        with self.csv_path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.episodes]
        with self.csv_path.open("w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        self.bar.update(self.episodes)

    def _on_training_end(self) -> None:
        self.bar.close()
