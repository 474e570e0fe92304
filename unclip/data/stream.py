"""Training on a source larger than memory: its records streamed to the training processes and decoded in
DataLoader workers as batches need them (`--stream`, or by itself for a source whose decoded images would
take more than STREAM_BYTES).

Lanes. A source is cut into units whose record counts are known before anything is decoded (COCO: runs of
images, parquet: row groups, webdataset: shards; unclip.data.sources). There are L = processes x workers
lanes, and unit i goes to lane i mod L, so no two workers of any process read the same unit. A lane reads its
units over and over, each pass (a cycle) in an order drawn from (seed, lane, cycle), its records through a
shuffle buffer of SHUFFLE records emptied at the cycle's end, and cuts what comes out into batches. Training
step k of process r takes lane r*W + (k mod W)'s batch number k // W (W workers a process): the workers take
turns, as a DataLoader returns their batches. An epoch is len(data) // batch_size steps, as in memory; memory
holds a shuffle buffer of encoded records and a few decoded batches a worker, never the source.

The held-out split is the source's first `n_val` records in its own order (its units in order); the lanes skip
them. Each record keeps that order's index as its id, from which its caption is drawn, as in memory.

Resume. A lane's batch m is the records m*B .. (m+1)*B - 1 of its stream, and the records of a cycle are known
without decoding anything, so `--resume` at step s starts each lane at the batch it would have drawn: it skips
whole cycles by counting and reads, without decoding, the records of the current cycle before that batch. The
steps after a resume then see exactly the batches of the uninterrupted run, provided the number of processes
and of workers is the same (they make the lanes), and the records counted are the records read (a tar damaged
past a member's header ends that shard early for webdataset, which shifts its lane); with other numbers
training goes on from other batches.
A record that cannot be decoded is replaced by the first good record of its batch (the batch keeps its size,
which the processes' gathers need) and counted.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Iterator

import torch

from unclip.data.sources import Raw, Source, count_skip, decode_raw, skip_summary
from unclip.errors import UserError

SHUFFLE = 1000  # encoded records a lane holds to shuffle
STREAM_BYTES = 2 << 30  # a source whose decoded images would take more streams unless told otherwise
log = logging.getLogger(__name__)


class StreamedCaptions:
    """The training split of a source, read as a stream (see the module's text); `load` decodes a part of the
    source into memory (the held-out split, calibration images)."""

    class_names = None
    labels = None

    def __init__(self, source: Source, n_val: int):
        self.source, self.n_val = source, n_val
        self.offsets = [0, *itertools.accumulate(source.counts)]  # each unit's first record in the source's order
        self.skips: dict[str, int] = dict(getattr(source, "opened_skips", {}))  # found when it was opened

    def __len__(self) -> int:
        return self.source.total - self.n_val

    def records(self, unit: int, first: int = 0) -> Iterator[tuple[int, Raw]]:
        """(index in the source's order, record) for the records of `unit` whose index is at least `first`."""
        for index, raw in enumerate(self.source.raw(unit), self.offsets[unit]):
            if index >= first:
                yield index, raw

    def held(self, unit: int) -> int:
        """Training records in `unit` (those past the held-out split)."""
        return max(0, self.offsets[unit + 1] - max(self.offsets[unit], self.n_val))

    def lanes(self, count: int) -> list[list[int]]:
        """The units of each of `count` lanes; every lane must have training records."""
        lanes = [list(range(lane, len(self.source.counts), count)) for lane in range(count)]
        if any(sum(self.held(u) for u in units) == 0 for units in lanes):
            raise UserError(f"{self.source.spec}: its {len(self.source.counts)} units (shards, row groups, runs of "
                            f"images) cannot give each of {count} readers (processes x workers) training records; "
                            "use fewer workers or cut the source finer", param="workers")
        return lanes

    def cycle(self, units: list[int], seed: int, lane: int, cycle: int) -> Iterator[tuple[int, Raw]]:
        """One pass of a lane over its units, in an order of its own, through the shuffle buffer."""
        order = [u for u in units if self.held(u)]  # units wholly held out are not read
        random.Random(f"{seed}:{lane}:{cycle}").shuffle(order)
        rng = random.Random(f"{seed}:{lane}:{cycle}:buffer")
        buffer: list[tuple[int, Raw]] = []
        for unit in order:
            for item in self.records(unit, self.n_val):
                if len(buffer) < SHUFFLE:
                    buffer.append(item)
                    continue
                i = rng.randrange(SHUFFLE)
                yield buffer[i]
                buffer[i] = item
        rng.shuffle(buffer)
        yield from buffer

    def lane(self, units: list[int], seed: int, lane: int, start: int) -> Iterator[tuple[int, Raw]]:
        """A lane's endless stream of records from its record `start` on."""
        cycle, skip = divmod(start, sum(self.held(u) for u in units))
        while True:
            for item in itertools.islice(self.cycle(units, seed, lane, cycle), skip, None):
                yield item
            cycle, skip = cycle + 1, 0

    def decode_batch(self, items: list[tuple[int, Raw]]) -> tuple[torch.Tensor, list[list[str]], torch.Tensor, list[str]]:
        """(uint8 images, captions, record ids, why each unusable record was skipped): unusable records replaced
        by the batch's first usable one."""
        records = [decode_raw(raw, self.source.channels, self.source.size) for _, raw in items]
        good = next((i for i, r in enumerate(records) if r[0] is not None), None)
        skipped = [why for _, _, why in records if why]
        if good is None:
            raise UserError(f"{self.source.spec}: none of the {len(items)} records of a batch could be used "
                            f"(such as {skipped[0]})")
        kept = [r if r[0] is not None else records[good] for r in records]
        ids = [index if r[0] is not None else items[good][0] for (index, _), r in zip(items, records)]
        return torch.stack([r[0] for r in kept]), [r[1] for r in kept], torch.tensor(ids), skipped

    def batches(self, seed: int, start_step: int, batch_size: int, rank: int = 0, world: int = 1,
                workers: int = 2) -> Iterator:
        """Process `rank`'s batches (CaptionedImages of `batch_size` records) for the steps from `start_step` on."""
        from unclip.data import CaptionedImages
        from unclip.data.captions import TextCaptions

        per_rank = max(1, workers)
        lanes = self.lanes(world * per_rank)
        dataset = LaneBatches(self, lanes[rank * per_rank : (rank + 1) * per_rank], rank * per_rank, seed,
                              start_step, batch_size)
        # A generator of its own: the loader must not draw from the global RNG, whose state resume restores.
        # Workers are forked: spawned ones were heavier (each imports torch anew: 2.3 GiB PSS in all against 1.8
        # for clip-train on 100,000 streamed images, benchmarks/data_sources.py).
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None, generator=torch.Generator())
        for images, captions, ids, skipped in loader:
            for why in skipped:
                if why.rsplit(": ", 1)[-1] not in self.skips:
                    log.warning("%s: skipping records that cannot be used: %s", self.source.spec, why)
                count_skip(self.skips, why)
            yield CaptionedImages(images=images, labels=torch.arange(len(captions)), captioner=TextCaptions(captions),
                                  ids=ids)

    def scan(self, workers: int = 2) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """Every training record once, decoded by `workers` DataLoader processes (the units dealt among them):
        (uint8 images, captions) batch by batch, unusable records skipped and counted."""
        from unclip.data.sources import decode_source

        source = TrainingRecords(self)
        yield from decode_source(source, workers)
        self.skips.update(source.skips)

    def load(self, first: int, count: int):
        """Records `first` .. `first + count - 1` of the source's order decoded into memory (unusable ones skipped
        and counted), with those indices as their ids."""
        from unclip.data import CaptionedImages
        from unclip.data.captions import TextCaptions

        images, captions, ids, skips = [], [], [], {}
        for unit in range(len(self.source.counts)):
            if self.offsets[unit + 1] <= first:
                continue
            if self.offsets[unit] >= first + count:
                break
            for index, raw in self.records(unit, first):
                if index >= first + count:
                    break
                image, caps, why = decode_raw(raw, self.source.channels, self.source.size)
                if image is None:
                    count_skip(skips, why)
                    continue
                images.append(image)
                captions.append(caps)
                ids.append(index)
        if not images:
            raise UserError(f"{self.source.spec}: no usable image among its records {first}..{first + count - 1} "
                            f"(skipped: {skip_summary(skips)})")
        return CaptionedImages(images=torch.stack(images), labels=torch.arange(len(captions)),
                               captioner=TextCaptions(captions), ids=torch.tensor(ids))


class TrainingRecords(Source):
    """A streamed split's source without its held-out records."""

    def __init__(self, data: StreamedCaptions):
        self.data = data
        self.channels, self.size, self.spec = data.source.channels, data.source.size, data.source.spec
        self.counts = [data.held(u) for u in range(len(data.source.counts))]

    def raw(self, unit: int) -> Iterator[Raw]:
        return (raw for _, raw in self.data.records(unit, self.data.n_val))


class LaneBatches(torch.utils.data.IterableDataset):
    """The batches of one process's lanes: worker w serves the lane whose turn comes w steps after the start."""

    def __init__(self, data: StreamedCaptions, lanes: list[list[int]], first_lane: int, seed: int, start_step: int,
                 batch_size: int):
        self.data, self.lanes, self.first_lane = data, lanes, first_lane
        self.seed, self.start_step, self.batch_size = seed, start_step, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, count = (0, 1) if info is None else (info.id, info.num_workers)
        assert count == len(self.lanes), "one lane a worker"
        step = self.start_step + w  # the first step this worker serves
        j = step % count
        stream = self.data.lane(self.lanes[j], self.seed, self.first_lane + j, (step // count) * self.batch_size)
        while True:
            yield self.data.decode_batch(list(itertools.islice(stream, self.batch_size)))
