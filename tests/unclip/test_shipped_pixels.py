"""The shipped pipelines draw the same pixels for the same seed, whatever the code around them becomes.

The references in tests/golden/ were drawn by the code these pipelines were trained and measured with; a
refactoring that changes one pixel of them by more than one level (float rounding across CPUs) fails here.
`T2I_WRITE_GOLDEN=1 pytest tests/unclip/test_shipped_pixels.py` draws them anew, for a change that means to.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.api import UnCLIPPipeline
from unclip.checkpoint import shipped_pipelines
from unclip.images import grid, to_pil

GOLDEN = Path(__file__).with_name("golden")
PROMPTS = {"mnist": "six", "fashion": "a sneaker", "scenes": "a red 3 to the left of a blue 7",
           "emoji": "red apple, twemoji style"}
CASES = [(name, mode) for name in PROMPTS for mode in ("generate", "vary", "interpolate")]


def draw(pipe: UnCLIPPipeline, name: str, mode: str) -> torch.Tensor:
    """uint8 (B, C, H, W): two images of the pipeline's prompt, two variations of the first, or a 3-frame arc."""
    generator = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    first = pipe(PROMPTS[name], num_images_per_prompt=2, generator=generator(), output_type="uint8").images
    if mode == "generate":
        return first
    if mode == "vary":
        return pipe.variations(first[0], 2, generator=generator(), output_type="uint8").images
    return pipe.interpolate(PROMPTS[name], first[1], 3, generator=generator(), output_type="uint8").images


@pytest.fixture(scope="module")
def pipelines():
    return {}


@pytest.mark.parametrize("name,mode", CASES)
def test_shipped_pipeline_draws_the_pixels_it_drew_before(pipelines, name, mode):
    if name not in shipped_pipelines():
        pytest.skip(f"the shipped pipeline {name} is not installed")
    if name not in pipelines:
        pipelines[name] = UnCLIPPipeline.from_pretrained(name, "cpu")
    images = draw(pipelines[name], name, mode)
    path = GOLDEN / f"{name}-{mode}.png"
    sheet = np.asarray(to_pil(grid(images, pad=0)))
    if os.environ.get("T2I_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        Image.fromarray(sheet).save(path)
    reference = np.asarray(Image.open(path))
    assert reference.shape == sheet.shape
    diff = np.abs(reference.astype(int) - sheet.astype(int))
    assert diff.max() <= 1, f"{name} {mode}: {int((diff > 1).sum())} values differ by more than one level (max {diff.max()})"
