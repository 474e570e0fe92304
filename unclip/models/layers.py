"""Layers shared by the stages."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer timesteps (B,) (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Sequential):
    """Sinusoidal features of t, then a two-layer MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(hidden, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.hidden = hidden

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t, self.hidden))


def drop_condition(cond: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Swap in the learned `null` condition where `drop` (B,) is True (classifier-free guidance)."""
    return torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), null.to(cond.dtype).expand_as(cond), cond)


def identity_transformer(width: int, heads: int, layers: int) -> nn.TransformerEncoder:
    """Bidirectional pre-norm Transformer layers, each starting as the identity (its residual projections zero),
    so a model fine-tuned with new layers (`--init`) starts as it was: GLIDE's text encoder in the decoder, the
    layers over the image tower's feature map in CLIP."""
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    for residual in (layer.self_attn.out_proj, layer.linear2):
        nn.init.zeros_(residual.weight)
        nn.init.zeros_(residual.bias)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)  # deep-copies the layer
