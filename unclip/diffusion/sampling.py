"""Samplers over a denoiser `denoise(x_t, t) -> x0`, shared by the prior (B, D) and the decoder (B, C, H, W).

Each takes the starting noise, the schedule and an explicit `torch.Generator`, and calls
`callback(i, t, x_t, x0)` after every step (for progress bars and denoising strips).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from unclip.diffusion.gaussian import ddim_step, q_posterior, q_sample
from unclip.diffusion.schedule import spaced_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]]


def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def classifier_free_guidance(net_x0: Callable, cond: tuple, scale: float, negative: Optional[tuple] = None,
                             inner: Optional[tuple[tuple, float]] = None) -> Denoiser:
    """Ho & Salimans 2022: x0 = x0_uncond + scale * (x0_cond - x0_uncond), all branches in one batch.

    `net_x0(x_t, t, cond, drop)` predicts x0 with the condition dropped where `drop` is True. Guiding x0
    is the same as guiding eps, since at fixed x_t one is an affine function of the other. With a `negative`
    condition (a negative prompt's, shaped like `cond`) the unconditional branch sees it instead of the dropped
    condition, so guidance pushes away from it (as Kandinsky 2.2 and Stable Diffusion do).

    `inner = (cond_inner, s_inner)`: a condition holding part of `cond` (a decoder's image embedding without its
    caption), guided with a scale of its own, `scale` then guiding from it to the whole of `cond` (InstructPix2Pix,
    Brooks et al. 2023, eq. 3): x0 = x0_uncond + s_inner (x0_inner - x0_uncond) + scale (x0_cond - x0_inner).
    With s_inner = scale it is plain guidance at that scale.
    """

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if scale == 1.0 and inner is None:
            return net_x0(x, t, cond, keep)
        other, drop = (cond, ~keep) if negative is None else (negative, keep)
        conds, drops = [cond, other], [keep, drop]
        if inner is not None:
            conds.append(inner[0])
            drops.append(keep)
        n = len(conds)
        x0 = net_x0(torch.cat([x] * n), torch.cat([t] * n), tuple(torch.cat(parts) for parts in zip(*conds)),
                    torch.cat(drops)).chunk(n)
        x0_cond, x0_uncond = x0[:2]
        if inner is None:
            return x0_uncond + scale * (x0_cond - x0_uncond)
        return x0_uncond + inner[1] * (x0[2] - x0_uncond) + scale * (x0_cond - x0[2])

    return denoise


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: torch.Tensor, ac: torch.Tensor, timesteps: list[int], generator=None,
                callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling, p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x0_hat) (Ho et al. 2020, alg. 2), through
    consecutive `timesteps` down to 0 (all T of them, or the last ones for image-to-image)."""
    for i, t in enumerate(timesteps):
        x0 = denoise(x, _t(x, t))
        mean, var = q_posterior(x0, x, _t(x, t), ac)
        x = mean + var.sqrt() * _noise(x, generator) if t > 0 else x0
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, ac: torch.Tensor, timesteps: list[int], generator=None,
                callback: Callback = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) along `timesteps`, ending at clean data; eta=1 is ancestral."""
    for i, t in enumerate(timesteps):
        x0 = denoise(x, _t(x, t))
        ab = ac[t]
        ab_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(ab)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x = ddim_step(x, x0, ab, ab_prev, sigma)
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * _noise(x, generator)
        if callback:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, ac: torch.Tensor, timesteps: list[int],
                    generator=None, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2, data prediction, in lambda = log(alpha / sigma).

    The last step goes to clean data (sigma = 0) and is first order, as the solver's reference does
    for short chains.
    """
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        x0 = denoise(x, _t(x, t))
        if i + 1 == len(timesteps):
            x = x0  # sigma_next = 0: the exponential integrator lands on the data prediction
        else:
            s = timesteps[i + 1]
            h = lam[s] - lam[t]
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[s] / sigma[t]) * x - alpha[s] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback:
            callback(i, t, x, x0)
    return x


class Sampler(NamedTuple):
    """A sampler: `fn(denoise, x, ac, timesteps, generator, callback)`, one signature for all (as k-diffusion's
    `sample_*`), and whether it visits every timestep of the schedule (ancestral DDPM) or a spaced chain."""

    fn: Callable
    every_step: bool = False


# Every sampler t2i offers (`SamplingOptions.sampler`, the CLI's --sampler): a new one is a function and a line here.
SAMPLERS = {
    "ddpm": Sampler(sample_ddpm, every_step=True),
    "ddim": Sampler(sample_ddim),
    "dpmpp": Sampler(sample_dpmpp_2m),
}


def sampler_timesteps(sampler: str, T: int, steps: int, strength: float = 1.0, trailing: bool = False) -> list[int]:
    """The timesteps a sampler visits: all T for ddpm, else `steps` spaced ones (`trailing`: see
    spaced_timesteps); for image-to-image only the last round(strength x len) of them (SDEdit, Meng et al.
    2022, as diffusers' img2img pipelines count). A trailing chain (a distilled network's, of a few steps,
    which would leave strength only a few values: 0, 0.5 and 1 for 2 steps) starts instead at the strength's
    own timestep, round(strength x (T - 1)), where the full chain starts at strength 1, and goes on along
    the chain below it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    full = list(range(T - 1, -1, -1)) if SAMPLERS[sampler].every_step else spaced_timesteps(T, steps, trailing)
    if trailing:
        start = round(strength * (T - 1))
        return ([start] if start > 0 else []) + [t for t in full if t < start]
    return full[len(full) - round(strength * len(full)):]


def sample(sampler: str, denoise: Denoiser, noise: torch.Tensor, ac: torch.Tensor, steps: int, generator=None,
           callback: Callback = None, init: Optional[torch.Tensor] = None, strength: float = 1.0,
           trailing: bool = False) -> torch.Tensor:
    """Run `sampler` (a name in SAMPLERS) from `noise`; `steps` is ignored by a sampler that takes every step.

    `trailing` spaces the chain as a distilled network needs it (`spaced_timesteps`).
    Image-to-image (SDEdit): with `init` data and `strength` < 1 the chain starts at its timestep t_s, from
    x_{t_s} = q_sample(init, t_s, noise); strength 0 returns `init`, and strength 1 starts from pure noise
    (the plain chain, so the init is ignored).
    """
    timesteps = sampler_timesteps(sampler, len(ac), steps, 1.0 if init is None else strength, trailing)
    if init is not None and strength < 1.0:
        if not timesteps:
            return init
        noise = q_sample(init, torch.full((init.shape[0],), timesteps[0], device=init.device), noise, ac)
    return SAMPLERS[sampler].fn(denoise, noise, ac, timesteps, generator, callback)
