"""The RL side: the paper's actor-critic for sb3-contrib's MaskablePPO, training, and
hyperparameters (``hyperparams.yml``, keyed by env id, rl-baselines3-zoo style).
Installed as ``windquant_gym.agents``."""

from .policy import LayerNormMlpExtractor, WindQuantPolicy
from .hyperparams import load_hyperparams

__all__ = ["LayerNormMlpExtractor", "WindQuantPolicy", "load_hyperparams"]
