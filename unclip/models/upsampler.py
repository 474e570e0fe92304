"""A diffusion upsampler: DALL-E 2's cascade after Cascaded Diffusion Models (Ho et al. 2021).

The decoder's U-Net, given the low-resolution image (upsampled to the output size) beside x_t. The
conditioning image is degraded while training, so that the upsampler learns to fix what the base decoder
gets wrong rather than copy it: a Gaussian blur (DALL-E 2 sec. D), then noise-conditioning augmentation,
the image diffused to a level s that the network is told (CDM sec. 4.2).
"""
from __future__ import annotations


import torch
from torch import nn

from unclip.config import UpsamplerModelConfig
from unclip.models.layers import timestep_embedding
from unclip.models.unet import UNet


class Upsampler(nn.Module):
    """net(x_t, t, low, s, drop): x_t (B, C, H, W), the degraded low-resolution image at H x W, its level s (B,)."""

    def __init__(self, cfg: UpsamplerModelConfig):
        super().__init__()
        self.config = cfg
        self.level_dim = cfg.widths[0]
        self.unet = UNet(cfg, self.level_dim, image_inputs=cfg.image_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low: torch.Tensor, s: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, timestep_embedding(s, self.level_dim), drop=drop, image=low)


