"""Users' own data at scale: COCO, parquet and webdataset sources, `t2i prepare`, and what a 2-core CPU gets.

From MNIST digits it writes (under --work, never committed) N 64x64 colour JPEGs three ways: a COCO 2017
layout, Hugging Face-style parquet files and webdataset tar shards, with captions. Then it measures:

- decoding each source in 2 DataLoader workers (images/s): what streaming JPEG costs;
- `t2i prepare` of the shards into a uint8 file, and reading random training batches back from it;
- the images per second one decoder training step consumes at 64x64 (the default decoder, batch 64), to
  compare with what the loaders deliver;
- the peak memory (RSS) of a process that reads every one of the N prepared images once in shuffled batches
  (an epoch's worth), and of `t2i clip-train --data prepared:FILE` for a few hundred steps;
- streaming (`--stream`, unclip/data/stream.py): the images per second each source delivers to training
  through 2 DataLoader workers, and the peak memory of the whole process tree (training process and its
  workers; summed RSS, which counts the pages they share once per process, and summed PSS, which splits
  them) while it streams an epoch of the N images, while `t2i clip-train --stream` trains, and while
  `t2i decoder-train --stream` trains a 64x64 decoder.

    python benchmarks/data_sources.py --data-dir ../shared/data/mnist --images 100000 [--only stream]

`--only stream` measures streaming alone and updates those figures in the report; sources already written
under --work for the same N are reused.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unclip.data.mnist import load_idx_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PALETTE = {"red": (255, 48, 48), "green": (48, 224, 64), "blue": (64, 96, 255), "yellow": (255, 224, 32)}


def synthetic(mnist_dir: Path, n: int):
    """(JPEG bytes, caption) of n 64x64 colour digits: MNIST training digits enlarged and tinted."""
    images, labels = load_idx_dataset("mnist", mnist_dir, train=True)
    rng = np.random.default_rng(0)
    names = list(PALETTE)
    for i in range(n):
        k = i % len(images)
        colour = names[rng.integers(len(names))]
        digit = Image.fromarray(images[k, 0].numpy()).resize((64, 64), Image.Resampling.BILINEAR)
        rgb = (np.asarray(digit, dtype=np.float32)[..., None] * np.array(PALETTE[colour]) / 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue(), f"a {colour} {WORDS[int(labels[k])]}"


def write_sources(work: Path, mnist_dir: Path, n: int, shard_size: int = 1000) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (work / "shards").mkdir(parents=True, exist_ok=True)
    (work / "parquet").mkdir(exist_ok=True)
    (work / "coco" / "train2017").mkdir(parents=True, exist_ok=True)
    (work / "coco" / "annotations").mkdir(exist_ok=True)
    images, annotations, rows = [], [], {"image": [], "text": []}
    tar, part = None, 0
    for i, (data, caption) in enumerate(synthetic(mnist_dir, n)):
        if i % shard_size == 0:
            if tar:
                tar.close()
            tar = tarfile.open(work / "shards" / f"{i // shard_size:05d}.tar", "w")
        for suffix, payload in (("jpg", data), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:08d}.{suffix}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        (work / "coco" / "train2017" / f"{i:012d}.jpg").write_bytes(data)
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        annotations.append({"id": i, "image_id": i, "caption": caption})
        rows["image"].append({"bytes": data, "path": f"{i}.jpg"})
        rows["text"].append(caption)
        if len(rows["text"]) == 10_000 or i == n - 1:
            pq.write_table(pa.table(rows), work / "parquet" / f"train-{part:05d}.parquet", row_group_size=1000)
            rows, part = {"image": [], "text": []}, part + 1
    tar.close()
    (work / "coco" / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"wds": f"wds:{work}/shards/{{00000..{(n - 1) // shard_size:05d}}}.tar", "parquet": f"parquet:{work}/parquet",
            "coco": f"coco:{work}/coco"}


def decode_rate(spec: str, workers: int) -> float:
    from unclip.data.sources import decode_source, open_source

    source = open_source(spec, "train", 3, 64)
    start, count = time.perf_counter(), 0
    for images, _ in decode_source(source, workers):
        count += len(images)
    return count / (time.perf_counter() - start)


def prepared_rate(path: Path, batch: int = 64, batches: int = 300) -> float:
    from unclip.data import load_dataset

    data = load_dataset(f"prepared:{path}", "train", channels=3, size=64, val_size=5000)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for b in range(batches):
        data.pixels(order[b * batch : (b + 1) * batch])
    return batch * batches / (time.perf_counter() - start)


def stream_rate(spec: str, batch: int = 64, batches: int = 300) -> float:
    """Images per second a streamed source delivers to one training process through 2 DataLoader workers."""
    import itertools

    from unclip.data import load_dataset

    data = load_dataset(spec, "train", channels=3, size=64, val_size=5000, stream=True)
    stream = data.batches(seed=0, start_step=0, batch_size=batch, workers=2)
    next(stream)  # the workers start
    start = time.perf_counter()
    count = sum(len(b) for b in itertools.islice(stream, batches))
    seconds = time.perf_counter() - start
    stream.close()
    return count / seconds


def decoder_rate(batch: int = 64, steps: int = 8) -> float:
    """Images per second one training step of the default decoder at 64x64 RGB consumes (forward, backward, AdamW)."""
    from unclip.config import DecoderConfig
    from unclip.models.unet import UNet
    from unclip.components.decoder import decoder_diffusion

    cfg = DecoderConfig()
    cfg.model.image_channels, cfg.model.image_size = 3, 64
    torch.manual_seed(0)
    net = UNet(cfg.model, 128)
    diffusion = decoder_diffusion(net, cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x0, emb = torch.rand(batch, 3, 64, 64) * 2 - 1, torch.nn.functional.normalize(torch.randn(batch, 128), dim=-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = diffusion.loss(x0, (emb,), 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[2:]))


EPOCH_READ = """
import sys, torch
sys.path.insert(0, {root!r})
from unclip.data import load_dataset
data = load_dataset("prepared:{path}", "train", channels=3, size=64, val_size=5000)
order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
for b in range(0, len(data), 256):
    data.pixels(order[b : b + 256])
"""


STREAM_EPOCH = """
import itertools, sys, torch
sys.path.insert(0, {root!r})
from unclip.data import load_dataset
data = load_dataset("{spec}", "train", channels=3, size=64, val_size=5000, stream=True)
for batch in itertools.islice(data.batches(seed=0, start_step=0, batch_size=256, workers=2), len(data) // 256):
    pass
"""


def tree_memory_mib(command: list[str]) -> dict:
    """Peak summed RSS and summed PSS (MiB) of a command's whole process tree (DataLoader workers included),
    sampled every 0.1 s from /proc, and its seconds."""
    def tree(root: int) -> list[int]:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                parents[int(stat.parent.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
        found, frontier = [root], [root]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            found += frontier
        return found

    def field(path: Path, name: str) -> int:
        try:
            return next(int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith(name))
        except (OSError, StopIteration):
            return 0

    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        pids = tree(process.pid)
        peak_rss = max(peak_rss, sum(field(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids))
        peak_pss = max(peak_pss, sum(field(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids))
        time.sleep(0.1)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return {"peak_rss_mib": peak_rss / 1024, "peak_pss_mib": peak_pss / 1024, "seconds": time.perf_counter() - start}


def peak_rss_mib(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process, measured by GNU time (RUSAGE_CHILDREN would report the
    largest of every child so far)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], check=True, cwd=ROOT, capture_output=True, text=True)
    return int(done.stderr.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="MNIST IDX files")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/t2i-data-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data")
    parser.add_argument("--only", choices=["all", "stream"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    written = args.work / f"written-{args.images}"
    specs = json.loads(written.read_text()) if written.is_file() else write_sources(args.work, args.data_dir, args.images)
    written.write_text(json.dumps(specs))
    config = args.work / "clip.yaml"
    config.write_text("clip: {model: {image_channels: 3, image_size: 64, image_patch: 2}, train: {batch_size: 256, ckpt_every: 1000}}\n")
    steps = 50
    report_path = args.out / "data.json"
    if args.only == "stream":
        report = json.loads(report_path.read_text())
        stream(report, specs, args, config, steps)
        return save(report, args.out)
    report = {"images": args.images, "write_seconds": time.perf_counter() - start, "decode_images_per_s": {}}
    print(f"wrote {args.images} images three ways in {report['write_seconds']:.0f} s", flush=True)
    for name, spec in specs.items():
        report["decode_images_per_s"][name] = decode_rate(spec, workers=2)
        print(f"decode {name}: {report['decode_images_per_s'][name]:.0f} images/s", flush=True)
    prepared = args.work / "prepared.u8"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "t2i.cli", "prepare", "--data", specs["wds"], "--size", "64", "--out", str(prepared)],
                   check=True, cwd=ROOT, capture_output=True)
    report["prepare_seconds"] = time.perf_counter() - start
    report["prepared_mib"] = prepared.stat().st_size / 2**20
    report["prepared_images_per_s"] = prepared_rate(prepared)
    report["decoder_step_images_per_s"] = decoder_rate()
    print(f"prepare {report['prepare_seconds']:.0f} s; prepared reads {report['prepared_images_per_s']:.0f} images/s; "
          f"a decoder step consumes {report['decoder_step_images_per_s']:.0f} images/s", flush=True)
    rss, seconds = peak_rss_mib([sys.executable, "-c", EPOCH_READ.format(root=str(ROOT), path=str(prepared))])
    report["epoch_read"] = {"peak_rss_mib": rss, "seconds": seconds}
    rss, seconds = peak_rss_mib([sys.executable, "-m", "t2i.cli", "clip-train", "--config", str(config), "--data",
                                 f"prepared:{prepared}", "--max-steps", str(steps), "--out", str(args.work / "clip")])
    report["clip_train"] = {"steps": steps, "batch": 256, "peak_rss_mib": rss, "seconds": seconds}
    # the same training on 5,000 prepared images: what the model, its activations and torch take by themselves
    small = args.work / "small.u8"
    subprocess.run([sys.executable, "-m", "t2i.cli", "prepare", "--data", f"wds:{args.work}/shards/{{00000..00004}}.tar",
                    "--size", "64", "--out", str(small)], check=True, cwd=ROOT, capture_output=True)
    rss, seconds = peak_rss_mib([sys.executable, "-m", "t2i.cli", "clip-train", "--config", str(config), "--data",
                                 f"prepared:{small}", "--max-steps", str(steps), "--out", str(args.work / "clip-small")])
    report["clip_train_5000_images"] = {"steps": steps, "batch": 256, "peak_rss_mib": rss, "seconds": seconds}
    stream(report, specs, args, config, steps)
    save(report, args.out)


def save(report: dict, out: Path) -> None:
    print(json.dumps(report, indent=1), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(report, indent=1) + "\n")


def stream(report: dict, specs: dict, args, config: Path, steps: int) -> None:
    """The streaming figures, into `report`."""
    for run in ("clip-stream", "pipe-stream"):
        shutil.rmtree(args.work / run, ignore_errors=True)
    report["stream_images_per_s"] = {name: stream_rate(spec) for name, spec in specs.items()}
    print("streamed to training: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in report["stream_images_per_s"].items()),
          flush=True)
    report["stream_epoch"] = tree_memory_mib([sys.executable, "-c", STREAM_EPOCH.format(root=str(ROOT), spec=specs["wds"])])
    report["clip_train_stream"] = {"steps": steps, "batch": 256, **tree_memory_mib(
        [sys.executable, "-m", "t2i.cli", "clip-train", "--config", str(config), "--data", specs["wds"], "--stream",
         "--max-steps", str(steps), "--out", str(args.work / "clip-stream")])}
    decoder_steps = 40
    config.write_text(config.read_text() + "decoder: {train: {batch_size: 64, ckpt_every: 1000}}\n")
    report["decoder_train_stream"] = {"steps": decoder_steps, "batch": 64, **tree_memory_mib(
        [sys.executable, "-m", "t2i.cli", "decoder-train", "--clip", str(args.work / "clip-stream"), "--config", str(config),
         "--data", specs["wds"], "--stream", "--stage", "decoder", "--max-steps", str(decoder_steps),
         "--out", str(args.work / "pipe-stream")])}


if __name__ == "__main__":
    main()
