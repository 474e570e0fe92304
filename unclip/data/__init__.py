"""Captioned image datasets held in memory as one uint8 tensor (small data must not wait on a loader), read
from a prepared file by offset, or (the training split of a source larger than memory) streamed.

`load_dataset("mnist" | "fashion-mnist" | "scenes" | "folder:PATH" | ..., split=...)` returns a
`CaptionedImages`, or for a streamed training split a `StreamedCaptions` (unclip/data/stream.py).
Splits: `test` is the official test set (a caption folder has none, so its test split is the
validation slice); `val` is a fixed held-out slice of train; `train` is the rest. Scenes are drawn
from the MNIST digits of the split (one scene per digit, a fixed seed per split).
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from unclip.data.scene_captions import SceneCaptions
from unclip.data.captions import (FASHION_NAMES, FASHION_TEMPLATES, MNIST_NAMES, MNIST_TEMPLATES, LabelCaptions,
                                  TextCaptions)
from unclip.data.prepared import StoredImages, convert
from unclip.config import TrainConfig
from unclip.errors import ConfigError, UserError
from unclip.images import to_float

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass
class CaptionedImages:
    # (N, C, H, W) uint8, in memory or (prepared sources) on disk; None where only the captions are kept
    images: Optional[torch.Tensor | StoredImages]
    labels: Optional[torch.Tensor] = None  # (N,) class index, for labelled datasets
    captioner: Optional[LabelCaptions | SceneCaptions | TextCaptions] = None  # random captions from labels (or ids)
    texts: Optional[list[str]] = None  # fixed captions (caption folders)
    ids: Optional[torch.Tensor] = None  # (N,) each example's index in the whole split (a batch's); None: 0..N-1

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.labels)

    @property
    def example_ids(self) -> torch.Tensor:
        return self.ids if self.ids is not None else torch.arange(len(self))

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.captioner.class_names if self.captioner else None

    def subset(self, idx: torch.Tensor, batch: bool = False) -> "CaptionedImages":
        """Examples `idx` as a dataset of their own, or (`batch`) as a batch of this one: keeping their ids."""
        images = self.images
        if images is not None:
            images = images.take(idx) if isinstance(images, StoredImages) else images[idx]
        return CaptionedImages(
            images=images,
            labels=None if self.labels is None else self.labels[idx],
            captioner=self.captioner,
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
            ids=self.example_ids[idx] if batch else None,
        )

    def _all(self, idx: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.arange(len(self)) if idx is None else idx

    def pixels(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images `idx` (default: all) as floats in [-1, 1]."""
        return to_float(self.images[self._all(idx)])

    def caption_keys(self, idx: torch.Tensor, seed: int) -> list[str]:
        """One random key per example: a caption is a pure function of (seed, example id), whichever process
        or batch draws it (so N processes caption a batch exactly as one does, and resume redraws the same)."""
        return [f"{seed}:{i}" for i in self.example_ids[idx].tolist()]

    def captions(self, idx: Optional[torch.Tensor] = None, seed: int = 0) -> list[str]:
        """A caption for each example `idx` (default: all), drawn with `seed`."""
        idx = self._all(idx)
        if self.captioner is not None:
            return self.captioner.sample(self.labels[idx], self.caption_keys(idx, seed))
        return [self.texts[i] for i in idx.tolist()]

    def groups(self, captions: list[str], idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ids under which examples `idx` (default: all) count as the same (positives for the contrastive loss):
        the class where there are classes, else the caption text (equal captions describe both images)."""
        if self.class_names:
            return self.labels[self._all(idx)]
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


def held_out(n: int, val_size: int) -> int:
    """How many of `n` examples the validation split holds: `val_size`, at most a tenth."""
    return min(val_size, n // 10)


def split_indices(n: int, split: str, val_size: int) -> torch.Tensor:
    """A fixed permutation (seed 0, independent of the run's seed) carves validation out of train."""
    val_size = held_out(n, val_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:val_size].sort().values if split == "val" else perm[val_size:].sort().values


@dataclass(frozen=True)
class Request:
    """What `load_dataset` asks of a source, beside its spec and split."""

    data_dir: Optional[Path]
    channels: int
    size: int
    val_size: int
    columns: tuple[str, str]
    stream: Optional[bool]
    pixels: bool


def carve(data: CaptionedImages, split: str, val_size: int) -> CaptionedImages:
    """The split of a source that has no test split of its own: val (and test) its fixed held-out slice."""
    return data.subset(split_indices(len(data), "val" if split == "test" else split, val_size))


def _idx(name: str, where: str, split: str, r: Request) -> CaptionedImages:
    from unclip.data.mnist import load_idx_dataset

    names, templates = (MNIST_NAMES, MNIST_TEMPLATES) if name == "mnist" else (FASHION_NAMES, FASHION_TEMPLATES)
    images, labels = load_idx_dataset(name, r.data_dir or default_data_dir(name), train=split != "test")
    data = _resize(CaptionedImages(images=images, labels=labels.long(), captioner=LabelCaptions(names, templates)),
                   r.channels, r.size)
    return data if split == "test" else data.subset(split_indices(len(data), split, r.val_size))


def _scene_source(name: str, where: str, split: str, r: Request) -> CaptionedImages:
    data = _scenes(split, r.data_dir or default_data_dir("mnist"), r.val_size, r.pixels)
    return _resize(data, r.channels, r.size) if r.pixels else data


def _folder(name: str, where: str, split: str, r: Request) -> CaptionedImages:
    from unclip.data.folder import load_caption_folder

    return carve(load_caption_folder(Path(where), r.channels, r.size), split, r.val_size)


def _emoji(name: str, where: str, split: str, r: Request) -> CaptionedImages:
    from unclip.data.emoji import load_emoji

    if r.channels != 3:
        raise UserError("emoji are colour: train them with image_channels 3", param="data")
    return load_emoji(Path(where), split, r.size, r.val_size, carve)


def _prepared(name: str, where: str, split: str, r: Request) -> CaptionedImages:
    from unclip.data.prepared import load_prepared

    return carve(load_prepared(Path(where), r.channels, r.size), split, r.val_size)


def _records(name: str, where: str, split: str, r: Request):
    """COCO, parquet and webdataset: decoded into memory, or (the training split, when `stream` says so or it is
    larger than STREAM_BYTES) streamed; COCO's test split is val2017, the others carve val and test alike."""
    spec = f"{name}:{where}"
    coco_test = split == "test" and name == "coco"
    if streamed(spec, split, r.channels, r.size, r.columns, r.stream):
        from unclip.data.stream import StreamedCaptions

        source = _open(spec, split, r.channels, r.size, r.columns)
        if coco_test:  # val2017, whole
            return StreamedCaptions(source, 0).load(0, source.total)
        data = StreamedCaptions(source, held_out(source.total, r.val_size))
        return data if split == "train" else data.load(0, data.n_val)  # no test split of its own: val
    data = _resize(load_source(spec, "test" if coco_test else "train", r.channels, r.size, r.columns), r.channels, r.size)
    return data if coco_test else carve(data, split, r.val_size)


class Kind(NamedTuple):
    """A kind of data source: `open(name, where, split, request)`, and how a user writes it."""

    open: Callable
    usage: str  # the spec a user writes: `mnist`, `folder:PATH`
    streams: bool = False  # can be streamed rather than decoded into memory (--stream)


# Every data source `--data` takes, by the spec's prefix (before `:`): a new source is an opener and a line here.
SOURCES = {
    "mnist": Kind(_idx, "mnist"),
    "fashion-mnist": Kind(_idx, "fashion-mnist"),
    "scenes": Kind(_scene_source, "scenes"),
    "folder": Kind(_folder, "folder:PATH"),
    "coco": Kind(_records, "coco:ROOT", streams=True),
    "parquet": Kind(_records, "parquet:PATH", streams=True),
    "wds": Kind(_records, "wds:PATTERN", streams=True),
    "prepared": Kind(_prepared, "prepared:FILE"),
    "emoji": Kind(_emoji, "emoji:DIR"),
}
SOURCE_USAGE = " | ".join(kind.usage for kind in SOURCES.values())  # for help texts
STREAMABLE = tuple(name for name, kind in SOURCES.items() if kind.streams)


def load_dataset(
    spec: str,
    split: str = "train",
    data_dir: Optional[str | Path] = None,
    channels: int = 1,
    size: int = 28,
    val_size: int = 5000,
    columns: tuple[str, str] = ("image", "text"),
    stream: Optional[bool] = None,
    pixels: bool = True,
):
    """Load `spec` (one of SOURCES: mnist | fashion-mnist | scenes | folder:PATH | coco:ROOT | parquet:PATH (its image
    and text `columns`) | wds:PATTERN | prepared:FILE) at `channels` x `size` x `size`. The training split of a COCO,
    parquet or webdataset source streams (a `StreamedCaptions`) when `stream` says so, or, left None, when its
    decoded images would take more than STREAM_BYTES; its validation split is then its first records. Without
    `pixels`, scenes are not drawn (images None: captions and layouts only; other sources load as ever)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    name, colon, where = spec.partition(":")
    kind = SOURCES.get(name)
    if kind is None or bool(colon) != (":" in kind.usage):
        raise UserError(f"unknown dataset {spec!r}: use {', '.join(k.usage for k in SOURCES.values())}", param="data")
    if stream and not kind.streams:
        raise UserError(f"stream is for {', '.join(s + ':' for s in STREAMABLE)} sources, not {spec}", param="stream")
    request = Request(Path(data_dir) if data_dir else None, channels, size, val_size, columns, stream, pixels)
    return kind.open(name, where, split, request)


def _scenes(split: str, mnist_dir: Path, val_size: int, render: bool = True) -> CaptionedImages:
    from unclip.data.mnist import load_idx_dataset
    from unclip.data.scenes import TRAIN_SHARES, GlyphPool, make_scenes

    try:
        images, labels = load_idx_dataset("mnist", mnist_dir, train=split != "test")
    except UserError as e:
        raise UserError(f"scenes are drawn from MNIST digits: {e}") from None
    if split != "test":
        keep = split_indices(len(images), split, val_size)
        images, labels = images[keep], labels[keep]
    seed = SPLITS.index(split) + 1
    pool = GlyphPool(images, labels.long())
    scenes, pixels, picks = make_scenes(pool, len(images), seed, allow_held_out=split == "test", render=render,
                                        shares=(0, 0) if split == "test" else TRAIN_SHARES)
    return CaptionedImages(images=pixels, labels=torch.arange(len(scenes)), captioner=SceneCaptions(scenes, pool, picks))


def _resize(data: CaptionedImages, channels: int, size: int) -> CaptionedImages:
    data.images = convert(data.images, channels, size)
    return data


_SOURCES: dict[tuple, CaptionedImages] = {}  # decoded once per process: train and val are slices of one decode
_OPENED: dict[tuple, object] = {}  # opened (counted) once per process


def _open(spec: str, split: str, channels: int, size: int, columns: tuple[str, str]):
    """The `unclip.data.sources` object of a COCO, parquet or webdataset spec; COCO's test split is val2017."""
    key = (spec, split == "test" and spec.startswith("coco:"), channels, size, columns)
    if key not in _OPENED:
        from unclip.data.sources import open_source

        _OPENED[key] = open_source(spec, "test" if key[1] else "train", channels, size, *columns)
    return _OPENED[key]


def streamed(spec: str, split: str, channels: int, size: int, columns: tuple[str, str], stream: Optional[bool]) -> bool:
    """Whether `load_dataset` streams this source: as `stream` says, else when it is larger than STREAM_BYTES."""
    if stream is not None:
        return stream
    from unclip.data.stream import STREAM_BYTES

    source = _open(spec, split, channels, size, columns)
    return source.total * channels * size * size > STREAM_BYTES


def load_split(train: TrainConfig, split: str, channels: int, size: int, pixels: bool = True):
    """`load_dataset` of a training config's data (`--data`, `--data-dir`, its columns, `--stream`)."""
    return load_dataset(train.data, split, train.data_dir, channels, size, train.val_size,
                        (train.image_column, train.text_column), train.stream, pixels)


def layout_fields(data, who: str) -> dict[str, int]:
    """What the layouts of `data` say of each object (name -> number of values; scenes: digit, colour), or a
    ConfigError for `who` (a stage that needs layouts) where its source has none."""
    fields = getattr(getattr(data, "captioner", None), "layout_fields", None)
    if not isinstance(data, CaptionedImages) or not fields:
        raise ConfigError(f"{who} needs data whose scenes say what and where each object is (the scenes data)")
    return fields


def load_source(spec: str, split: str, channels: int, size: int, columns: tuple[str, str]) -> CaptionedImages:
    """A COCO, parquet or webdataset source decoded into memory by DataLoader workers (for sources that fit;
    `t2i prepare` writes larger ones to disk once). Decoded at the source's own channels, resized to `size`."""
    key = (spec, split, channels, size, columns)
    if key not in _SOURCES:
        from unclip.data.sources import decode_source, skip_summary

        source = _open(spec, split, 3, size, columns)
        images, captions = [], []
        for batch, caps in decode_source(source, workers=min(2, os.cpu_count() or 1)):
            images.append(batch)
            captions += caps
        if not captions:
            raise UserError(f"{spec}: no usable image (skipped: {skip_summary(source.skips)})")
        if source.skips:
            log.warning("%s: %d usable images, skipped %s", spec, len(captions), skip_summary(source.skips))
        _SOURCES[key] = CaptionedImages(images=torch.cat(images), labels=torch.arange(len(captions)),
                                        captioner=TextCaptions(captions))
    cached = _SOURCES[key]
    return CaptionedImages(cached.images, cached.labels, cached.captioner)
