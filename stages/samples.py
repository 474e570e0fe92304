"""What a diffusion stage shows while it trains, shared by the prior, the decoder and the upsampler.

A sheet is one column per fixed prompt (or validation image): optional reference rows (the originals), then
the chain's x0 prediction after sampling iterations 1, 5, 10, 15 and 20 (those the chain has before its last),
then the final sample, drawn with the library's default sampling options and the same seed every time. Sheets go to
`OUT/samples/sheet_<step>.png`; at the end of the stage, `progress.gif` shows the first column's final sample
across every sheet of the run, so one sees the model learn.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from unclip.components.clip import encode_images
from unclip.data import CaptionedImages
from unclip.images import grid, save_gif, save_png

if TYPE_CHECKING:
    from t2i.stages.frozen_clip import FrozenClip

ITERATIONS = (1, 5, 10, 15, 20)
SCALE, PAD = 2, 2
CELL_KEY = "t2i-cell"  # PNG text chunk: the sheet's cell size in pixels, so the GIF can cut the first column


def chain_recorder(steps: int):
    """A sampler callback keeping the x0 predictions of ITERATIONS shorter than the chain; returns (callback, shots)."""
    keep = {i - 1 for i in ITERATIONS if i < steps}
    shots: list[torch.Tensor] = []

    def callback(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i in keep:
            shots.append(x0)

    return callback, shots


def save_sheet(rows: list[torch.Tensor], out: Path, step: int) -> torch.Tensor:
    """Rows of uint8 images (B, C, H, W), the final samples last -> OUT/samples/sheet_<step>.png; returns the sheet."""
    sheet = grid(torch.cat(rows), ncol=rows[0].shape[0], pad=PAD)
    size = rows[-1].shape[-1]
    save_png(sheet, Path(out) / "samples" / f"sheet_{step:07d}.png", scale=SCALE, text={CELL_KEY: str(size)})
    return sheet


def first_final(path: Path) -> Optional[Image.Image]:
    """The final sample of a sheet's first column (its bottom-left cell), or None for a sheet without the size."""
    with Image.open(path) as sheet:
        size = sheet.text.get(CELL_KEY) if hasattr(sheet, "text") else None
        if size is None:
            return None
        cell, pad = int(size) * SCALE, PAD * SCALE
        return sheet.crop((pad, sheet.height - pad - cell, pad + cell, sheet.height - pad)).convert("RGB")


def save_progress_gif(out: Path) -> Optional[Path]:
    """OUT/samples/progress.gif: the first prompt's final sample at every saved step, the step written under it."""
    frames = []
    for path in sorted((Path(out) / "samples").glob("sheet_*.png")):
        cell = first_final(path)
        if cell is None:
            continue
        frame = Image.new("RGB", (max(cell.width, 64), cell.height + 14))
        frame.paste(cell, ((frame.width - cell.width) // 2, 0))
        ImageDraw.Draw(frame).text((2, cell.height + 2), f"step {int(path.stem.split('_')[1])}", fill=(255, 255, 255))
        frames.append(torch.from_numpy(np.array(frame)).permute(2, 0, 1))
    if not frames:
        return None
    path = Path(out) / "samples" / "progress.gif"
    save_gif(frames, path, ms_per_frame=400, hold_last=3)
    return path


def gallery(frozen: "FrozenClip") -> tuple[CaptionedImages, torch.Tensor]:
    """Images with their embeddings, to show the image nearest an embedding: the training images in memory,
    else (a stream) the validation images."""
    if frozen.image_emb is not None:
        return frozen.data, frozen.image_emb
    return frozen.val, encode_images(frozen.clip, frozen.val.images)


def fixed_captions(frozen: "FrozenClip", n: int = 10) -> Optional[list[str]]:
    """Prompts for sample grids: the class names, or the first distinct validation captions."""
    names = frozen.data.class_names
    if names:
        return names[:n]
    captions = frozen.val.captions(torch.arange(min(4 * n, len(frozen.val))), seed=0)
    return list(dict.fromkeys(captions))[:n]
