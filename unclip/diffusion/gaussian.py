"""Gaussian diffusion in paper notation (Ho et al. 2020; Salimans & Ho 2022 for v).

`ac` is alpha-bar (alphas_cumprod, shape (T,)); `t` holds integer timesteps (B,). Every function
broadcasts over trailing dimensions, so prior embeddings (B, D) and images (B, C, H, W) share them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PREDICTIONS = ("eps", "x0", "v")


def expand(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape per-sample coefficients (B,) to broadcast against x (B, ...)."""
    return a.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. eq. 4)."""
    ab = expand(ac[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def predict_x0(xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    ab = expand(ac[t], xt)
    return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()


def predict_eps(xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    ab = expand(ac[t], xt)
    return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()


def v_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, sec. 4)."""
    ab = expand(ac[t], x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def x0_from_v(xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    ab = expand(ac[t], xt)
    return ab.sqrt() * xt - (1 - ab).sqrt() * v


def to_x0(output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean-data estimate implied by a network output of kind `prediction`."""
    if prediction == "x0":
        return output
    if prediction == "eps":
        return predict_x0(xt, t, output, ac)
    if prediction == "v":
        return x0_from_v(xt, t, output, ac)
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def training_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_target(x0, t, eps, ac)
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eqs. 6-7); at t = 0 the mean is x0, variance 0."""
    ab = expand(ac[t], xt)
    ab_prev = expand(torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(ac[t])), xt)
    beta = 1 - ab / ab_prev
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * xt) / (1 - ab)
    var = beta * (1 - ab_prev) / (1 - ab)
    return mean, var


def diffusion_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    ac: torch.Tensor,
    prediction: str,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Simple loss: MSE between `net(x_t, t)` and its target at a uniformly drawn t (Ho et al. eq. 14)."""
    t = torch.randint(0, len(ac), (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(x0, t, eps, ac)
    return torch.mean((net(xt, t) - training_target(x0, t, eps, ac, prediction)) ** 2)
