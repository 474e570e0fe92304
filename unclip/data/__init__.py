"""Captioned image datasets held in memory as one uint8 tensor (small data must not wait on a loader).

`load_dataset("mnist" | "fashion-mnist" | "scenes" | "folder:PATH", split=...)` returns a `CaptionedImages`.
Splits: `test` is the official test set (a caption folder has none, so its test split is the
validation slice); `val` is a fixed held-out slice of train; `train` is the rest. Scenes are drawn
from the MNIST digits of the split (one scene per digit, a fixed seed per split).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from unclip.data.scene_captions import SceneCaptions
from unclip.data.captions import FASHION_NAMES, FASHION_TEMPLATES, MNIST_NAMES, MNIST_TEMPLATES, LabelCaptions
from unclip.errors import UserError
from unclip.images import to_float

SPLITS = ("train", "val", "test")


@dataclass
class CaptionedImages:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: Optional[torch.Tensor] = None  # (N,) class index, for labelled datasets
    captioner: Optional[LabelCaptions | SceneCaptions] = None  # random captions from labels (or scene ids)
    texts: Optional[list[str]] = None  # fixed captions (caption folders)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.captioner.class_names if self.captioner else None

    def subset(self, idx: torch.Tensor) -> "CaptionedImages":
        return CaptionedImages(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            captioner=self.captioner,
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
        )

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Images `idx` as floats in [-1, 1]."""
        return to_float(self.images[idx])

    def caption_keys(self, idx: torch.Tensor, seed: int) -> list[str]:
        """One random key per example: a caption is a pure function of (seed, example), whichever process
        or batch draws it (so N processes caption a batch exactly as one does, and resume redraws the same)."""
        return [f"{seed}:{i}" for i in idx.tolist()]

    def captions(self, idx: torch.Tensor, seed: int) -> list[str]:
        if self.captioner is not None:
            return self.captioner.sample(self.labels[idx], self.caption_keys(idx, seed))
        return [self.texts[i] for i in idx.tolist()]

    def groups(self, idx: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Ids under which examples count as the same (positives for the contrastive loss): the class
        where there are classes, else the caption text (equal captions describe both images)."""
        if self.class_names:
            return self.labels[idx]
        return torch.tensor([zlib.crc32(c.encode()) for c in captions], dtype=torch.long)


# Where a distribution installs a dataset: Debian's dataset-fashion-mnist package puts the four IDX files here.
SYSTEM_DATA_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def default_data_dir(name: str) -> Path:
    """Where `--data NAME` looks without `--data-dir`: $T2I_DATA_DIR/NAME, then the per-user cache, then the
    system's copy (SYSTEM_DATA_DIRS); the first that holds the training images, else the first (downloads go there)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i"
    env = os.environ.get("T2I_DATA_DIR")
    candidates = [Path(env) / name] if env else []
    candidates += [cache / name] + ([SYSTEM_DATA_DIRS[name]] if name in SYSTEM_DATA_DIRS else [])
    held = lambda d: any((d / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))  # noqa: E731
    return next((d for d in candidates if held(d)), candidates[0])


def split_indices(n: int, split: str, val_size: int) -> torch.Tensor:
    """A fixed permutation (seed 0, independent of the run's seed) carves validation out of train."""
    val_size = min(val_size, n // 10)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:val_size].sort().values if split == "val" else perm[val_size:].sort().values


def load_dataset(
    spec: str,
    split: str = "train",
    data_dir: Optional[str | Path] = None,
    channels: int = 1,
    size: int = 28,
    val_size: int = 5000,
) -> CaptionedImages:
    """Load `spec` (mnist | fashion-mnist | scenes | folder:PATH) at `channels` x `size` x `size`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if spec in ("mnist", "fashion-mnist"):
        from unclip.data.mnist import load_idx_dataset

        names, templates = (MNIST_NAMES, MNIST_TEMPLATES) if spec == "mnist" else (FASHION_NAMES, FASHION_TEMPLATES)
        folder = Path(data_dir) if data_dir else default_data_dir(spec)
        images, labels = load_idx_dataset(spec, folder, train=split != "test")
        data = CaptionedImages(images=images, labels=labels.long(), captioner=LabelCaptions(names, templates))
        data = _resize(data, channels, size)
    elif spec == "scenes":
        return _resize(_scenes(split, Path(data_dir) if data_dir else default_data_dir("mnist"), val_size), channels, size)
    elif spec.startswith("folder:"):
        from unclip.data.folder import load_caption_folder

        data = load_caption_folder(Path(spec[len("folder:") :]), channels, size)
        if split == "test":
            split = "val"
    else:
        raise UserError(f"unknown dataset {spec!r}: use mnist, fashion-mnist, scenes or folder:PATH")
    if split == "test":
        return data
    return data.subset(split_indices(len(data), split, val_size))


def _scenes(split: str, mnist_dir: Path, val_size: int) -> CaptionedImages:
    from unclip.data.mnist import load_idx_dataset
    from unclip.data.scenes import make_scenes

    try:
        images, labels = load_idx_dataset("mnist", mnist_dir, train=split != "test")
    except UserError as e:
        raise UserError(f"scenes are drawn from MNIST digits: {e}") from None
    if split != "test":
        keep = split_indices(len(images), split, val_size)
        images, labels = images[keep], labels[keep]
    seed = SPLITS.index(split) + 1
    scenes, pixels = make_scenes(images, labels.long(), len(images), seed, allow_held_out=split == "test")
    return CaptionedImages(images=pixels, labels=torch.arange(len(scenes)), captioner=SceneCaptions(scenes))


def _resize(data: CaptionedImages, channels: int, size: int) -> CaptionedImages:
    x = data.images
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).round().byte()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).byte()
    data.images = x.contiguous()
    return data
