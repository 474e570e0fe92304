"""`t2i generate` as a library call: validate the request, sample batch by batch, write the files."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from unclip.diffusion.sampling import SAMPLERS
from unclip.errors import UserError
from unclip.images import grid, save_gif, save_numbered, save_png
from unclip.pipeline import Pipeline, SamplingOptions, embed_prompt_or_image, generate, interpolate, steps_per_image, vary
from unclip.zeroshot import load_images

GRID_MAX = 1024  # images on the contact sheet; every sample is written as its own PNG regardless
GIF_FRAMES = 60


def slug(prompt: str) -> str:
    s = re.sub(r"[^\w]+", "-", prompt.lower(), flags=re.UNICODE).strip("-")
    return s[:60] or "prompt"


def check_request(prompt: str, num_samples: int, options: SamplingOptions) -> None:
    if not prompt.strip():
        raise UserError("--prompt is empty: say what to draw, e.g. --prompt six")
    check_count(num_samples)
    check_options(options)


def check_count(num_samples: int) -> None:
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")


def check_options(options: SamplingOptions) -> None:
    if options.sampler not in SAMPLERS:
        raise UserError(f"unknown --sampler {options.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if options.steps < 1 or options.upsampler_steps < 1:
        raise UserError(f"--steps and --upsampler-steps must be at least 1, got {options.steps} and {options.upsampler_steps}")
    if options.guidance < 0 or options.prior_guidance < 0:
        raise UserError("--guidance and --prior-guidance must be >= 0 (1 means no guidance)")


def writable_folder(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"the output folder {out} is not writable; pass another with --out")
    return out


def load_for_sampling(checkpoints: str | Path, device: str, options: SamplingOptions) -> Pipeline:
    pipe = Pipeline.load(checkpoints, device)
    for stage, diffusion in (("prior", pipe.prior), ("decoder", pipe.decoder)):
        if options.steps > len(diffusion.ac):
            raise UserError(f"--steps {options.steps} is more than the {len(diffusion.ac)} diffusion steps of the {stage}")
    if pipe.upsampler is not None and options.upsampler_steps > len(pipe.upsampler.ac):
        raise UserError(f"--upsampler-steps {options.upsampler_steps} is more than the upsampler's {len(pipe.upsampler.ac)} diffusion steps")
    return pipe


def generate_to_folder(prompt: str, num_samples: int, checkpoints: str | Path, out: Optional[Path], options: SamplingOptions,
                       seed: int = 0, batch_size: int = 64, device: str = "auto", animate: bool = False,
                       progress: Optional[Callable[[int], Callable[[], None]]] = None) -> Path:
    """Write OUT/0000.png ... , OUT/grid.png (and OUT/denoise.gif); return OUT.

    `progress(total_steps)` may return a function called after every sampling step.
    """
    check_request(prompt, num_samples, options)
    pipe = load_for_sampling(checkpoints, device, options)
    out = writable_folder(Path(out) if out else Path("outputs") / slug(prompt))
    on_step = progress(steps_per_image(pipe, options) * -(-num_samples // batch_size)) if progress else None
    kept: list[torch.Tensor] = []

    def on_batch(start: int, images: torch.Tensor) -> None:
        save_numbered(images, out, start)
        if sum(len(k) for k in kept) < GRID_MAX:
            kept.append(images)

    chain = generate(pipe, prompt, num_samples, options, seed, batch_size, on_step, on_batch, record_chain=animate)
    sheet = torch.cat(kept)[:GRID_MAX]
    save_png(grid(sheet), out / "grid.png", scale=2)
    if animate:
        stride = max(1, len(chain) // GIF_FRAMES)
        frames = chain[::stride] if (len(chain) - 1) % stride == 0 else chain[::stride] + chain[-1:]
        save_gif([grid(f) for f in frames], out / "denoise.gif", scale=2)
    return out


def vary_to_folder(image: Path, num_samples: int, checkpoints: str | Path, out: Optional[Path], options: SamplingOptions,
                   seed: int = 0, device: str = "auto", batch_size: int = 64,
                   progress: Optional[Callable[[int], Callable[[], None]]] = None) -> Path:
    """Write variations of `image` as OUT/0000.png ... and OUT/grid.png (the source first)."""
    check_count(num_samples)
    check_options(options)
    pipe = load_for_sampling(checkpoints, device, options)
    m = pipe.clip_config.model
    source = load_images([Path(image)], m.image_channels, m.image_size)[0]
    out = writable_folder(Path(out) if out else Path("outputs") / f"vary-{slug(Path(image).stem)}")
    on_step = progress(steps_per_image(pipe, options) * -(-num_samples // batch_size)) if progress else None
    images = vary(pipe, source, num_samples, options, seed, batch_size, on_step)
    save_numbered(images, out)
    shown = load_images([Path(image)], m.image_channels, pipe.image_size)  # the source beside them, at their size
    save_png(grid(torch.cat([shown, images])[:GRID_MAX]), out / "grid.png", scale=2)
    return out


def interpolate_to_folder(source: str, target: str, frames: int, checkpoints: str | Path, out: Optional[Path],
                          options: SamplingOptions, seed: int = 0, device: str = "auto",
                          progress: Optional[Callable[[int], Callable[[], None]]] = None) -> Path:
    """Write OUT/0000.png ... (in order from `source` to `target`), OUT/strip.png and OUT/interpolation.gif."""
    if frames < 2:
        raise UserError(f"--frames must be at least 2, got {frames}")
    check_options(options)
    pipe = load_for_sampling(checkpoints, device, options)
    out = writable_folder(Path(out) if out else Path("outputs") / f"{slug(Path(source).stem)}-to-{slug(Path(target).stem)}")
    a = embed_prompt_or_image(pipe, source, options, seed)
    b = embed_prompt_or_image(pipe, target, options, seed + 1)
    images = interpolate(pipe, a, b, frames, options, seed, progress(steps_per_image(pipe, options)) if progress else None)
    save_numbered(images, out)
    save_png(grid(images, ncol=frames), out / "strip.png", scale=2)
    save_gif(list(images), out / "interpolation.gif", scale=4, ms_per_frame=150)
    return out
