"""A user's own images with captions: `metadata.jsonl` (Hugging Face imagefolder) or `captions.csv`."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unclip.errors import UserError

log = logging.getLogger(__name__)


def read_pairs(folder: Path) -> list[tuple[str, str]]:
    """(file_name, text) pairs from the folder's metadata file."""
    if not folder.is_dir():
        raise UserError(f"caption folder not found: {folder}")
    jsonl, csv_path = folder / "metadata.jsonl", folder / "captions.csv"
    pairs = []
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["file_name"]), str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{jsonl}:{n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    elif csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
                raise UserError(f"{csv_path}: needs a header with the columns file_name and text")
            pairs = [(row["file_name"], row["text"]) for row in reader]
    else:
        raise UserError(f"{folder} has neither metadata.jsonl nor captions.csv (see docs/guides/train-your-data.md)")
    return pairs


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Any image file as (channels, size, size) uint8: centre-cropped to a square, then resized."""
    with Image.open(path) as im:
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

    images, texts, bad = [], [], 0
    for name, text in read_pairs(folder):
        try:
            images.append(load_image(folder / name, channels, size))
            texts.append(text)
        except (OSError, UnidentifiedImageError, ValueError):
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable image(s)", folder, bad)
    if not images:
        raise UserError(f"{folder}: no usable image+caption pair ({bad} unreadable)")
    return CaptionedImages(images=torch.stack(images), texts=texts)


def load_images(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """Image files as uint8 (N, C, size, size); a file that is not an image is a UserError."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
        try:
            out.append(load_image(path, channels, size))
        except (UnidentifiedImageError, OSError, ValueError):
            raise UserError(f"{path} is not an image this tool can read") from None
    return torch.stack(out)
