"""Images in and out: [-1, 1] tensors to uint8, PNG files, contact sheets and GIFs (PIL only)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unclip.checkpoint import atomic_write


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1] (the inverse of `to_uint8`)."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, C, h, w) to size x size, bilinear (antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size, align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Float images (B, C, H, W) blurred by a Gaussian of `sigma` px, separably, reflecting at the borders
    (as torchvision's gaussian_blur, without importing torchvision: 1.2 s of every `t2i generate`)."""
    radius = int(3 * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    w = w / w.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), w.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), w.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


GRID_MAX = 1024  # images on a contact sheet; every sample is written as its own PNG regardless


def contact_sheet(images: torch.Tensor, ncol: Optional[int] = None) -> torch.Tensor:
    """The grid.png of a run: its first GRID_MAX images (uint8 (B, C, H, W)) on one sheet."""
    return grid(images[:GRID_MAX], ncol)


def grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 (B, C, H, W) -> one uint8 (C, H', W') contact sheet, `ncol` images a row."""
    B, C, H, W = images.shape
    ncol = ncol or math.ceil(math.sqrt(B))
    nrow = math.ceil(B / ncol)
    sheet = torch.zeros(C, nrow * (H + pad) + pad, ncol * (W + pad) + pad, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        sheet[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    return sheet


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """uint8 (C, H, W) -> PIL image, enlarged `scale` times with nearest neighbours."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST) if scale > 1 else pil


def save_png(image: torch.Tensor, path: Path, scale: int = 1, text: Optional[dict[str, str]] = None) -> None:
    """uint8 (C, H, W) -> a PNG file, with `text` as tEXt chunks (PIL reads them back as `Image.text`)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    atomic_write(Path(path), lambda tmp: to_pil(image, scale).save(tmp, format="PNG", pnginfo=info))


def save_numbered(images: torch.Tensor, out: Path, start: int = 0) -> None:
    """uint8 (B, C, H, W) -> OUT/0000.png, OUT/0001.png, ... numbered from `start`, at native resolution."""
    for i, image in enumerate(images):
        save_png(image, Path(out) / f"{start + i:04d}.png")


def save_gif(frames: list[torch.Tensor], path: Path, scale: int = 1, ms_per_frame: int = 80, hold_last: int = 10) -> None:
    """uint8 (C, H, W) frames -> looping GIF; the last frame is held a little."""
    pils = [to_pil(f, scale) for f in frames] + [to_pil(frames[-1], scale)] * hold_last
    atomic_write(Path(path), lambda tmp: pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:],
                                                     duration=ms_per_frame, loop=0))
