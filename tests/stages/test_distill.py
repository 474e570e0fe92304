"""Progressive distillation: the math on Gaussian data with an exact teacher, and `t2i distill` end to end."""
from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from t2i.cli import app
from unclip.diffusion.process import Diffusion
from unclip.diffusion.gaussian import ddim_step, ddim_x0_target, progressive_distillation_loss, to_x0
from unclip.diffusion.sampling import sample
from unclip.diffusion.schedule import alphas_cumprod, spaced_timesteps
from unclip.options import SamplingOptions
from unclip.pipeline import Pipeline, steps_per_image

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("T", [50, 1000])
def test_trailing_chains_nest_and_every_step_jumps(T):
    for n in (1, 2, 4, 8):
        chain = spaced_timesteps(T, n, trailing=True)
        assert chain[0] == T - 1 and len(set(chain)) == n and min(chain) > 0  # no call spent at t = 0
        assert spaced_timesteps(T, 2 * n, trailing=True)[::2] == chain


def test_the_distillation_target_is_the_ddim_step_solved_for_x0():
    g = torch.Generator().manual_seed(0)
    xt, x0 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for ab, ab_next in ((0.01, 0.4), (0.5, 0.9), (0.3, 1.0)):
        ab, ab_next = torch.tensor(ab), torch.tensor(ab_next)
        torch.testing.assert_close(ddim_x0_target(xt, ddim_step(xt, x0, ab, ab_next), ab, ab_next), x0)


def test_a_student_distilled_from_an_exact_teacher_matches_its_two_step_chain():
    """Data N(mu, s^2): the exact denoiser is known, and a teacher's two DDIM steps are an affine map of x_t, so a
    student affine in x_t at each of its timesteps can learn them exactly. After training on the loss alone, its
    2-step chain lands where the teacher's 4-step chain does, from the same noise, though the teacher's own 2-step
    chain lands elsewhere."""
    T, n, D = 200, 2, 2
    ac = alphas_cumprod("cosine", T)
    mu, s = torch.tensor([1.5, -0.5]), 0.5

    def teacher(xt, t):
        ab = ac[t][:, None]
        return mu + s**2 * ab.sqrt() / (ab * s**2 + 1 - ab) * (xt - ab.sqrt() * mu)

    grid = spaced_timesteps(T, 2 * n, trailing=True)
    index = {t: i for i, t in enumerate(grid[::2])}
    scale = torch.nn.Parameter(torch.zeros(n, D))
    shift = torch.nn.Parameter(torch.zeros(n, D))
    student_v = lambda xt, t: (lambda i: scale[i] * xt + shift[i])(torch.tensor([index[int(u)] for u in t]))  # noqa: E731
    opt = torch.optim.Adam([scale, shift], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x0 = mu + s * torch.randn(512, D, generator=g)
        loss = progressive_distillation_loss(student_v, teacher, x0, ac, grid, "v", g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = torch.randn(1000, D, generator=g)
    with torch.no_grad():
        student = sample("ddim", lambda x, t: to_x0(student_v(x, t), x, t, ac, "v"), noise, ac, n, trailing=True)
    four = sample("ddim", teacher, noise, ac, 2 * n, trailing=True)
    two = sample("ddim", teacher, noise, ac, n, trailing=True)
    assert (student - four).abs().max() < 1e-3
    assert (two - four).abs().max() > 0.1


@pytest.mark.slow
def test_a_student_of_a_guided_teacher_learns_the_guided_chain_and_keeps_its_unconditional_one():
    """Guidance distilled (Meng et al. 2023): the teacher's conditional branch is the exact denoiser of N(mu, s^2),
    its unconditional one that of N(0, s^2); guided at w, both are affine in x_t, and so is a student with its own
    affine map per timestep and per drop. Trained on `distillation_loss(..., guidance=w)` with half the conditions
    dropped, its unguided 2-step chain lands where the teacher's guided 4-step chain does, and its dropped chain
    where the teacher's unconditional one does."""
    T, w, D = 200, 3.0, 2
    ac = alphas_cumprod("cosine", T)
    mu, s = torch.tensor([1.5, -0.5]), 0.5

    def exact(xt, t, mean, drop):
        ab, mean = ac[t][:, None], torch.where(drop[:, None], 0.0, mean)
        return mean + s**2 * ab.sqrt() / (ab * s**2 + 1 - ab) * (xt - ab.sqrt() * mean)

    index = {t: i for i, t in enumerate(spaced_timesteps(T, 2, trailing=True))}
    scale, shift = torch.nn.Parameter(torch.zeros(2, 2, D)), torch.nn.Parameter(torch.zeros(2, 2, D))

    def student_v(xt, t, mean, drop):
        i, d = torch.tensor([index[int(u)] for u in t]), drop.long()
        return scale[i, d] * xt + shift[i, d]

    teacher = Diffusion(exact, ac, "x0", distilled_steps=4)
    student = Diffusion(student_v, ac, "v", distilled_steps=2)
    opt = torch.optim.Adam([scale, shift], lr=0.05)
    g = torch.Generator().manual_seed(0)
    cond = (mu.expand(512, D),)
    for _ in range(1000):
        x0 = mu + s * torch.randn(512, D, generator=g)
        loss = student.distillation_loss(teacher, x0, cond, 0.5, g, guidance=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise, cond, uncond = torch.randn(1000, D, generator=g), (mu.expand(1000, D),), (torch.zeros(1000, D),)
    with torch.no_grad():
        guided = student.sample("ddim", student.denoiser(cond, 1.0), noise, 2)
        dropped = sample("ddim", lambda x, t: student.x0(x, t, cond, torch.ones(1000, dtype=torch.bool)), noise, ac, 2,
                         trailing=True)
    teacher_guided = teacher.sample("ddim", teacher.denoiser(cond, w), noise, 4)
    assert (guided - teacher_guided).abs().max() < 1e-3
    assert (dropped - teacher.sample("ddim", teacher.denoiser(uncond, 1.0), noise, 4)).abs().max() < 1e-3
    assert (guided - teacher.sample("ddim", teacher.denoiser(cond, 1.0), noise, 4)).abs().max() > 0.1  # guidance moved it


@pytest.mark.slow
def test_distill_writes_a_pipeline_that_samples_in_its_own_steps(tiny_pipeline, mnist_dir, tmp_path):
    """Two rounds (8 -> 4 -> 2) through the CLI: each a run folder, the last one the new pipeline's decoder, which
    then takes 2 DDIM steps whatever sampler and steps are asked; --resume after the end redoes nothing."""
    out = tmp_path / "fast"
    args = ["distill", "--pipeline", tiny_pipeline, "--out", out, "--steps", 2, "--teacher-steps", 8,
            "--data-dir", mnist_dir, "--max-steps", 3, "--batch-size", 20]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "distill").iterdir()) == ["config.yaml", "steps-2", "steps-4"]
    asked = yaml.safe_load((out / "distill" / "config.yaml").read_text())
    assert (asked["teacher_steps"], asked["steps"], asked["train"]["max_steps"]) == (8, 2, 3)
    saved = yaml.safe_load((out / "decoder" / "config.yaml").read_text())
    assert saved["model"]["distilled_steps"] == 2 and saved["train"]["max_steps"] == 3
    assert (out / "decoder" / "model.safetensors").read_bytes() == \
        (out / "distill" / "steps-2" / "model.safetensors").read_bytes()
    assert (out / "decoder" / "model.safetensors").read_bytes() != \
        (tiny_pipeline / "decoder" / "model.safetensors").read_bytes()
    pipe = Pipeline.load(out, "cpu")
    assert pipe.decoder.timesteps("dpmpp", 10) == spaced_timesteps(50, 2, trailing=True)
    assert steps_per_image(pipe, SamplingOptions(steps=7)) == 2
    r = run("generate", "--checkpoints", out, "--prompt", "six", "-n", 2, "--steps", 7, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert "sampling their own DDIM steps whatever is asked: the decoder 2; the sampler and steps asked for drive the " \
        "prior" in " ".join(r.output.split())
    assert (tmp_path / "g" / "0001.png").exists()
    before = (out / "decoder" / "model.safetensors").read_bytes()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert (out / "decoder" / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_distill_with_guidance_writes_a_pipeline_that_samples_unguided(tiny_pipeline, mnist_dir, tmp_path):
    """The teacher's guidance is learnt, so the distilled pipeline's sampling.yaml sets guidance 1, keeping the
    teacher's other defaults, and its decoder records what it learnt, which a guidance asked for then adds to;
    without --guidance the teacher's own default (here the library's, 1) is distilled."""
    (tiny_pipeline / "sampling.yaml").write_text("guidance: 2.5\nprior_guidance: 2.0\n")
    try:
        args = ["distill", "--pipeline", tiny_pipeline, "--steps", 2, "--teacher-steps", 4, "--data-dir", mnist_dir,
                "--max-steps", 2, "--batch-size", 20]
        r = run(*args, "--out", tmp_path / "guided")
        assert r.exit_code == 0, r.output
        assert yaml.safe_load((tmp_path / "guided" / "distill" / "config.yaml").read_text())["guidance"] == 2.5
        assert yaml.safe_load((tmp_path / "guided" / "sampling.yaml").read_text()) == {"guidance": 1.0,
                                                                                       "prior_guidance": 2.0}
        learnt = yaml.safe_load((tmp_path / "guided" / "decoder" / "config.yaml").read_text())["model"]
        assert learnt["distilled_guidance"] == 2.5
        for asked, said in ((["--prior-guidance", 3], ""),  # the prior is not distilled: nothing to say
                            (["--guidance", 2], "the decoder learnt guidance 2.5, so guidance 2 guides it again on top")):
            r = run("generate", "--checkpoints", tmp_path / "guided", "--prompt", "six", "-n", 1, *asked,
                    "--out", tmp_path / "g")
            assert r.exit_code == 0 and (said in " ".join(r.output.split())) and ("learnt" in r.output) == bool(said)
        r = run(*args, "--student-guidance", 1.5, "--out", tmp_path / "on-top")
        assert r.exit_code == 0, r.output  # the student guided on top of what it learnt, by the pipeline's own default
        assert yaml.safe_load((tmp_path / "on-top" / "sampling.yaml").read_text()) == {"guidance": 1.5,
                                                                                        "prior_guidance": 2.0}
        (tmp_path / "guided" / "sampling.yaml").write_text("guidance: 1.5\n")
        for asked, noted in (([], False), (["--guidance", 2], True)):  # only a guidance asked for is worth a note
            r = run("generate", "--checkpoints", tmp_path / "guided", "--prompt", "six", "-n", 1, *asked,
                    "--out", tmp_path / "g")
            assert r.exit_code == 0 and ("learnt" in r.output) == noted, r.output
        (tiny_pipeline / "sampling.yaml").write_text("guidance: 2.5\ntext_guidance: 1.5\n")
        r = run(*args, "--out", tmp_path / "two-scales")
        assert r.exit_code == 1 and "name the one scale to distill with --guidance" in " ".join(r.output.split())
    finally:
        (tiny_pipeline / "sampling.yaml").unlink()
    r = run(*args, "--out", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "plain" / "distill" / "config.yaml").read_text())["guidance"] == 1.0
    assert not (tmp_path / "plain" / "sampling.yaml").exists()


def test_distill_stage_prior_writes_a_pipeline_whose_prior_samples_in_its_own_steps(tiny_pipeline, mnist_dir,
                                                                                    tmp_path):
    """--stage prior: the rounds are prior folders, the prior's guidance (sampling.yaml's prior_guidance) is the one
    learnt and set to 1 after, and the decoder is the teacher pipeline's, untouched."""
    (tiny_pipeline / "sampling.yaml").write_text("guidance: 2.5\nprior_guidance: 2.0\n")
    out = tmp_path / "fast-prior"
    try:
        r = run("distill", "--pipeline", tiny_pipeline, "--out", out, "--stage", "prior", "--steps", 2,
                "--teacher-steps", 8, "--data-dir", mnist_dir, "--max-steps", 2, "--batch-size", 20)
    finally:
        (tiny_pipeline / "sampling.yaml").unlink()
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "distill").iterdir()) == ["config.yaml", "prior-steps-2", "prior-steps-4"]
    asked = yaml.safe_load((out / "distill" / "config.yaml").read_text())
    assert (asked["stage"], asked["guidance"]) == ("prior", 2.0)
    assert yaml.safe_load((out / "sampling.yaml").read_text()) == {"guidance": 2.5, "prior_guidance": 1.0}
    assert yaml.safe_load((out / "prior" / "config.yaml").read_text())["model"]["distilled_steps"] == 2
    assert (out / "decoder" / "model.safetensors").read_bytes() == \
        (tiny_pipeline / "decoder" / "model.safetensors").read_bytes()
    assert (out / "prior" / "model.safetensors").read_bytes() != \
        (tiny_pipeline / "prior" / "model.safetensors").read_bytes()
    pipe = Pipeline.load(out, "cpu")
    assert pipe.prior.timesteps("dpmpp", 10) == spaced_timesteps(len(pipe.prior.ac), 2, trailing=True)
    assert pipe.decoder.timesteps("dpmpp", 10) != pipe.prior.timesteps("dpmpp", 10)
    r = run("generate", "--checkpoints", out, "--prompt", "six", "-n", 2, "--steps", 7, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert "whatever is asked: the prior 2; the sampler and steps asked for drive the decoder" in " ".join(r.output.split())
    assert (tmp_path / "g" / "0001.png").exists()
    r = run("generate", "--checkpoints", out, "--prompt", "six", "-n", 2, "--out", tmp_path / "g")
    assert r.exit_code == 0 and "whatever is asked" not in r.output, r.output  # nothing asked: nothing to say


@pytest.mark.parametrize("extra, message", [
    (["--steps", 4, "--teacher-steps", 12], "teacher_steps (12) must be steps (4) times a power of two"),
    (["--steps", 4, "--teacher-steps", 4], "teacher_steps (4) must be steps (4) times a power of two"),
])
def test_distill_refuses_bad_input_in_one_line(tiny_pipeline, mnist_dir, tmp_path, extra, message):
    r = run("distill", "--pipeline", tiny_pipeline, "--out", tmp_path / "x", "--data-dir", mnist_dir, *extra)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert message in r.output


def test_distill_refuses_a_missing_pipeline_or_writing_over_its_teacher(tiny_pipeline, tmp_path):
    r = run("distill", "--pipeline", tmp_path / "nothing", "--out", tmp_path / "x")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    r = run("distill", "--pipeline", tiny_pipeline, "--out", tiny_pipeline)
    assert r.exit_code == 1 and "--out must be a new folder" in r.output, r.output
