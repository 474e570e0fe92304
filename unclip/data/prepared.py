"""`t2i prepare`: a captioned source decoded once into a uint8 file on disk; `--data prepared:FILE`.

FILE holds the images as raw uint8 (N, C, S, S); FILE.json beside it says N, C, S, the source, what was
skipped and each image's captions. Training reads only the rows of each batch (the operating system caches
them), so a prepared source larger than memory trains in bounded memory, and a batch costs a read, not a
JPEG decode. The JSON is written last, so a FILE without it is an unfinished preparation.
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


class StoredImages:
    """Rows `index` of a prepared file of uint8 images (N, C, S, S), read on demand and converted to `channels` x
    `size`: what `CaptionedImages.images` holds for a prepared source (it indexes like a tensor).

    Rows are read with `os.pread`, not through a memory map: a map counts every page it has touched (and the
    kernel's read-ahead around it) in the process's RSS, which over an epoch grows to the file's size; reads
    by offset leave the same pages in the operating system's cache, shared and reclaimable, and keep the
    process at a batch."""

    def __init__(self, path: Path, count: int, stored: tuple[int, int], channels: int, size: int,
                 index: Optional[torch.Tensor] = None):
        self.path, self.count, self.stored, self.channels, self.size = Path(path), count, stored, channels, size
        self.index = torch.arange(count) if index is None else index
        self._fd: Optional[int] = None
        self._pid = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: torch.Tensor) -> "StoredImages":
        return StoredImages(self.path, self.count, self.stored, self.channels, self.size, self.index[idx])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}  # a descriptor is per process

    def __getitem__(self, key) -> torch.Tensor:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        c, s = self.stored
        row = c * s * s
        rows = self.index[key].reshape(-1).tolist()
        out = np.empty((len(rows), row), dtype=np.uint8)
        for i in sorted(range(len(rows)), key=rows.__getitem__):  # forwards through the file
            out[i] = np.frombuffer(os.pread(self._fd, row, rows[i] * row), dtype=np.uint8)
        return convert(torch.from_numpy(out).view(len(rows), c, s, s), self.channels, self.size)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


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
    images = StoredImages(path, meta["count"], (meta["channels"], meta["size"]), channels, size)
    return CaptionedImages(images=images, labels=torch.arange(meta["count"]), captioner=TextCaptions(meta["captions"]))
