"""Noise schedules as pure functions: the cumulative products alpha-bar_t for t = 0 .. T-1.

Computed in float64 and cast once (guided-diffusion's `betas_for_alpha_bar`).
"""
from __future__ import annotations

import math

import torch


def cosine_alphas_cumprod(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17, with betas clipped at `max_beta`."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0).float()


def linear_alphas_cumprod(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas, Ho et al. 2020, rescaled so any T spans the same noise levels as T = 1000."""
    scale = 1000 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def rectified_alphas_cumprod(T: int) -> torch.Tensor:
    """The schedule of rectified flow's path x_s = (1 - s) x0 + s eps at s evenly spaced inside (0, 1), s_t = (t + 1) /
    (T + 1), as alpha-bar: the diffusion point x_s / sqrt((1 - s)^2 + s^2) has ab = (1 - s)^2 / ((1 - s)^2 + s^2)
    (unclip/diffusion/flow.py). Sampling chains spaced evenly in t are then spaced evenly in s, as SD3 samples."""
    s = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).float()


SCHEDULES = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod, "rectified": rectified_alphas_cumprod}


def alphas_cumprod(name: str, T: int) -> torch.Tensor:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}: use one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](T)


def spaced_timesteps(T: int, steps: int, trailing: bool = False) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (the sampling chain of DDIM / DPM-Solver).

    `trailing` spaces them as if the chain went one step further, to T-1 .. 0 in steps + 1 points, and drops
    the last (Lin et al. 2024, "trailing" spacing): every call then makes a real jump, the last one from
    about T / steps to clean data, and the chain of n steps is every other timestep of the chain of 2n,
    which progressive distillation needs."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    if trailing:
        return torch.linspace(T - 1, 0, steps + 1, dtype=torch.float64)[:-1].round().long().tolist()
    if steps == 1:
        return [T - 1]
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
