"""Sampling settings: one `SamplingOptions`, one way in (`sampling_options`), one validation (`validate`).

The Python API's keywords, the CLI's flags, the web app's fields and the benchmarks all become a SamplingOptions
here; a pipeline folder's `sampling.yaml` sets its own defaults. A knob has one name, its field's; `ALIASES` keeps
the diffusers-style keywords (`num_inference_steps=`) and older names working as other spellings of it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from unclip.checkpoint import SAMPLING_FILE
from unclip.config import load_yaml, merge
from unclip.diffusion.sampling import SAMPLERS
from unclip.errors import ConfigError, UserError




@dataclass
class SamplingOptions:
    """Sampling settings; the library's defaults were chosen with benchmarks/generation.py on MNIST
    (docs/results/generation.md): prior guidance 1.5 trims the prior's rare off-class embeddings (accuracy
    0.978 -> 0.995) and even lowers the Frechet distance, where decoder guidance or best-of-N candidates cost more
    for less; DPM-Solver++ at 10 steps is as good as 1000-step DDPM. Shipped pipelines override some of them in
    their sampling.yaml (scenes: its distilled decoder's guidance, the layout temperatures)."""

    sampler: str = "dpmpp"  # a name in unclip.diffusion.sampling.SAMPLERS
    steps: int = 10  # the prior's and decoder's sampling steps (distilled stages keep their own)
    guidance: float = 1.0  # decoder classifier-free guidance scale (1 = none)
    # decoders that read the caption: the scale from the image embedding alone to it with the caption, `guidance`
    # then scaling only the image embedding's part (InstructPix2Pix's two scales); None: one scale, `guidance`
    text_guidance: Optional[float] = None
    prior_guidance: float = 1.5
    prior_candidates: int = 1  # draws per caption, the one closest to the text embedding kept (DALL-E 2)
    # pipelines with a layout stage: its sampling temperature (1 draws from what it learnt; lower keeps to the
    # likelier layouts: on scenes 0.5 drew the prompts' relations and colours right more often)
    layout_temperature: float = 1.0
    layout_box_temperature: Optional[float] = None  # the boxes' corners' own temperature (None: layout_temperature)
    upsampler_steps: int = 10  # when the pipeline has an upsampler
    # how far the upsampler noises the base image, enlarged, before refining it (SDEdit): 1 draws from pure noise
    upsampler_strength: float = 1.0
    strength: float = 0.8  # image-to-image (SDEdit): how far an init image is noised, 0 (kept) to 1 (ignored)


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingOptions))
# Other spellings of a field: diffusers' keywords, and the CLI's shorter --box-temperature.
ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "prior_guidance_scale": "prior_guidance",
           "text_guidance_scale": "text_guidance", "box_temperature": "layout_box_temperature"}
GUIDANCE_KEYS = {"prior": "prior_guidance", "decoder": "guidance"}  # each guided stage's scale in SamplingOptions


def canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` by their fields' names (aliases resolved), those left None dropped; an unknown name is a UserError."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise UserError(f"unknown sampling setting {key!r}: the settings are {', '.join(FIELDS)}", param=key)
        if name in out and value is not None and out[name] != value:
            raise UserError(f"{key} and {name} both given, with different values", param=name)
        if value is not None:
            out[name] = value
    return out


def sampling_options(base: SamplingOptions, **settings: Any) -> SamplingOptions:
    """`base` (a pipeline's defaults) with `settings` (field names or ALIASES; None: keep the base's), validated."""
    return validate(replace(base, **canonical(settings)))


def validate(options: SamplingOptions) -> SamplingOptions:
    """`options` if every setting is in range, else a UserError naming the setting (the one place they are checked;
    a pipeline adds what depends on its stages: UnCLIPPipeline.check)."""
    if options.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {options.sampler!r}: use one of {', '.join(SAMPLERS)}", param="sampler")
    for name in ("steps", "upsampler_steps", "prior_candidates"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be at least 1 (a whole number), got {value!r}", param=name)
    for name in ("guidance", "text_guidance", "prior_guidance", "layout_temperature", "layout_box_temperature"):
        value = getattr(options, name)
        if value is None and name in ("text_guidance", "layout_box_temperature"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{name} must be a finite number >= 0, got {value!r}", param=name)
    for name in ("strength", "upsampler_strength"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {value!r}", param=name)
    return options


def load_sampling(folder: Path) -> SamplingOptions:
    """The sampling defaults of a pipeline folder: SamplingOptions with what its sampling.yaml sets, strictly (an
    unknown key or a wrong type is a one-line error); the library's defaults where it has none."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return SamplingOptions()
    try:
        return validate(merge(SamplingOptions(), load_yaml(path) or {}))
    except UserError as e:
        raise ConfigError(f"{path}: {e}") from None
