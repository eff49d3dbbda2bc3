"""The env, its reward and mask pieces, and the curriculum; registers ``WindQuant-v0``."""

from gymnasium.envs.registration import register, registry

from .action_costs import ActionCostObservation
from .budget_price import BudgetPrice
from .curriculum import CurriculumWrapper
from .loss_reward import LossRewardConfig, ProxyLossReward
from .rewards import RewardConfig
from .rules import PrecisionRules
from .target_sampler import TargetSampler
from .windquant import WindQuantEnv

ENV_ID = "WindQuant-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="windquant_gym.envs.windquant:WindQuantEnv")

__all__ = [
    "ENV_ID", "ActionCostObservation", "BudgetPrice", "CurriculumWrapper", "LossRewardConfig", "PrecisionRules",
    "ProxyLossReward", "RewardConfig", "TargetSampler", "WindQuantEnv",
]
