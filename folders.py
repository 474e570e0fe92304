"""The CLI's side of `t2i generate`, `vary` and `interpolate`: the Python API's images written to a folder (numbered
PNGs, a contact sheet, an animation), batch by batch. The library draws; this module only writes."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from unclip.api import BATCH_SIZE, UnCLIPPipeline, check_count
from unclip.errors import UserError
from unclip.images import contact_sheet, grid, resize, save_gif, save_numbered, save_png, to_uint8
from unclip.options import SamplingOptions
from unclip.pipeline import steps_per_image

GIF_FRAMES = 60
LARGE_RUN = 1000  # a generate run larger than this says its size and where it writes before it starts
log = logging.getLogger(__name__)


def size_words(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"
Progress = Optional[Callable[[int], Callable[[], None]]]  # progress(total_steps) -> advance()


def slug(prompt: str) -> str:
    s = re.sub(r"[^\w]+", "-", prompt.lower(), flags=re.UNICODE).strip("-")
    return s[:60] or "prompt"


def writable_folder(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}", param="out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"the output folder {out} is not writable; pass another", param="out")
    return out


def advance(progress: Progress, total: int):
    """The API's `callback(step, total, x0)` driving a progress bar of `total` steps."""
    if progress is None:
        return None
    tick = progress(total)
    return lambda step, total, x0: tick()


def generate_images(pipe: UnCLIPPipeline, prompt: str, num_samples: int, options: SamplingOptions, seed: int = 0,
                    batch_size: int = BATCH_SIZE, negative_prompt: Optional[str] = None, init_image=None,
                    on_batch: Optional[Callable[[int, torch.Tensor], None]] = None, callback=None) -> torch.Tensor:
    """`num_samples` uint8 images of `prompt`, batch by batch from one generator seeded with `seed`: what
    `t2i generate` and the server's /api/generate draw. `on_batch(first_index, images)` sees each batch."""
    check_count(num_samples, batch_size)
    generator = pipe.generator(seed=seed)
    out = []
    for start in range(0, num_samples, batch_size):
        images = pipe(prompt, negative_prompt, min(batch_size, num_samples - start), generator=generator,
                      output_type="uint8", callback=callback, image=init_image, batch_size=batch_size,
                      options=options).images
        if on_batch:
            on_batch(start, images)
        out.append(images)
    return torch.cat(out)


def generate_to_folder(prompt: str, num_samples: int, checkpoints: str | Path, out: Optional[Path], settings: dict,
                       seed: int = 0, batch_size: int = BATCH_SIZE, device: str = "auto", animate: bool = False,
                       progress: Progress = None, negative_prompt: Optional[str] = None,
                       init_image: Optional[Path] = None) -> Path:
    """Write OUT/0000.png ... , OUT/grid.png (and OUT/denoise.gif of the first batch's chain); return OUT."""
    if not prompt.strip():
        raise UserError("the prompt is empty: say what to draw, e.g. six", param="prompt")
    check_count(num_samples, batch_size)
    pipe = UnCLIPPipeline.from_pretrained(checkpoints, device)
    options = pipe.options(**settings)
    if init_image is not None:  # read once, at the output size; a bad file fails before anything is written
        init_image = pipe.image(init_image, pipe.image_size)
    out = writable_folder(Path(out) if out else Path("outputs") / slug(prompt))
    if num_samples > LARGE_RUN:  # say what is coming before minutes of it
        side, channels = pipe.image_size, pipe.pipeline.image_channels
        log.info("drawing %s images of %dx%d into %s/ (%s of pixels before PNG compression); Ctrl-C stops, what is "
                 "written stays", f"{num_samples:,}", side, side, out, size_words(num_samples * channels * side * side))
    strength = options.strength if init_image is not None else 1.0
    batches = -(-num_samples // batch_size)
    tick = advance(progress, steps_per_image(pipe.pipeline, options, strength) * batches)
    chain: list[torch.Tensor] = []
    first = [True]

    def callback(step, total, x0):
        if tick:
            tick(step, total, x0)
        if animate and first[0]:  # the first batch's chain, at the output size
            chain.append(to_uint8(resize(pipe.pipeline.pixels(x0), pipe.image_size)))

    def on_batch(start, images):
        save_numbered(images, out, start)
        first[0] = False

    sheet = generate_images(pipe, prompt, num_samples, options, seed, batch_size, negative_prompt, init_image,
                            on_batch, callback)
    save_png(contact_sheet(sheet), out / "grid.png", scale=2)
    if animate:
        stride = max(1, len(chain) // GIF_FRAMES)
        frames = chain[::stride] if (len(chain) - 1) % stride == 0 else chain[::stride] + chain[-1:]
        save_gif([grid(f) for f in frames], out / "denoise.gif", scale=2)
    return out


def vary_to_folder(image: Path, num_samples: int, checkpoints: str | Path, out: Optional[Path], settings: dict,
                   seed: int = 0, device: str = "auto", batch_size: int = BATCH_SIZE, progress: Progress = None) -> Path:
    """Write variations of `image` as OUT/0000.png ..., their contact sheet OUT/grid.png (as many cells as variations)
    and the source beside them at their size, OUT/source.png."""
    check_count(num_samples, batch_size)
    pipe = UnCLIPPipeline.from_pretrained(checkpoints, device)
    options = pipe.options(**settings)
    source = pipe.image(image)
    out = writable_folder(Path(out) if out else Path("outputs") / f"vary-{slug(Path(image).stem)}")
    total = steps_per_image(pipe.pipeline, options) * -(-num_samples // batch_size)
    images = pipe.variations(source, num_samples, generator=pipe.generator(seed=seed), output_type="uint8",
                             callback=advance(progress, total), batch_size=batch_size, options=options).images
    save_numbered(images, out)
    save_png(contact_sheet(images), out / "grid.png", scale=2)
    save_png(pipe.image(image, pipe.image_size), out / "source.png", scale=2)  # what they vary, at their size
    return out


def interpolate_to_folder(source: str, target: str, frames: int, checkpoints: str | Path, out: Optional[Path],
                          settings: dict, seed: int = 0, device: str = "auto", progress: Progress = None) -> Path:
    """Write OUT/0000.png ... (in order from `source` to `target`), OUT/strip.png and OUT/interpolation.gif."""
    if frames < 2:
        raise UserError(f"frames must be at least 2, got {frames}", param="frames")
    pipe = UnCLIPPipeline.from_pretrained(checkpoints, device)
    options = pipe.options(**settings)
    out = writable_folder(Path(out) if out else Path("outputs") / f"{slug(Path(source).stem)}-to-{slug(Path(target).stem)}")
    images = pipe.interpolate(source, target, frames, generator=pipe.generator(seed=seed), output_type="uint8",
                              callback=advance(progress, steps_per_image(pipe.pipeline, options)), options=options).images
    save_numbered(images, out)
    save_png(grid(images, ncol=frames), out / "strip.png", scale=2)
    save_gif(list(images), out / "interpolation.gif", scale=4, ms_per_frame=150)
    return out
