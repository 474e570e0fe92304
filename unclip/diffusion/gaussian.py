"""Gaussian diffusion in paper notation (Ho et al. 2020; Salimans & Ho 2022 for v; rectified flow's velocity as a
fourth prediction, unclip/diffusion/flow.py).

`ac` is alpha-bar (alphas_cumprod, shape (T,)); `t` holds integer timesteps (B,). Every function
broadcasts over trailing dimensions, so prior embeddings (B, D) and images (B, C, H, W) share them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PREDICTIONS = ("eps", "x0", "v", "flow")


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


def x0_from_velocity(xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Rectified flow's velocity v = eps - x0, predicted at the path's point x_t / c (unclip/diffusion/flow.py):
    x0 = (x_t - sqrt(1 - ab) v) / c, c = sqrt(ab) + sqrt(1 - ab)."""
    ab = expand(ac[t], xt)
    return (xt - (1 - ab).sqrt() * v) / (ab.sqrt() + (1 - ab).sqrt())


def to_x0(output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean-data estimate implied by a network output of kind `prediction`."""
    if prediction == "x0":
        return output
    if prediction == "eps":
        return predict_x0(xt, t, output, ac)
    if prediction == "v":
        return x0_from_v(xt, t, output, ac)
    if prediction == "flow":
        return x0_from_velocity(xt, t, output, ac)
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def training_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_target(x0, t, eps, ac)
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eqs. 6-7); at t = 0 the mean is x0, variance 0."""
    ab = expand(ac[t], xt)
    ab_prev = expand(torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(ac[t])), xt)
    beta = 1 - ab / ab_prev
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * xt) / (1 - ab)
    var = beta * (1 - ab_prev) / (1 - ab)
    return mean, var


def ddim_step(xt: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor, ab_next: torch.Tensor,
              sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The mean of DDIM's step from x_t (alpha-bar `ab`) to alpha-bar `ab_next` given an x0 estimate (Song et al.
    2021, eq. 12): sqrt(ab_next) x0 + sqrt(1 - ab_next - sigma^2) eps_hat; deterministic when sigma = 0."""
    eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    return ab_next.sqrt() * x0 + (1 - ab_next - sigma**2).clamp(min=0).sqrt() * eps


def ddim_x0_target(xt: torch.Tensor, x_next: torch.Tensor, ab: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    """The x0 with which one DDIM step from x_t lands exactly on x_next (Salimans & Ho 2022, alg. 2):
    ddim_step solved for x0. With ab_next = 1 (clean data) it is x_next itself."""
    r = ((1 - ab_next) / (1 - ab)).sqrt()
    return (x_next - r * xt) / (ab_next.sqrt() - r * ab.sqrt())


def snr(t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ab_t / (1 - ab_t) at timesteps t."""
    return ac[t] / (1 - ac[t])


def min_snr_weight(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): the x0 error weighted by min(SNR_t, gamma), so the nearly
    clean timesteps, whose easy x0 errors dominate the gradients, stop pulling against the noisy ones. Written for
    the network's own target, whose MSE is the x0 MSE times SNR (eps) or SNR + 1 (v): min(SNR, gamma) / (SNR + 1)
    for v, min(1, gamma / SNR) for eps."""
    s = snr(t, ac)
    if prediction == "x0":
        return s.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / s).clamp(max=1.0)
    if prediction == "v":
        return s.clamp(max=gamma) / (s + 1)
    raise ValueError(f"min-SNR weighting is for eps, x0 and v, not {prediction!r} (flow matching weights its timesteps "
                     "by drawing them logit-normal)")


def diffusion_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    ac: torch.Tensor,
    prediction: str,
    generator: Optional[torch.Generator] = None,
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Simple loss: MSE between `net(x_t, t)` and its target at a uniformly drawn t (Ho et al. eq. 14), each
    example weighted by `min_snr_weight` when `min_snr_gamma` is given."""
    t = torch.randint(0, len(ac), (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(x0, t, eps, ac)
    error = (net(xt, t) - training_target(x0, t, eps, ac, prediction)) ** 2
    if min_snr_gamma is None:
        return torch.mean(error)
    return torch.mean(expand(min_snr_weight(t, ac, min_snr_gamma, prediction), error) * error)


def progressive_distillation_loss(
    student: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    teacher_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    ac: torch.Tensor,
    grid: list[int],
    prediction: str,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Progressive distillation (Salimans & Ho 2022, alg. 2): the student learns to take in one DDIM step what
    the teacher takes in two.

    `grid` is the teacher's chain (2n timesteps, T-1 first; the step after the last lands on clean data); the
    student's is every other one. For x_t at a student timestep t = grid[2i], the teacher's two DDIM steps go
    through grid[2i+1] to x_next at grid[2i+2] (or clean data); the target is the x0 with which a single DDIM
    step from x_t lands on x_next, written as the student's own kind of target (v-loss = SNR+1 weighting in x0,
    one of the paper's two choices). `teacher_x0(x_t, t)` is the teacher's (clamped) x0 estimate.
    """
    if len(grid) % 2:
        raise ValueError(f"a teacher chain of {len(grid)} steps cannot be halved")
    B = x0.shape[0]
    i = 2 * torch.randint(0, len(grid) // 2, (B,), device=x0.device, generator=generator)
    chain = torch.tensor(grid + [-1], device=x0.device)  # -1: clean data
    t, mid, nxt = chain[i], chain[i + 1], chain[i + 2]
    ab_ext = torch.cat([ac, torch.ones(1, device=ac.device, dtype=ac.dtype)])  # alpha-bar, 1 at index -1
    ab, ab_mid, ab_next = (expand(ab_ext[s], x0) for s in (t, mid, nxt))
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = q_sample(x0, t, eps, ac)
    with torch.no_grad():
        x_mid = ddim_step(xt, teacher_x0(xt, t), ab, ab_mid)
        x_next = ddim_step(x_mid, teacher_x0(x_mid, mid), ab_mid, ab_next)
        x0_target = ddim_x0_target(xt, x_next, ab, ab_next)
        target = training_target(x0_target, t, predict_eps(xt, t, x0_target, ac), ac, prediction)
    return torch.mean((student(xt, t) - target) ** 2)
