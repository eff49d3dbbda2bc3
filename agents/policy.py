"""The paper's actor-critic (3.4): a two-layer MLP with LayerNorm and ReLU, shared by a
separate actor head and critic head, as a ``MaskableActorCriticPolicy``."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy


class LayerNormMlpExtractor(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm -> ReLU``, shared; SB3 puts the
    actor head (``action_net``) and critic head (``value_net``) on top."""

    def __init__(self, features_dim: int, hidden_size: int = 128):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(features_dim, hidden_size), nn.LayerNorm(hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size), nn.ReLU(),
        )
        self.latent_dim_pi = hidden_size
        self.latent_dim_vf = hidden_size

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        latent = self.trunk(features)
        return latent, latent

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)


class WindQuantPolicy(MaskableActorCriticPolicy):
    """``MaskablePPO(WindQuantPolicy, env, policy_kwargs={"hidden_size": 128})``."""

    def __init__(self, *args, hidden_size: int = 128, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = LayerNormMlpExtractor(self.features_dim, self.hidden_size).to(self.device)

    def _get_constructor_parameters(self):
        data = super()._get_constructor_parameters()
        data["hidden_size"] = self.hidden_size
        return data
