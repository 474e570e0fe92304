"""`t2i generate` as a library call: validate the request, sample batch by batch, write the files."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from unclip.diffusion.sampling import SAMPLERS
from unclip.errors import UserError
from unclip.images import grid, save_gif, save_png
from unclip.pipeline import Pipeline, SamplingOptions, generate

GRID_MAX = 1024  # images on the contact sheet; every sample is written as its own PNG regardless
GIF_FRAMES = 60


def slug(prompt: str) -> str:
    s = re.sub(r"[^\w]+", "-", prompt.lower(), flags=re.UNICODE).strip("-")
    return s[:60] or "prompt"


def check_request(prompt: str, num_samples: int, options: SamplingOptions) -> None:
    if not prompt.strip():
        raise UserError("--prompt is empty: say what to draw, e.g. --prompt six")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if options.sampler not in SAMPLERS:
        raise UserError(f"unknown --sampler {options.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if options.steps < 1:
        raise UserError(f"--steps must be at least 1, got {options.steps}")
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


def generate_to_folder(prompt: str, num_samples: int, checkpoints: Path, out: Optional[Path], options: SamplingOptions,
                       seed: int = 0, batch_size: int = 64, device: str = "auto", animate: bool = False,
                       progress: Optional[Callable[[int], Callable[[], None]]] = None) -> Path:
    """Write OUT/0000.png ... , OUT/grid.png (and OUT/denoise.gif); return OUT.

    `progress(total_steps)` may return a function called after every sampling step.
    """
    check_request(prompt, num_samples, options)
    pipe = Pipeline.load(checkpoints, device)
    if options.steps > len(pipe.decoder.ac):
        raise UserError(f"--steps {options.steps} is more than the {len(pipe.decoder.ac)} diffusion steps of the model")
    out = writable_folder(Path(out) if out else Path("outputs") / slug(prompt))
    steps = len(pipe.decoder.ac) if options.sampler == "ddpm" else options.steps
    on_step = progress(steps * -(-num_samples // batch_size)) if progress else None
    kept: list[torch.Tensor] = []

    def on_batch(start: int, images: torch.Tensor) -> None:
        for i, image in enumerate(images):
            save_png(image, out / f"{start + i:04d}.png")
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
