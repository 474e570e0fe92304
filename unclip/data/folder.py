"""A user's own images with captions: `metadata.jsonl` (Hugging Face imagefolder) or `captions.csv`."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unclip.data.files import Skipped, inside, open_image, read_regular
from unclip.errors import UserError

log = logging.getLogger(__name__)


def read_pairs(folder: Path) -> list[tuple[str, str]]:
    """(file_name, text) pairs from the folder's metadata file."""
    if not folder.is_dir():
        raise UserError(f"caption folder not found: {folder}")
    jsonl, csv_path = folder / "metadata.jsonl", folder / "captions.csv"
    pairs = []
    if jsonl.is_file():
        for n, line in enumerate(text_of(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["file_name"]), str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{jsonl}:{n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    elif csv_path.is_file():
        reader = csv.DictReader(io.StringIO(text_of(csv_path), newline=""))
        if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
            raise UserError(f"{csv_path}: needs a header with the columns file_name and text")
        pairs = [(row["file_name"], row["text"]) for row in reader]
    else:
        raise UserError(f"{folder} has neither metadata.jsonl nor captions.csv (see docs/guides/train-your-data.md)")
    return pairs


def text_of(path: Path) -> str:
    """A metadata file's text; a byte that is not UTF-8 is a one-line error naming the file, line and column."""
    try:
        data = read_regular(path)
    except Skipped as e:
        raise UserError(f"{path}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Any image file as (channels, size, size) uint8: centre-cropped to a square, then resized. Only a regular
    file is read, and an image of more than MAX_PIXELS is refused before it is decoded (Skipped)."""
    with open_image(read_regular(Path(path))) as im:
        return pil_to_tensor(im, channels, size)


def pil_to_tensor(im: Image.Image, channels: int, size: int) -> torch.Tensor:
    """A PIL image of any mode and shape as (channels, size, size) uint8: centre-cropped to a square, then resized."""
    im = ImageOps.exif_transpose(im)
    im = im.convert("L" if channels == 1 else "RGB")
    im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
    array = np.asarray(im, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def load_caption_folder(folder: Path, channels: int, size: int):
    from unclip.data import CaptionedImages

    from unclip.data.sources import count_skip, skip_summary

    images, texts, skips = [], [], {}
    for name, text in read_pairs(folder):
        try:
            if not text.strip():
                raise Skipped("empty caption")
            images.append(load_image(inside(folder, name), channels, size))
            texts.append(text.strip())
        except Skipped as e:
            count_skip(skips, f"{folder / name}: {e}")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            count_skip(skips, f"{folder / name}: unreadable image")
    if skips:
        log.warning("%s: %d usable pairs, skipped %s", folder, len(images), skip_summary(skips))
    if not images:
        raise UserError(f"{folder}: no usable image+caption pair (skipped: {skip_summary(skips)})")
    return CaptionedImages(images=torch.stack(images), texts=texts)


def load_images(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """Image files as uint8 (N, C, size, size); a file that is not an image is a UserError."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
        try:
            out.append(load_image(path, channels, size))
        except Skipped as e:
            raise UserError(f"{path}: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise UserError(f"{path} is not an image this tool can read") from None
    return torch.stack(out)
