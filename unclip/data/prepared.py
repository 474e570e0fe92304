"""`t2i prepare`: a captioned source decoded once into a memory-mapped uint8 file; `--data prepared:FILE`.

FILE holds the images as raw uint8 (N, C, S, S); FILE.json beside it says N, C, S, the source, what was
skipped and each image's captions. Training reads only the rows of each batch (the operating system pages
them in and out), so a prepared source larger than memory trains in bounded memory, and a batch costs a copy,
not a JPEG decode. The JSON is written last, so a FILE without it is an unfinished preparation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from unclip.checkpoint import atomic_write_text
from unclip.errors import UserError

FORMAT = "t2i-prepared-1"


def convert(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 images (B, c, h, w) -> uint8 (B, channels, size, size): grey to RGB by repeating, RGB to grey by the
    mean, resized bilinearly (antialiased)."""
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).round().byte()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).byte()
    return x.contiguous()


class MappedImages:
    """Rows `index` of a memory-mapped uint8 array (N, C, S, S), read on demand and converted to `channels` x
    `size`: what `CaptionedImages.images` holds for a prepared source (it indexes like a tensor)."""

    def __init__(self, array: np.ndarray, channels: int, size: int, index: Optional[torch.Tensor] = None):
        self.array, self.channels, self.size = array, channels, size
        self.index = torch.arange(len(array)) if index is None else index

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: torch.Tensor) -> "MappedImages":
        return MappedImages(self.array, self.channels, self.size, self.index[idx])

    def __getitem__(self, key) -> torch.Tensor:
        rows = self.index[key].reshape(-1).numpy()
        order = np.argsort(rows, kind="stable")  # read the file forwards
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return convert(torch.from_numpy(out), self.channels, self.size)


def prepare(source, spec: str, out: Path, workers: int = 2, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Decode `source` (unclip.data.sources) into OUT and OUT.json; returns what the JSON holds but the captions."""
    from unclip.data.sources import decode_source

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    captions: list[list[str]] = []
    try:
        with open(tmp, "wb") as f:
            for images, caps in decode_source(source, workers, progress=progress):
                f.write(images.numpy().tobytes())
                captions += caps
        if not captions:
            raise UserError(f"{spec}: no usable image (skipped: {source.skips})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": FORMAT, "source": spec, "count": len(captions), "channels": source.channels,
            "size": source.size, "skipped": source.skips}
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps({**meta, "captions": captions}))
    return meta


def load_prepared(path: Path, channels: int, size: int):
    """A prepared file as `CaptionedImages` whose images stay on disk until a batch reads them."""
    from unclip.data import CaptionedImages
    from unclip.data.captions import TextCaptions

    path = Path(path)
    try:
        meta = json.loads(path.with_name(path.name + ".json").read_text())
    except FileNotFoundError:
        raise UserError(f"prepared:{path}: no {path.name}.json beside it (make it with t2i prepare)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"prepared:{path}: {path.name}.json does not parse ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"prepared:{path}: not a file t2i prepare wrote")
    shape = (meta["count"], meta["channels"], meta["size"], meta["size"])
    if not path.is_file() or path.stat().st_size != int(np.prod(shape)):
        raise UserError(f"prepared:{path}: the file does not hold the {shape} images its JSON names; prepare it again")
    array = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
    return CaptionedImages(images=MappedImages(array, channels, size), labels=torch.arange(meta["count"]),
                           captioner=TextCaptions(meta["captions"]))
