"""The Python API: diffusers' calling convention, the same pixels as the CLI, negative prompts, image-to-image."""
from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from tests.conftest import draw_glyphs
from unclip import UnCLIPPipeline
from unclip.errors import SettingWarning, T2iWarning, UserError
from t2i.folders import generate_images
from unclip.options import SamplingOptions
from unclip.pipeline import steps_per_image

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def pipe(tiny_pipeline) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_pretrained(tiny_pipeline, device="cpu")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", T2iWarning)  # the snippet asks nothing the pipeline cannot honour
        exec(compile(code, "README.md", "exec"), {})
    assert Image.open(tmp_path / "six.png").size == (28, 28)


def test_output_types_and_shapes(pipe):
    pil = pipe(["one", "two"], num_images_per_prompt=2, num_inference_steps=3, generator=seeded()).images
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (28, 28) for im in pil)
    pt = pipe(["one", "two"], num_images_per_prompt=2, num_inference_steps=3, generator=seeded(), output_type="pt").images
    assert pt.shape == (4, 1, 28, 28) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[3]), (pt[3, 0] * 255).round().byte().numpy())
    with pytest.raises(UserError, match="output_type"):
        pipe("one", output_type="latent")
    with pytest.raises(UserError, match="prompt is empty"):
        pipe(" ")


def test_same_pixels_as_the_cli_and_batching_does_not_change_them(pipe, tiny_pipeline, tmp_path):
    r = runner.invoke(app, ["generate", "--checkpoints", str(tiny_pipeline), "--prompt", "six", "-n", "5", "--steps", "3",
                            "--seed", "7", "--batch-size", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    cli = np.stack([np.asarray(Image.open(tmp_path / f"{i:04d}.png")) for i in range(5)])
    api = pipe("six", num_images_per_prompt=5, num_inference_steps=3, generator=seeded(7), output_type="uint8",
               batch_size=2).images
    np.testing.assert_array_equal(api[:, 0].numpy(), cli)
    whole = pipe("six", num_images_per_prompt=5, num_inference_steps=3, generator=seeded(7), output_type="uint8").images
    assert not torch.equal(whole, api)  # a batch draws its noise together: the batch size is part of the seed
    torch.manual_seed(3)
    a = pipe("six", num_inference_steps=2, output_type="uint8").images
    torch.manual_seed(3)
    assert torch.equal(a, pipe("six", num_inference_steps=2, output_type="uint8").images)  # no generator: torch's seed


def test_prior_candidates_reach_the_prior(pipe):
    """generate_images (the CLI, the server, benchmarks/generation.py's sweep) passes every option, candidates too."""
    one, two = (generate_images(pipe, "six", 4, replace(pipe.options(num_inference_steps=3), prior_candidates=c), seed=1)
                for c in (1, 2))
    assert not torch.equal(one, two)
    assert torch.equal(two, pipe("six", num_images_per_prompt=4, num_inference_steps=3, generator=pipe.generator(seed=1),
                                 output_type="uint8", prior_candidates=2).images)


def test_generate_images_draws_with_the_options_it_is_given_every_field(pipe, monkeypatch):
    import unclip.api

    seen, draw = [], unclip.api.draw
    monkeypatch.setattr(unclip.api, "draw", lambda p, c, options, *a, **k: seen.append(options) or draw(p, c, options, *a, **k))
    options = replace(pipe.options(num_inference_steps=3), layout_temperature=0.3, layout_box_temperature=0.2)
    generate_images(pipe, "six", 2, options)
    assert seen == [options]


def test_variations_and_interpolation_draw_with_the_options_they_are_given(pipe, tiny_pipeline, monkeypatch, tmp_path):
    """t2i vary and interpolate resolve the settings once and hand the options over whole, as generate does."""
    import unclip.api
    from t2i.folders import interpolate_to_folder, vary_to_folder

    seen, decode = [], unclip.api.decode_and_upsample
    monkeypatch.setattr(unclip.api, "decode_and_upsample",
                        lambda p, e, options, *a, **k: seen.append(options) or decode(p, e, options, *a, **k))
    options = replace(pipe.options(num_inference_steps=2, guidance_scale=2.0), sampler="ddim")
    image = pipe("six", num_inference_steps=2, output_type="uint8").images[0]
    pipe.variations(image, 2, options=options)
    pipe.interpolate("six", "one", 2, options=options)
    assert seen == [options, options]
    seen.clear()
    source = tmp_path / "six.png"
    Image.fromarray(image[0].numpy()).save(source)
    vary_to_folder(source, 1, tiny_pipeline, tmp_path / "vary", {"steps": 2, "guidance": 2.0, "sampler": "ddim"})
    interpolate_to_folder("six", "one", 2, tiny_pipeline, tmp_path / "lerp", {"steps": 2, "guidance": 2.0,
                                                                             "sampler": "ddim"})
    assert [(o.steps, o.guidance, o.sampler) for o in seen] == [(2, 2.0, "ddim")] * 2


def test_callback_counts_every_denoising_step(pipe):
    seen = []
    pipe("three", num_images_per_prompt=3, num_inference_steps=4, generator=seeded(), batch_size=2,
         callback=lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    total = 2 * steps_per_image(pipe.pipeline, SamplingOptions(steps=4))
    assert [s for s, _, _ in seen] == list(range(1, total + 1)) and {t for _, t, _ in seen} == {total}
    assert seen[0][2] == (2, 1, 28, 28) and seen[-1][2] == (1, 1, 28, 28)


def test_negative_prompt_changes_the_guided_branches_only(pipe):
    base = dict(num_images_per_prompt=3, num_inference_steps=3, output_type="uint8")
    plain = pipe("seven", generator=seeded(), **base).images
    # Without guidance there is no unconditional branch to take the negative prompt: nothing changes, and it says so.
    with pytest.warns(SettingWarning, match="the negative prompt changes nothing at guidance 1"):
        unguided = pipe("seven", negative_prompt="one", prior_guidance_scale=1.0, generator=seeded(), **base).images
    assert torch.equal(unguided, pipe("seven", prior_guidance_scale=1.0, generator=seeded(), **base).images)
    assert torch.equal(pipe("seven", negative_prompt="  ", generator=seeded(), **base).images, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SettingWarning)  # guided: it changes something, and nothing is said
        steered = pipe("seven", negative_prompt="one", generator=seeded(), **base).images
    assert not torch.equal(steered, plain)
    both = pipe("seven", negative_prompt="one", guidance_scale=2.0, generator=seeded(), **base).images
    assert both.shape == plain.shape
    with pytest.raises(UserError, match="2 negative prompts for 1 prompts"):
        pipe("seven", negative_prompt=["one", "two"])


def test_image_to_image_strength_ends(pipe, tmp_path):
    images, _ = draw_glyphs(1, 3)
    Image.fromarray(images[0]).save(tmp_path / "three.png")
    source = pipe.image(tmp_path / "three.png", pipe.image_size)
    kept = pipe("eight", image=tmp_path / "three.png", strength=0.0, num_images_per_prompt=2, output_type="uint8").images
    assert torch.equal(kept, source.expand(2, -1, -1, -1))
    ignored = pipe("eight", image=source, strength=1.0, num_inference_steps=3, generator=seeded(), output_type="uint8").images
    assert torch.equal(ignored, pipe("eight", num_inference_steps=3, generator=seeded(), output_type="uint8").images)
    half = pipe("eight", image=source, strength=0.5, num_inference_steps=4, generator=seeded(), output_type="uint8").images
    assert half.shape == (1, 1, 28, 28) and not torch.equal(half, source[None])
    with pytest.raises(UserError, match="strength must be between 0 and 1"):
        pipe("eight", image=source, strength=1.5)
    with pytest.raises(UserError, match="image tensor must be uint8"):
        pipe("eight", image=source.float())


def test_variations_and_interpolation(pipe, tmp_path):
    images, _ = draw_glyphs(1, 5)
    source = Image.fromarray(images[0])
    var = pipe.variations(source, num_images=3, num_inference_steps=3, generator=seeded(), output_type="uint8").images
    assert var.shape == (3, 1, 28, 28)
    frames = pipe.interpolate("two", source, frames=4, num_inference_steps=3, generator=seeded()).images
    assert len(frames) == 4 and frames[0].size == (28, 28)
    with pytest.raises(UserError, match="frames must be at least 2"):
        pipe.interpolate("two", "three", frames=1)


def test_cli_negative_prompt_and_init_image(tiny_pipeline, tmp_path):
    images, _ = draw_glyphs(1, 3)
    Image.fromarray(images[0]).save(tmp_path / "three.png")
    common = ["generate", "--checkpoints", str(tiny_pipeline), "--prompt", "eight", "-n", "2", "--steps", "3"]
    r = runner.invoke(app, common + ["--init-image", str(tmp_path / "three.png"), "--strength", "0", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "0001.png")), images[0])
    r = runner.invoke(app, common + ["--negative-prompt", "one", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and (tmp_path / "b" / "grid.png").is_file()
    r = runner.invoke(app, common + ["--strength", "0.5"])
    assert r.exit_code == 1 and "--strength is for image-to-image" in r.output
    r = runner.invoke(app, common + ["--init-image", str(tmp_path / "none.png"), "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "image not found" in r.output and not (tmp_path / "c").exists()
