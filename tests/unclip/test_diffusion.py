"""The diffusion math: schedules, identities, samplers with an exact denoiser, guidance (diffusers: test_diffusers.py)."""
from __future__ import annotations

import pytest
import torch

from unclip.diffusion.flow import flow_matching_loss, flow_time, to_flow
from unclip.diffusion.gaussian import (ddim_step, diffusion_loss, predict_eps, predict_x0, q_sample, to_x0, training_target,
                                      v_target, x0_from_v)
from unclip.diffusion.sampling import classifier_free_guidance, sample, sampler_timesteps
from unclip.diffusion.process import Diffusion
from unclip.diffusion.schedule import alphas_cumprod, spaced_timesteps
from unclip.models.prior import residual_whitening


@pytest.mark.parametrize("name", ["cosine", "linear", "rectified"])
@pytest.mark.parametrize("T", [50, 1000])
def test_schedule_is_a_decreasing_signal_level(name, T):
    ac = alphas_cumprod(name, T)
    assert ac.shape == (T,) and ac.dtype == torch.float32
    assert torch.all(ac[1:] < ac[:-1])
    assert 0.98 < ac[0] < 1 and ac[-1] < 0.01  # starts almost clean, ends almost pure noise


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        spaced_timesteps(10, 0)


@pytest.mark.parametrize("shape", [(6, 16), (6, 1, 8, 8)])
def test_noising_identities(shape):
    """q_sample then the x0/eps/v conversions recover what was put in, for embeddings and images alike."""
    ac = alphas_cumprod("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 990])
    xt = q_sample(x0, t, eps, ac)
    torch.testing.assert_close(predict_x0(xt, t, eps, ac), x0, atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(predict_eps(xt, t, x0, ac), eps, atol=5e-3, rtol=1e-3)
    torch.testing.assert_close(x0_from_v(xt, t, v_target(x0, t, eps, ac), ac), x0, atol=1e-4, rtol=1e-4)
    for kind in ("eps", "x0", "v", "flow"):
        torch.testing.assert_close(to_x0(training_target(x0, t, eps, ac, kind), xt, t, ac, kind), x0, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("ab", [0.95, 0.5, 0.05])  # SNR 19, 1, 0.05: above gamma and below
def test_min_snr_weighting_is_the_x0_error_times_min_snr_gamma_for_every_prediction(ab):
    """Hang et al. 2023: whatever the network predicts, the weighted loss of an x0 estimate off by delta is
    min(SNR, gamma) delta^2; unweighted, v's is (SNR + 1) delta^2, eps's SNR delta^2, x0's delta^2."""
    ac, gamma, delta = torch.tensor([ab]), 5.0, 0.3  # one timestep, so every example is at SNR ab / (1 - ab)
    snr = ab / (1 - ab)
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for kind, plain in (("x0", 1.0), ("eps", snr), ("v", snr + 1)):
        def net(xt, t):  # an x0 estimate off by delta everywhere, given as the kind's own target
            x0_hat = x0 + delta
            return training_target(x0_hat, t, predict_eps(xt, t, x0_hat, ac), ac, kind)

        for gamma_, weight in ((None, plain), (gamma, min(snr, gamma))):
            loss = diffusion_loss(net, x0, ac, kind, torch.Generator().manual_seed(1), min_snr_gamma=gamma_)
            assert loss.item() == pytest.approx(weight * delta**2, rel=1e-3), (kind, gamma_)


def test_a_diffusion_point_is_a_point_of_the_rectified_path_and_ddim_is_its_euler_step():
    """x_t / (sqrt(ab) + sqrt(1 - ab)) = (1 - s) x0 + s eps; on the rectified schedule s_t = (t + 1) / (T + 1); and a
    DDIM step, in path coordinates, is x_s + (s' - s) v for the velocity v the network predicts."""
    T = 1000
    g = torch.Generator().manual_seed(0)
    for name in ("rectified", "cosine"):
        ac = alphas_cumprod(name, T)
        x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
        t = torch.tensor([0, 10, 500, 900, 999])
        xs, s = to_flow(q_sample(x0, t, eps, ac), t, ac)
        w = s.view(-1, 1, 1, 1)
        torch.testing.assert_close(xs, (1 - w) * x0 + w * eps, atol=1e-5, rtol=1e-5)
        if name == "rectified":
            torch.testing.assert_close(s, (t + 1) / (T + 1), atol=2e-5, rtol=0)  # float32 alpha-bar near 1
        xt, v = q_sample(x0, t, eps, ac), torch.randn(5, 3, 4, 4, generator=g)  # any velocity
        nxt = (t - 7).clamp(min=0)
        ab, ab_next = (ac[i].view(-1, 1, 1, 1) for i in (t, nxt))
        stepped = ddim_step(xt, to_x0(v, xt, t, ac, "flow"), ab, ab_next)
        xs_next, s_next = to_flow(stepped, nxt, ac)
        torch.testing.assert_close(xs_next, to_flow(xt, t, ac)[0] + (s_next - s).view(-1, 1, 1, 1) * v, atol=1e-4, rtol=1e-4)


def test_flow_matching_learns_a_distribution_every_sampler_then_draws():
    """A small network trained by flow matching alone (logit-normal times, velocity targets) samples N(mu, 0.3^2)
    through the shared Diffusion and samplers."""
    torch.manual_seed(0)
    T, mu = 1000, torch.tensor([2.0, -1.0])
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 2))
    call = lambda x, time, drop=None: net(torch.cat([x, time[:, None] / (T - 1)], dim=1))  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss = flow_matching_loss(lambda x, time: call(x, time), mu + 0.3 * torch.randn(256, 2, generator=g), T, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    diffusion = Diffusion(call, alphas_cumprod("rectified", T), "flow")
    assert flow_time(torch.tensor(1.0), T) == T - 1
    for sampler, steps in (("ddim", 20), ("dpmpp", 10)):
        x = diffusion.sample(sampler, diffusion.denoiser((), 1.0), torch.randn(2000, 2, generator=g), steps, generator=g)
        torch.testing.assert_close(x.mean(0), mu, atol=0.1, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), 0.3), atol=0.08, rtol=0)


def gaussian_oracle(mu: torch.Tensor, s: float, ac: torch.Tensor):
    """The exact E[x0 | x_t] when the data are N(mu, s^2 I)."""

    def denoise(xt, t):
        ab = ac[t].view(-1, *([1] * (xt.ndim - 1)))
        return mu + s**2 * ab.sqrt() / (ab * s**2 + 1 - ab) * (xt - ab.sqrt() * mu)

    return denoise


@pytest.mark.parametrize("sampler,steps", [("ddpm", 0), ("ddim", 50), ("dpmpp", 20)])
@pytest.mark.parametrize("shape", [(4000, 2), (4000, 1, 2, 1)])
def test_samplers_draw_the_data_distribution_with_an_exact_denoiser(sampler, steps, shape):
    ac = alphas_cumprod("cosine", 200)
    mu = torch.tensor([1.5, -0.5]).view(1, *shape[1:])
    g = torch.Generator().manual_seed(0)
    x = sample(sampler, gaussian_oracle(mu, 0.5, ac), torch.randn(shape, generator=g), ac, steps, generator=g)
    flat = x.reshape(shape[0], -1)
    torch.testing.assert_close(flat.mean(0), mu.flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.full((2,), 0.5), atol=0.05, rtol=0)


def test_point_mass_is_recovered_exactly():
    ac = alphas_cumprod("linear", 100)
    target = torch.randn(3, 5)
    g = torch.Generator().manual_seed(1)
    for name in ("ddpm", "ddim", "dpmpp"):
        x = sample(name, lambda xt, t: target, torch.randn(3, 5, generator=g), ac, 7, generator=g)
        torch.testing.assert_close(x, target)


def test_samplers_are_seeded_by_their_generator():
    ac = alphas_cumprod("cosine", 100)
    denoise = gaussian_oracle(torch.zeros(1, 4), 1.0, ac)
    runs = [sample("ddpm", denoise, torch.randn(2, 4, generator=torch.Generator().manual_seed(s)), ac, 10,
                   generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_guidance_extrapolates_from_unconditional_to_conditional():
    calls = []

    def net_x0(x, t, cond, drop):
        calls.append(x.shape[0])
        return torch.where(drop[:, None], torch.zeros_like(x), cond[0])

    cond = (torch.ones(3, 2),)
    denoise = classifier_free_guidance(net_x0, cond, 3.0)
    out = denoise(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert calls == [6]  # conditional and unconditional halves in one batch
    torch.testing.assert_close(out, torch.full((3, 2), 3.0))
    assert torch.equal(classifier_free_guidance(net_x0, cond, 1.0)(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)),
                       torch.ones(3, 2))
    # A negative condition takes the unconditional half's place, undropped: x0 = n + 3 (c - n) = 1 + 3 (1 - (-1)).
    calls.clear()
    negative = classifier_free_guidance(net_x0, cond, 3.0, negative=(-torch.ones(3, 2),))
    torch.testing.assert_close(negative(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), torch.full((3, 2), 5.0))
    assert calls == [6]


def test_an_inner_condition_takes_its_own_scale_and_the_outer_scale_the_rest():
    calls = []

    def net_x0(x, t, cond, drop):  # x0 is the condition's first value, 0 when dropped
        calls.append(x.shape[0])
        return torch.where(drop[:, None], torch.zeros_like(x), cond[0])

    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    cond, inner = (torch.ones(3, 2),), (torch.full((3, 2), 0.5),)
    # x0 = uncond + s_inner (inner - uncond) + s (cond - inner) = 0 + 2 * 0.5 + 4 * 0.5
    out = classifier_free_guidance(net_x0, cond, 4.0, inner=(inner, 2.0))(x, t)
    assert calls == [9]  # the three branches in one batch
    torch.testing.assert_close(out, torch.full((3, 2), 3.0))
    # one scale for both is plain guidance at that scale
    torch.testing.assert_close(classifier_free_guidance(net_x0, cond, 3.0, inner=(inner, 3.0))(x, t),
                               classifier_free_guidance(net_x0, cond, 3.0)(x, t))
    # the inner scale alone (outer 1) guides only the inner part: 0 + 3 * 0.5 + 1 * 0.5
    torch.testing.assert_close(classifier_free_guidance(net_x0, cond, 1.0, inner=(inner, 3.0))(x, t), torch.full((3, 2), 2.0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_image_to_image_chain_starts_partway(sampler):
    """SDEdit: strength 0 returns the init, 1 is the plain chain from the same noise, and in between the chain
    runs its last round(strength x n) steps from the init noised to the first of them."""
    ac = alphas_cumprod("cosine", 20)
    full = sampler_timesteps(sampler, 20, 8)
    half = sampler_timesteps(sampler, 20, 8, 0.5)
    assert half == full[len(full) // 2:] and half[-1] == 0 and sampler_timesteps(sampler, 20, 8, 0.0) == []
    init, target = torch.full((2, 3), 0.5), torch.full((2, 3), -0.25)
    seen = []

    def denoise(x, t):
        seen.append((int(t[0]), x.clone()))
        return target

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(sampler, denoise, noise, ac, 8, init=init, strength=0.0), init) and not seen
    out = sample(sampler, denoise, noise, ac, 8, generator=torch.Generator().manual_seed(1), init=init, strength=0.5)
    torch.testing.assert_close(out, target)  # a denoiser that knows the answer lands on it
    assert [t for t, _ in seen] == half
    torch.testing.assert_close(seen[0][1], q_sample(init, torch.full((2,), half[0]), noise, ac))
    seen.clear()
    sample(sampler, denoise, noise, ac, 8, generator=torch.Generator().manual_seed(1), init=init, strength=1.0)
    assert seen[0][0] == full[0] and torch.equal(seen[0][1], noise)  # strength 1: pure noise, the init unused


def test_image_to_image_on_a_distilled_chain_starts_at_the_strengths_own_timestep():
    """A 2-step trailing chain (999, 500) would leave strength three values; instead the chain starts at
    round(strength x 999) and joins the distilled steps below it, so 0.6 and 0.8 differ, and the chain is
    sampled from the init noised to that start."""
    assert sampler_timesteps("ddim", 1000, 2, trailing=True) == [999, 500]
    got = {s: sampler_timesteps("ddim", 1000, 2, s, trailing=True) for s in (0.0, 0.2, 0.5, 0.6, 0.8, 1.0)}
    assert got == {0.0: [], 0.2: [200], 0.5: [500], 0.6: [599, 500], 0.8: [799, 500], 1.0: [999, 500]}
    ac = alphas_cumprod("cosine", 1000)
    init, noise = torch.full((2, 3), 0.5), torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def denoise(x, t):
        seen.append((int(t[0]), x.clone()))
        return torch.zeros_like(x)

    sample("ddim", denoise, noise, ac, 2, init=init, strength=0.8, trailing=True)
    assert [t for t, _ in seen] == [799, 500]
    torch.testing.assert_close(seen[0][1], q_sample(init, torch.full((2,), 799), noise, ac))


def test_guidance_combines_raw_predictions_then_clamps():
    """Raw x0 of 2 (conditional) and 0 (unconditional) at guidance 3 is 6, clamped to 1. Clamping each half
    first (the old order) would hand the sampler 3, far outside the data range."""
    net = lambda x, t, emb, drop: torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(x), torch.full_like(x, 2.0))  # noqa: E731
    decoder = Diffusion(net, alphas_cumprod("cosine", 10), "x0", clip_x0=1.0)
    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    assert torch.equal(decoder.denoiser((torch.zeros(2, 4),), 3.0)(x, t), torch.ones(2, 1, 2, 2))
    assert torch.equal(decoder.x0(x, t, (torch.zeros(2, 4),), torch.zeros(2, dtype=torch.bool)), torch.full_like(x, 2.0))
    prior = Diffusion(net, alphas_cumprod("cosine", 10), "x0")  # embeddings: never clamped
    assert torch.equal(prior.denoiser((torch.zeros(2, 4),), 3.0)(x, t), torch.full_like(x, 6.0))


def test_residual_whitening_makes_what_the_caption_leaves_open_white():
    """x = text A + b + noise spread unevenly over rotated directions: after the whitening that noise has identity
    covariance, and the coloring undoes the whitening."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(20_000, 6, generator=g)
    A = torch.randn(6, 4, generator=g)
    scales = torch.tensor([2.0, 0.5, 0.1, 0.05])
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    x = text @ A + 3.0 + (torch.randn(20_000, 4, generator=g) * scales) @ Q.T
    mean, whitening, coloring = residual_whitening(x, text)
    residual = (x - text @ A - 3.0) @ whitening
    torch.testing.assert_close(torch.cov(residual.T), torch.eye(4), atol=0.05, rtol=0)
    torch.testing.assert_close(((x - mean) @ whitening) @ coloring + mean, x, atol=1e-3, rtol=1e-4)
