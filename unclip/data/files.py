"""Reading the files a dataset names, safely: only regular files inside the dataset's folder, opened so that
nothing can block (a named pipe or a device is refused after a non-blocking open, never read), and images
refused before decoding when they hold more pixels than t2i decodes (a decompression bomb)."""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image

MAX_PIXELS = 8192 * 8192  # an image with more is refused from its header, before a byte of it is decoded


class Skipped(ValueError):
    """A record that cannot be used; its message is the reason counted (`not a regular file`, ...)."""


def inside(root: Path, name: str) -> Path:
    """`root / name`, or Skipped when `name` leads out of `root` (`../x.png`, `/abs/x.png`, a link out of it)."""
    root = Path(root).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise Skipped("outside its folder")
    return path


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file; Skipped for anything else (missing, a named pipe, a device, a folder). The
    open is non-blocking, so a pipe with no writer returns at once and is refused by its type."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise Skipped("missing") from None
    except OSError as e:
        raise Skipped(f"unreadable ({e.strerror.lower() if e.strerror else type(e).__name__})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Skipped("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def open_image(data: bytes | io.IOBase, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image, its header read and its size checked against `max_pixels` before anything is decoded;
    Skipped("too many pixels") otherwise (PIL's own DecompressionBombError included)."""
    try:
        with warnings.catch_warnings():  # PIL warns of what MAX_PIXELS refuses anyway
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skipped("too many pixels") from None
    if im.width * im.height > max_pixels:
        im.close()
        raise Skipped("too many pixels")
    return im
