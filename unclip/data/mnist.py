"""MNIST and Fashion-MNIST from their four IDX files, fetched with torchvision when absent."""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import torch

from unclip.data.idx import read_idx
from unclip.errors import UserError

log = logging.getLogger(__name__)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _download(name: str, folder: Path) -> None:
    """Fetch the four files with torchvision's mirrors and checksums."""
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.utils import download_url

    source = MNIST if name == "mnist" else FashionMNIST
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        for filename, md5 in source.resources:
            if _find(folder, filename.removesuffix(".gz")):
                continue
            for mirror in source.mirrors:
                try:
                    download_url(mirror + filename, root=str(folder), filename=filename, md5=md5)
                    break
                except Exception as e:  # noqa: BLE001 - any network failure means: try the next mirror
                    log.debug("download of %s from %s failed: %s", filename, mirror, e)
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_idx_dataset(name: str, folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 1, 28, 28) uint8, labels (N,)) of the train or test split."""
    images_stem, labels_stem = FILES["train" if train else "test"]
    stems = [s for pair in FILES.values() for s in pair]
    if any(_find(folder, s) is None for s in stems):
        log.info("%s files not found in %s; trying to download them", name, folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _download(name, folder)
        except OSError as e:
            log.debug("download failed: %s", e)
    missing = [s for s in stems if _find(folder, s) is None]
    if missing:
        raise UserError(
            f"{name} not found in {folder} and could not be downloaded: expected "
            f"{', '.join(s + '[.gz]' for s in stems)}; give the folder holding them as data_dir", param="data_dir"
        )
    images = read_idx(_find(folder, images_stem))
    labels = read_idx(_find(folder, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{folder}: {images_stem} and {labels_stem} do not match ({tuple(images.shape)} vs {tuple(labels.shape)})")
    return images.unsqueeze(1).contiguous(), labels
