"""Captioned pictures from where people keep them: COCO, Hugging Face parquet, webdataset shards.

A source is cut into units whose record counts are known before anything is decoded (COCO: runs of 1,000
images, parquet: row groups, webdataset: shards, counted from the tar headers); `raw(unit)` reads a unit's
records undecoded. DataLoader workers decode, centre-crop and resize them (`decode_source`), the units dealt
among the workers, so memory holds a batch at a time, never the source. What comes out is kept in memory
(`load_source`, small sources), written once to a uint8 file on disk (`t2i prepare`, then `--data
prepared:FILE`: the usual cure for slow JPEG decoding on a small CPU), or streamed to training
(unclip/data/stream.py). Records that cannot be used (an annotation naming a missing file, a corrupt image or
tar member) are skipped and counted.

- `coco:ROOT`: ROOT/annotations/captions_{train,val}2017.json with ROOT/{train,val}2017/*.jpg; val2017 is
  the test split; every image keeps all its captions (one drawn per sample per epoch).
- `parquet:PATH`: a .parquet file or a folder of them as Hugging Face `datasets` writes them: an image column
  holding {bytes, path} structs (or raw bytes) and a text column (a string or a list of them); read with
  pyarrow row group by row group, so a file larger than memory streams.
- `wds:PATTERN`: webdataset tar shards (`shards/{00000..00123}.tar`), an image (.jpg, .jpeg, .png, .webp)
  and a .txt caption or a .json holding "caption" or "text" per key; read with the webdataset library.
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from unclip.data.files import Skipped, inside, open_image, read_regular
from unclip.errors import UserError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Record = tuple[Optional[torch.Tensor], list[str], str]  # (uint8 image (C, S, S) or None if skipped, captions, why)


def decode_image(data: bytes, channels: int, size: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 (channels, size, size): the centre square, resized (antialiased)."""
    with open_image(data) as image:  # refused from its header when it holds more than MAX_PIXELS
        image = image.convert("RGB" if channels == 3 else "L")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(size, size, channels).permute(2, 0, 1)


# (record name, encoded image or its file, captions): undecoded; the image or the captions may be the Skipped
# reason the record cannot be used
Raw = tuple[str, "bytes | Path | Skipped | None", "list[str] | Skipped"]


def decode_raw(raw: Raw, channels: int, size: int) -> Record:
    """A raw record decoded, or (None, captions, why) when it cannot be used."""
    name, payload, captions = raw
    if payload is None:
        return None, captions, f"{name}: no image"
    for why in (payload, captions):
        if isinstance(why, Skipped):
            return None, [], f"{name}: {why}"
    if not captions:
        return None, captions, f"{name}: no caption"
    try:
        data = read_regular(payload) if isinstance(payload, Path) else payload
        return decode_image(data, channels, size), captions, ""
    except Skipped as e:
        return None, captions, f"{name}: {e}"
    except Exception as e:  # PIL's errors for truncated or foreign bytes are many
        return None, captions, f"{name}: not a readable image ({type(e).__name__})"


class Source:
    """A captioned source cut into units (COCO: runs of images, parquet: row groups, webdataset: shards) whose
    record counts are known before anything is decoded: `raw(u)` yields unit u's records undecoded, in a fixed
    order. Units are what DataLoader workers and training processes split among themselves."""

    channels: int
    size: int
    counts: list[int]  # records per unit
    spec: str = ""  # as the user named it, for messages

    def raw(self, unit: int) -> Iterator[Raw]:
        raise NotImplementedError

    @property
    def total(self) -> int:
        return sum(self.counts)


COCO_UNIT = 1000  # images per COCO unit


@dataclass
class Coco(Source):
    """COCO captions, 2017 layout: one record per image with all its captions."""

    root: Path
    split: str  # train2017 | val2017
    channels: int = 3
    size: int = 64

    def __post_init__(self):
        path = self.root / "annotations" / f"captions_{self.split}.json"
        try:
            data = json.loads(path.read_text())
            names = {im["id"]: im["file_name"] for im in data["images"]}
            captions: dict[int, list[str]] = {}
            for a in data["annotations"]:
                captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        except FileNotFoundError:
            raise UserError(f"coco:{self.root}: no {path} (the 2017 layout: annotations/captions_train2017.json "
                            "beside train2017/)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} does not parse as JSON ({e})") from None
        except (KeyError, TypeError) as e:
            raise UserError(f"{path} is not a COCO captions file (no {e})") from None
        self.items = [(names[i], captions.get(i, [])) for i in sorted(names)]
        self.counts = [len(self.items[i : i + COCO_UNIT]) for i in range(0, len(self.items), COCO_UNIT)]

    def raw(self, unit: int) -> Iterator[Raw]:
        for name, captions in self.items[unit * COCO_UNIT : (unit + 1) * COCO_UNIT]:
            try:
                yield name, inside(self.root / self.split, name), captions
            except Skipped as e:  # a file_name that leads out of the image folder
                yield name, e, captions


@dataclass
class Parquet(Source):
    path: Path
    image_column: str = "image"
    text_column: str = "text"
    channels: int = 3
    size: int = 64

    def __post_init__(self):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("parquet: sources need pyarrow: pip install -e '.[data]'") from None
        files = sorted(self.path.rglob("*.parquet")) if self.path.is_dir() else [self.path]
        if not files or not files[0].is_file():
            raise UserError(f"parquet:{self.path}: no .parquet file there")
        self.units, self.counts = [], []
        for f in files:
            try:
                meta = pq.ParquetFile(f)
            except Exception as e:
                raise UserError(f"{f}: not a parquet file ({type(e).__name__}: {e})") from None
            columns = meta.schema_arrow.names
            for c, param in ((self.image_column, "image_column"), (self.text_column, "text_column")):
                if c not in columns:
                    raise UserError(f"{f} has no column {c!r} (its columns: {', '.join(columns)}); name it as {param}",
                                    param=param)
            self.units += [(f, g) for g in range(meta.num_row_groups)]
            self.counts += [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def raw(self, unit: int) -> Iterator[Raw]:
        import pyarrow.parquet as pq

        f, group = self.units[unit]
        table = pq.ParquetFile(f).read_row_group(group, columns=[self.image_column, self.text_column])
        for n, (image, text) in enumerate(zip(table.column(0).to_pylist(), table.column(1).to_pylist())):
            data = image.get("bytes") if isinstance(image, dict) else image
            yield f"{f.name} row group {group} row {n}", data, as_captions(text)


def as_captions(value) -> list[str]:
    """A caption field (a string, a list of them, or nothing) as a list of non-empty captions."""
    texts = [value] if isinstance(value, str) else [t for t in value if isinstance(t, str)] if isinstance(value, list) else []
    return [t.strip() for t in texts if t.strip()]


def wds_captions(sample: dict) -> list[str] | Skipped:
    """A sample's captions (its .txt, or the "caption" or "text" of its .json); Skipped where they are not UTF-8."""
    if "txt" in sample:
        try:
            return as_captions(sample["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            return Skipped("caption not UTF-8 text")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except UnicodeDecodeError:
            return Skipped("caption not UTF-8 text")
        except json.JSONDecodeError:
            return []
        return as_captions(meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None)
    return []


def shard_keys(path: str) -> tuple[int, bool]:
    """(the samples of a tar shard, whether it is truncated), counted from its member headers (the data is seeked
    over, not read), grouped by key as webdataset groups them (the name up to the first dot of its last part). Of a
    shard cut short (a copy that stopped), the samples whose members are whole are counted, and a warning says so."""
    keys, previous, truncated = 0, None, False
    size = Path(path).stat().st_size
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue  # webdataset skips a member without an extension
                key = f"{folder}/{base.split('.', 1)[0]}"
                if member.offset_data + member.size > size:  # its data runs past the end of the file
                    truncated, keys = True, keys - (key == previous)  # its sample is not whole
                    break
                if key != previous:
                    keys, previous = keys + 1, key
    except (tarfile.TarError, OSError):
        truncated = True
    if truncated:
        log.warning("%s is truncated: its tail is missing (%d whole samples before it are read)", path, keys)
    return keys, truncated


@dataclass
class Shards(Source):
    pattern: str
    channels: int = 3
    size: int = 64

    def __post_init__(self):
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise UserError("wds: sources need webdataset: pip install -e '.[data]'") from None

        self.shards = [s for s in expand_urls(self.pattern) if Path(s).is_file()]
        if not self.shards:
            raise UserError(f"wds:{self.pattern}: the pattern matches no shard file")
        counted = [shard_keys(s) for s in self.shards]
        self.counts = [n for n, _ in counted]
        self.opened_skips = {"truncated shard": sum(t for _, t in counted)} if any(t for _, t in counted) else {}

    def raw(self, unit: int) -> Iterator[Raw]:
        import webdataset as wds

        def skipped(exn: Exception) -> bool:
            log.warning("webdataset: %s: %s (the rest of that shard is skipped)", type(exn).__name__, exn)
            return True

        dataset = wds.WebDataset([self.shards[unit]], shardshuffle=False, handler=skipped, nodesplitter=None,
                                 workersplitter=None, empty_check=False)
        for sample in dataset:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            yield sample["__key__"], data, wds_captions(sample)


class Decoded(torch.utils.data.IterableDataset):
    """A source's records decoded, unit by unit, the units dealt among DataLoader workers (none twice)."""

    def __init__(self, source: Source):
        self.source = source

    def __iter__(self) -> Iterator[Record]:
        info = torch.utils.data.get_worker_info()
        units = range(len(self.source.counts))
        for unit in units if info is None else units[info.id :: info.num_workers]:
            for raw in self.source.raw(unit):
                yield decode_raw(raw, self.source.channels, self.source.size)


def open_source(spec: str, split: str, channels: int, size: int, image_column: str = "image",
                text_column: str = "text"):
    """The dataset object of `spec` (coco:, parquet:, wds:) for `split`: "test" is COCO's val2017; the others
    have no test split of their own (their caller carves val and test out of what they hold)."""
    kind, _, where = spec.partition(":")
    if kind == "coco":
        source = Coco(Path(where), "val2017" if split == "test" else "train2017", channels, size)
    elif kind == "parquet":
        source = Parquet(Path(where), image_column, text_column, channels, size)
    elif kind == "wds":
        source = Shards(where, channels, size)
    else:
        raise UserError(f"unknown source {spec!r}")
    source.spec = spec
    return source


def _collate(batch: list[Record]) -> list[Record]:
    return batch


def count_skip(skips: dict[str, int], why: str) -> None:
    reason = why.rsplit(": ", 1)[-1]
    skips[reason] = skips.get(reason, 0) + 1
    log.debug("skipped %s", why)


def decode_source(source, workers: int = 2, batch_size: int = 64,
                  progress: Optional[Callable[[int], None]] = None) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
    """Decode a source in `workers` processes; yield (uint8 images (B, C, S, S), their captions) batch by batch,
    in an order fixed by the source and the number of workers. Skipped records are counted in `skips`."""
    loader = torch.utils.data.DataLoader(Decoded(source), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    source.skips = dict(getattr(source, "opened_skips", {}))  # what was found wrong when it was opened
    for batch in loader:
        kept = [(image, captions) for image, captions, why in batch if image is not None]
        for _, _, why in batch:
            if why:
                count_skip(source.skips, why)
        if progress is not None:
            progress(len(batch))
        if kept:
            yield torch.stack([k[0] for k in kept]), [k[1] for k in kept]


def skip_summary(skips: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skips.items())) or "none"
