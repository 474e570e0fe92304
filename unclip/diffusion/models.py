"""Adapters between the networks and the diffusion math: every network is seen as `net_x0(x_t, t, cond, drop)`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from unclip.diffusion.gaussian import diffusion_loss, to_x0
from unclip.diffusion.sampling import Denoiser, classifier_free_guidance
from unclip.diffusion.schedule import alphas_cumprod


@dataclass
class Diffusion:
    """A network, its schedule and what it predicts."""

    net: Callable  # net(x_t, t, *cond, drop=drop) -> output
    ac: torch.Tensor  # alphas_cumprod (T,)
    prediction: str  # eps | x0 | v
    clip_x0: Optional[float] = None  # clamp x0 estimates to [-c, c] (pixels), or None (embeddings)

    @classmethod
    def build(cls, net: Callable, schedule: str, timesteps: int, prediction: str, device: torch.device,
              clip_x0: Optional[float] = None) -> "Diffusion":
        return cls(net, alphas_cumprod(schedule, timesteps).to(device), prediction, clip_x0)

    def x0(self, x: torch.Tensor, t: torch.Tensor, cond: tuple, drop: torch.Tensor) -> torch.Tensor:
        """The raw clean-data estimate (unclamped: guidance must see the predictions as they are)."""
        return to_x0(self.net(x, t, *cond, drop=drop), x, t, self.ac, self.prediction)

    def denoiser(self, cond: tuple, guidance: float, negative: Optional[tuple] = None) -> Denoiser:
        """The sampler's `denoise(x_t, t) -> x0`: classifier-free guidance over the raw predictions first (away
        from a `negative` condition when given), clamping to the data range after (as diffusers' schedulers
        and Imagen's thresholding do)."""
        guided = classifier_free_guidance(self.x0, cond, guidance, negative)
        if not self.clip_x0:
            return guided
        return lambda x, t: guided(x, t).clamp(-self.clip_x0, self.clip_x0)

    def loss(self, x0: torch.Tensor, cond: tuple, cond_drop: float, generator=None) -> torch.Tensor:
        """Training loss with the condition dropped for a `cond_drop` fraction of the batch."""
        drop = torch.rand(x0.shape[0], device=x0.device, generator=generator) < cond_drop
        return diffusion_loss(lambda xt, t: self.net(xt, t, *cond, drop=drop), x0, self.ac, self.prediction, generator)
