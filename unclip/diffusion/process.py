"""The diffusion process of one stage: a network, its noise schedule and its prediction target, with the
sampling and training entry points every diffusion stage shares (each network seen as `net_x0(x_t, t, cond, drop)`)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from unclip.diffusion.flow import flow_matching_loss, flow_time, to_flow
from unclip.diffusion.gaussian import diffusion_loss, progressive_distillation_loss, to_x0
from unclip.diffusion.sampling import Denoiser, classifier_free_guidance, sample, sampler_timesteps
from unclip.diffusion.schedule import alphas_cumprod, spaced_timesteps


@dataclass
class Diffusion:
    """A network, its schedule and what it predicts."""

    net: Callable  # net(x_t, t, *cond, drop=drop) -> output
    ac: torch.Tensor  # alphas_cumprod (T,)
    prediction: str  # eps | x0 | v | flow (rectified flow's velocity, at the path's point: unclip/diffusion/flow.py)
    clip_x0: Optional[float] = None  # clamp x0 estimates to [-c, c] (pixels), or None (embeddings)
    # a distilled network (t2i distill) samples with DDIM in exactly this many steps, the trailing chain it was
    # distilled for, whatever sampler and steps are asked; 0: any sampler, any steps
    distilled_steps: int = 0

    @classmethod
    def build(cls, net: Callable, m, device: torch.device, clip_x0: Optional[float] = None) -> "Diffusion":
        """`net` with the schedule, target and distilled chain its model config `m` names (every diffusion stage's
        config has `schedule`, `timesteps`, `prediction`, `distilled_steps`)."""
        return cls(net, alphas_cumprod(m.schedule, m.timesteps).to(device), m.prediction, clip_x0, m.distilled_steps)

    def chain(self, sampler: str, steps: int) -> tuple[str, int, bool]:
        """(sampler, steps, trailing) this network samples with when `sampler` and `steps` are asked for."""
        return ("ddim", self.distilled_steps, True) if self.distilled_steps else (sampler, steps, False)

    def sample(self, sampler: str, denoise: Denoiser, noise: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
        """`unclip.diffusion.sampling.sample` over this schedule, along `chain(sampler, steps)`."""
        sampler, steps, trailing = self.chain(sampler, steps)
        return sample(sampler, denoise, noise, self.ac, steps, trailing=trailing, **kwargs)

    def timesteps(self, sampler: str, steps: int, strength: float = 1.0) -> list[int]:
        """The timesteps `sample` visits (its network calls)."""
        sampler, steps, trailing = self.chain(sampler, steps)
        return sampler_timesteps(sampler, len(self.ac), steps, strength, trailing)

    def output(self, x: torch.Tensor, t: torch.Tensor, cond: tuple, drop: torch.Tensor) -> torch.Tensor:
        """The network's output at the diffusion point x_t, t: a flow network reads the path's point and time instead."""
        if self.prediction == "flow":
            xs, s = to_flow(x, t, self.ac)
            return self.net(xs, flow_time(s, len(self.ac)), *cond, drop=drop)
        return self.net(x, t, *cond, drop=drop)

    def x0(self, x: torch.Tensor, t: torch.Tensor, cond: tuple, drop: torch.Tensor) -> torch.Tensor:
        """The raw clean-data estimate (unclamped: guidance must see the predictions as they are)."""
        return to_x0(self.output(x, t, cond, drop), x, t, self.ac, self.prediction)

    def denoiser(self, cond: tuple, guidance: float, negative: Optional[tuple] = None,
                 inner: Optional[tuple[tuple, float]] = None) -> Denoiser:
        """The sampler's `denoise(x_t, t) -> x0`: classifier-free guidance over the raw predictions first (away
        from a `negative` condition when given; `inner`: a part of `cond` with a scale of its own), clamping to
        the data range after (as diffusers' schedulers and Imagen's thresholding do)."""
        guided = classifier_free_guidance(self.x0, cond, guidance, negative, inner)
        if not self.clip_x0:
            return guided
        return lambda x, t: guided(x, t).clamp(-self.clip_x0, self.clip_x0)

    def loss(self, x0: torch.Tensor, cond: tuple, cond_drop: float, generator=None,
             min_snr_gamma: Optional[float] = None) -> torch.Tensor:
        """Training loss with the condition dropped for a `cond_drop` fraction of the batch (min-SNR-gamma weighted
        when `min_snr_gamma` is given); a flow network's is flow matching's, at logit-normal path positions."""
        drop = torch.rand(x0.shape[0], device=x0.device, generator=generator) < cond_drop
        if self.prediction == "flow":  # its configs refuse min_snr_gamma (config.check_objective)
            return flow_matching_loss(lambda xs, time: self.net(xs, time, *cond, drop=drop), x0, len(self.ac), generator)
        return diffusion_loss(lambda xt, t: self.net(xt, t, *cond, drop=drop), x0, self.ac, self.prediction, generator,
                              min_snr_gamma)

    def distillation_loss(self, teacher: "Diffusion", x0: torch.Tensor, cond: tuple, cond_drop: float,
                          generator=None, guidance: float = 1.0) -> torch.Tensor:
        """Progressive distillation of `teacher` (which samples in 2n steps) into this network (n steps): the
        same condition, dropped alike for both (so the student's unconditional half is distilled too). With
        `guidance` the teacher's chain is classifier-free guided where the condition is kept, so the student
        learns the guided chain in one network call a step (Meng et al. 2023, with progressive distillation)."""
        dropped = torch.rand(x0.shape[0], device=x0.device, generator=generator) < cond_drop
        teacher_steps = teacher.distilled_steps  # the first teacher's is set to the chain it is distilled from
        grid = spaced_timesteps(len(self.ac), teacher_steps, trailing=True)
        if grid[::2] != spaced_timesteps(len(self.ac), self.distilled_steps, trailing=True):
            raise ValueError(f"a chain of {self.distilled_steps} steps is not every other step of the teacher's {teacher_steps}")

        def teacher_net(x: torch.Tensor, t: torch.Tensor, *c: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            # each guidance branch (a copy of the batch) drops the student's rows too: their guided x0 is unconditional
            return teacher.net(x, t, *c, drop=drop | dropped.repeat(x.shape[0] // dropped.shape[0]))

        teacher_x0 = replace(teacher, net=teacher_net).denoiser(cond, guidance)  # clamped as sampling clamps
        return progressive_distillation_loss(lambda xt, t: self.output(xt, t, cond, dropped), teacher_x0, x0, self.ac,
                                             grid, self.prediction, generator)
