"""The diffusion upsampler at sampling time: DALL-E 2's cascade after Cascaded Diffusion Models (Ho et al. 2021).

Its condition is the base image enlarged, blurred while training, and diffused to a level s that the network is
told (noise-conditioning augmentation, CDM sec. 4.2): `degrade`, shared with its training recipe.
"""
from __future__ import annotations

from typing import Optional

import torch

from unclip.components import StageSpec
from unclip.config import UpsamplerConfig, UpsamplerModelConfig
from unclip.diffusion.gaussian import q_sample
from unclip.diffusion.process import Diffusion
from unclip.errors import CheckpointError
from unclip.images import gaussian_blur, resize
from unclip.models.upsampler import Upsampler


def build_upsampler(cfg: UpsamplerConfig, clip_cfg=None) -> Upsampler:
    return Upsampler(cfg.model)


def upsampler_diffusion(upsampler: Upsampler, cfg: UpsamplerConfig, device: torch.device) -> Diffusion:
    return Diffusion.build(upsampler, cfg.model, device, clip_x0=1.0)


SPEC = StageSpec("upsampler", UpsamplerConfig, build_upsampler, diffusion=upsampler_diffusion, clip_bound=False)


def check_fits(cfg: UpsamplerConfig, base_size: int, folder) -> None:
    """An upsampler enlarges the decoder's images: its low size must be the decoder's size."""
    low = cfg.model.low_size
    if low != base_size:
        raise CheckpointError(f"{folder} upsamples {low}x{low} images, but the decoder draws {base_size}x{base_size}")


def degrade(low: torch.Tensor, size: int, s: torch.Tensor, ac: torch.Tensor, sigma: float = 0.0,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The upsampler's condition: low-resolution images (B, C, h, w) in [-1, 1] upsampled to `size`, blurred
    by `sigma` px (none at 0), then diffused to levels s (B,): sqrt(ab_s) z + sqrt(1 - ab_s) eps."""
    z = resize(low, size)
    if sigma > 0:
        z = gaussian_blur(z, sigma)
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return q_sample(z, s, eps, ac)


def sampling_level(cfg: UpsamplerModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    """The augmentation level s (B,) applied and told at sampling (`aug_level` of the timesteps)."""
    return torch.full((batch,), round(cfg.aug_level * (cfg.timesteps - 1)), device=device, dtype=torch.long)


@torch.no_grad()
def upsample(upsampler: Diffusion, cfg: UpsamplerConfig, low: torch.Tensor, sampler: str, steps: int,
             generator: torch.Generator, *, callback=None, noise: Optional[torch.Tensor] = None,
             init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Base images (B, C, h, w) in [-1, 1] -> (B, C, H, W): the upsampler's chain, conditioned on the base image
    upsampled and noised to the sampling augmentation level (Ho et al. 2021, sec. 4.2)."""
    m = cfg.model
    s = sampling_level(m, low.shape[0], low.device)
    cond = degrade(low, m.image_size, s, upsampler.ac, generator=generator)
    if noise is None:
        noise = torch.randn(cond.shape, generator=generator, device=generator.device)
    denoise = upsampler.denoiser((cond, s), 1.0)
    init = resize(init, m.image_size) if init is not None else None
    return upsampler.sample(sampler, denoise, noise, steps, generator=generator, callback=callback, init=init,
                            strength=strength).clamp(-1, 1)
