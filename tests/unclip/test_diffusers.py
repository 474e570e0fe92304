"""diffusers as an independent reference for the samplers (skipped where diffusers is not installed)."""
from __future__ import annotations

import pytest
import torch

from unclip.diffusion.gaussian import q_posterior
from unclip.diffusion.sampling import sample_ddim, sample_ddpm, sample_dpmpp_2m
from unclip.diffusion.schedule import alphas_cumprod

diffusers = pytest.importorskip("diffusers", reason="the cross-checks need diffusers: pip install -e \".[test]\"")
T = 100


def reference_betas(ac: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac.double()[:-1]])
    return 1 - ac.double() / prev


def toy_x0(x, t):
    """A deterministic stand-in for a trained network's x0 prediction."""
    return torch.tanh(x) * 0.8 + 0.001 * t.float().view(-1, *([1] * (x.ndim - 1)))


def test_ddim_matches_diffusers():
    ac = alphas_cumprod("cosine", T)
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=reference_betas(ac).numpy(),
                                  prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="trailing")
    ref.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_x0(expected, torch.full((2,), int(t))), int(t), expected, eta=0.0).prev_sample
    ours = sample_ddim(toy_x0, x, ref.alphas_cumprod.float(), [int(t) for t in ref.timesteps])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_dpmpp_2m_matches_diffusers():
    ac = alphas_cumprod("cosine", T)
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=reference_betas(ac).numpy(), algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="sample", final_sigmas_type="zero", timestep_spacing="linspace")
    ref.set_timesteps(12)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_x0(expected, torch.full((3,), int(t))), t, expected).prev_sample
    ours = sample_dpmpp_2m(toy_x0, x, ref.alphas_cumprod.float(), [int(t) for t in ref.timesteps])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_ddpm_matches_diffusers():
    ac = alphas_cumprod("linear", T)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=reference_betas(ac).numpy(),
                                  prediction_type="sample", variance_type="fixed_small", clip_sample=False)
    ref.set_timesteps(T)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_x0(expected, torch.full((2,), int(t))), int(t), expected, generator=g).prev_sample
    ac = ref.alphas_cumprod.float()
    ours = sample_ddpm(toy_x0, x, ac, list(range(len(ac) - 1, -1, -1)), torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_posterior_at_t0_is_the_clean_estimate():
    ac = alphas_cumprod("cosine", T)
    x0, xt = torch.randn(2, 3), torch.randn(2, 3)
    mean, var = q_posterior(x0, xt, torch.zeros(2, dtype=torch.long), ac)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)
