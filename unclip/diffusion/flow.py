"""Rectified flow (Liu et al. 2022; Lipman et al. 2023) as SD3 trains it (Esser et al. 2024), in paper notation.

The path is x_s = (1 - s) x0 + s eps for s in [0, 1]; the network predicts the velocity v = eps - x0 at (x_s, s),
with s drawn logit-normal (sigmoid of N(0, 1): SD3's choice among 61 formulations, weighting the middle of the path).

Any point of a Gaussian diffusion x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is a point of this path, scaled: divided by
c = sqrt(ab) + sqrt(1 - ab), it is x_s with s = sqrt(1 - ab) / c and the same x0 and eps. So a flow network samples
with every sampler of unclip/diffusion/sampling.py, over any schedule of alpha-bar: `to_flow` maps the sampler's
x_t, t to the network's x_s, s, and `gaussian.x0_from_velocity` maps its velocity back to a clean-data estimate
(x0 = x_s - s v). DDIM's step is
then exactly the Euler step of the flow's ODE (both keep x0 and eps of the estimate fixed along a linear path).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from unclip.diffusion.gaussian import expand


def flow_level(ab: torch.Tensor) -> torch.Tensor:
    """The path's s of the diffusion points of alpha-bar `ab`: sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))."""
    return (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())


def flow_time(s: torch.Tensor, T: int) -> torch.Tensor:
    """The network's time input at path position s: s (T - 1), on the scale of a diffusion network's timesteps."""
    return s * (T - 1)


def to_flow(xt: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A diffusion point x_t at timesteps t (B,) as the path's (x_s, s): x_t / (sqrt(ab) + sqrt(1 - ab))."""
    ab = ac[t]
    return xt / expand(ab.sqrt() + (1 - ab).sqrt(), xt), flow_level(ab)


def logit_normal(n: int, device: torch.device, generator: Optional[torch.Generator] = None, m: float = 0.0,
                 std: float = 1.0) -> torch.Tensor:
    """n path positions s = sigmoid(m + std * N(0, 1)) (SD3 sec. 3.1, "lognorm(0.00, 1.00)")."""
    return torch.sigmoid(m + std * torch.randn(n, device=device, generator=generator))


def flow_matching_loss(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, T: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Conditional flow matching: MSE between `net(x_s, s (T - 1))` and v = eps - x0 at logit-normal s."""
    s = logit_normal(x0.shape[0], x0.device, generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xs = (1 - expand(s, x0)) * x0 + expand(s, x0) * eps
    return torch.mean((net(xs, flow_time(s, T)) - (eps - x0)) ** 2)
