"""The paper's actor-critic (3.4): a two-layer MLP with LayerNorm and ReLU, shared by a
separate actor head and critic head, as a ``MaskableActorCriticPolicy``."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy


def _trunk(features_dim: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features_dim, hidden_size), nn.LayerNorm(hidden_size), nn.ReLU(),
        nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size), nn.ReLU(),
    )


class LayerNormMlpExtractor(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm -> ReLU``; SB3 puts the actor head
    (``action_net``) and critic head (``value_net``) on top. ``shared=True`` (the paper): one
    trunk for both. ``shared=False``: the critic has a trunk of its own, so fitting the value
    never moves the features the actor's choices rest on (what keeps a warm start)."""

    def __init__(self, features_dim: int, hidden_size: int = 128, shared: bool = True):
        super().__init__()
        self.trunk = _trunk(features_dim, hidden_size)
        self.critic_trunk = None if shared else _trunk(features_dim, hidden_size)
        self.latent_dim_pi = hidden_size
        self.latent_dim_vf = hidden_size

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return (self.trunk if self.critic_trunk is None else self.critic_trunk)(features)


class WindQuantPolicy(MaskableActorCriticPolicy):
    """``MaskablePPO(WindQuantPolicy, env, policy_kwargs={"hidden_size": 128, "shared_trunk": True})``."""

    def __init__(self, *args, hidden_size: int = 128, shared_trunk: bool = True, **kwargs):
        self.hidden_size = hidden_size
        self.shared_trunk = shared_trunk
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = LayerNormMlpExtractor(self.features_dim, self.hidden_size, self.shared_trunk).to(self.device)

    def _get_constructor_parameters(self):
        data = super()._get_constructor_parameters()
        data["hidden_size"] = self.hidden_size
        data["shared_trunk"] = self.shared_trunk
        return data
