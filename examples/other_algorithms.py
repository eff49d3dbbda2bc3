"""The same env under stock SB3 algorithms: MaskablePPO uses the masks; PPO, A2C and DQN
ignore them, and the env projects their masked actions to the nearest allowed one
(``info["action_projected"]``), so every plan still meets the budget.

    python examples/other_algorithms.py --model tiny-llama --episodes 1
"""

from __future__ import annotations

import argparse

import gymnasium as gym
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback

import windquant_gym  # noqa: F401  (registers WindQuant-v0)

ALGORITHMS = {"MaskablePPO": MaskablePPO, "PPO": PPO, "A2C": A2C, "DQN": DQN}


class LastEpisode(BaseCallback):
    """Keeps the terminal info of the latest episode and counts projected actions."""

    def __init__(self):
        super().__init__()
        self.info, self.projected = None, 0

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            self.projected += int(info.get("action_projected", False))
            if done:
                self.info = info
        return True


def run(algorithm: str, env: gym.Env, episodes: int = 1, seed: int = 0) -> dict:
    """Train ``algorithm`` for ``episodes`` episodes on ``env``; the last episode's result."""
    n_units = env.unwrapped.n_units
    kwargs = {"seed": seed, "device": "cpu", "verbose": 0}
    if algorithm in ("PPO", "MaskablePPO"):
        kwargs.update(n_steps=n_units, batch_size=min(64, n_units), n_epochs=3)
    elif algorithm == "A2C":
        kwargs.update(n_steps=min(64, n_units))
    else:
        kwargs.update(learning_starts=min(100, n_units), buffer_size=10 * n_units)
    model = ALGORITHMS[algorithm]("MlpPolicy", env, **kwargs)
    callback = LastEpisode()
    model.learn(total_timesteps=episodes * n_units, callback=callback)
    info = callback.info
    return {"algorithm": algorithm, "effective_bits": info["effective_bits"], "storage_bits": info["storage_bits"],
            "proxy_ppl": info["proxy_ppl"], "target_bits": info["target_bits"], "projected_actions": callback.projected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--target-bits", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args()
    env = gym.make("WindQuant-v0", model=args.model, target_bits=args.target_bits, chunk_size=args.chunk_size,
                   n_calibration_samples=8, calibration_seq_len=128)
    for name in ALGORITHMS:
        r = run(name, env, args.episodes)
        print(f"{name:12} bits {r['effective_bits']:.3f} (storage {r['storage_bits']:.3f}) <= target {r['target_bits']}, "
              f"proxy PPL {r['proxy_ppl']:.2f}, projected actions {r['projected_actions']}")


if __name__ == "__main__":
    windquant_gym.keep_freed_memory()  # our process: reuse freed memory (windquant_gym/compute/process.py)
    main()
