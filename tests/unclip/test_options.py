"""One door for sampling settings (unclip/options.py): keywords and aliases onto one SamplingOptions, checked in
one place, errors naming the setting; the CLI names its flag instead."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from unclip.errors import UserError
from unclip.options import ALIASES, FIELDS, SamplingOptions, sampling_options, validate


def test_keywords_and_their_aliases_set_the_same_field():
    base = SamplingOptions()
    assert sampling_options(base, steps=4) == sampling_options(base, num_inference_steps=4) != base
    for alias, name in ALIASES.items():
        value = 0.25 if name != "steps" else 3
        assert getattr(sampling_options(base, **{alias: value}), name) == value
    assert sampling_options(base, steps=None) == base  # None keeps the base's value


def test_unknown_conflicting_and_out_of_range_settings_are_one_line_naming_the_setting():
    base = SamplingOptions()
    with pytest.raises(UserError, match="unknown sampling setting 'stepz'") as e:
        sampling_options(base, stepz=3)
    assert e.value.param == "stepz"
    with pytest.raises(UserError, match="num_inference_steps and steps both given") as e:
        sampling_options(base, steps=3, num_inference_steps=4)
    cases = {"steps": 0, "upsampler_steps": 2.5, "prior_candidates": True, "guidance": math.nan,
             "prior_guidance": math.inf, "text_guidance": -1.0, "layout_temperature": -0.1, "strength": 1.5,
             "upsampler_strength": -0.5, "sampler": "euler"}
    for name, value in cases.items():
        with pytest.raises(UserError) as e:
            sampling_options(base, **{name: value})
        assert e.value.param == name and name in str(e.value) and "--" not in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)


def test_every_field_is_checked_or_has_a_checked_type():
    """validate knows every field: a setting added to SamplingOptions without a check here fails this test."""
    bad = {"sampler": "nope", "steps": -1, "guidance": -1.0, "text_guidance": -1.0, "prior_guidance": -1.0,
           "prior_candidates": 0, "layout_temperature": -1.0, "layout_box_temperature": -1.0, "upsampler_steps": 0,
           "upsampler_strength": 2.0, "strength": 2.0}
    assert set(bad) == set(FIELDS) == {f.name for f in fields(SamplingOptions)}
    for name, value in bad.items():
        with pytest.raises(UserError):
            validate(SamplingOptions(**{name: value}))


def test_the_api_takes_options_whole_with_keywords_on_top(tiny_pipeline):
    from unclip.api import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline, "cpu")
    options = pipe.options(steps=3, prior_guidance=2.0)
    assert (options.steps, options.prior_guidance) == (3, 2.0)
    assert pipe.options(options, guidance=2.0) == SamplingOptions(**{**options.__dict__, "guidance": 2.0})
    draw = lambda **k: pipe("six", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),  # noqa: E731
                            output_type="uint8", **k).images
    assert torch.equal(draw(options=options), draw(steps=3, prior_guidance=2.0))
    assert torch.equal(draw(options=options), draw(num_inference_steps=3, prior_guidance_scale=2.0))
    with pytest.raises(UserError, match="steps 60 is more than the 50 diffusion steps") as e:
        pipe("six", steps=60)
    assert e.value.param == "steps"


def test_the_cli_names_the_flag_where_the_library_names_the_parameter():
    from t2i.cli import flag, user_error

    assert user_error(UserError("steps must be at least 1 (a whole number), got 0", param="steps")) == \
        "--steps must be at least 1 (a whole number), got 0"
    assert user_error(UserError("unknown device 'tpu': use auto, cpu, cuda", param="device")) == \
        "unknown --device 'tpu': use auto, cpu, cuda"
    assert user_error(UserError("no CUDA GPU here", param="device")) == "--device: no CUDA GPU here"  # unnamed: in front
    assert user_error(UserError("no such file")) == "no such file"
    assert flag("layout_box_temperature") == "--layout-box-temperature" and flag("name_or_path") == "--checkpoints"


def test_every_sampling_flag_of_the_cli_is_a_field(monkeypatch, tmp_path):
    """generate's flags reach the library as SamplingOptions' own names (none is lost or renamed on the way)."""
    import t2i.folders
    from typer.testing import CliRunner

    from t2i.cli import app

    seen = {}
    monkeypatch.setattr(t2i.folders, "generate_to_folder", lambda prompt, n, ckpt, out, settings, *a, **k:
                        seen.update(settings) or tmp_path)
    flags = ["--sampler", "ddim", "--steps", "3", "--guidance", "2", "--text-guidance", "3", "--prior-guidance", "4",
             "--upsampler-steps", "5", "--upsampler-strength", "0.5", "--layout-temperature", "0.3",
             "--box-temperature", "0.2", "--strength", "0.7", "--init-image", str(tmp_path / "x.png")]
    r = CliRunner().invoke(app, ["generate", "--prompt", "six", *flags])
    assert r.exit_code == 0, r.output
    assert seen == {"sampler": "ddim", "steps": 3, "guidance": 2.0, "text_guidance": 3.0, "prior_guidance": 4.0,
                    "upsampler_steps": 5, "upsampler_strength": 0.5, "layout_temperature": 0.3,
                    "layout_box_temperature": 0.2, "strength": 0.7}
    assert set(seen) < set(FIELDS) | set(ALIASES)
