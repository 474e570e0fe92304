"""Users' own captioned data: COCO, Hugging Face parquet, webdataset shards, and `t2i prepare` + `prepared:`,
each built here from drawn digits; every bad input one line or a counted skip."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from tests.conftest import TINY, draw_glyphs
from unclip.data import load_dataset
from unclip.errors import UserError

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
pytest.importorskip("webdataset", reason="webdataset is not installed")
import pyarrow as pa  # noqa: E402

runner = CliRunner()
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def jpeg(digit: np.ndarray, colour=(255, 96, 32)) -> bytes:
    """A glyph as a 40x30 colour JPEG (not square: the loader takes the centre)."""
    image = Image.fromarray(digit).resize((40, 30)).convert("RGB")
    tinted = Image.fromarray((np.asarray(image) * (np.array(colour) / 255)).astype(np.uint8))
    buffer = io.BytesIO()
    tinted.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def glyphs(n: int, seed: int):
    images, labels = draw_glyphs(n, seed)
    return [jpeg(im) for im in images], [f"an orange {WORDS[d]} number {i}" for i, d in enumerate(labels)]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for split, n, seed in (("train2017", 40, 0), ("val2017", 12, 1)):
        (root / split).mkdir()
        images, captions = glyphs(n, seed)
        entries, annotations = [], []
        for i, (data, caption) in enumerate(zip(images, captions)):
            (root / split / f"{i:012d}.jpg").write_bytes(data)
            entries.append({"id": i, "file_name": f"{i:012d}.jpg"})
            annotations += [{"image_id": i, "id": 10 * i + k, "caption": f"{caption}, take {k}"} for k in range(5)]
        entries.append({"id": 999, "file_name": "missing.jpg"})  # named, never written: skipped and counted
        annotations.append({"image_id": 999, "id": 9999, "caption": "a ghost"})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parquet")
    images, captions = glyphs(30, 2)
    for part, (lo, hi) in enumerate(((0, 16), (16, 30))):  # two files as `datasets` writes them, row groups of 8
        table = pa.table({"img": [{"bytes": b, "path": f"{i}.jpg"} for i, b in zip(range(lo, hi), images[lo:hi])],
                          "caption": captions[lo:hi]})
        pq.write_table(table, folder / f"train-{part:05d}-of-00002.parquet", row_group_size=8)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    images, captions = glyphs(30, 3)
    for shard in range(3):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 10, shard * 10 + 10):
                data = b"\xff\xd8 corrupt" if i == 7 else images[i]  # a corrupt member: skipped and counted
                meta = (b"txt", captions[i].encode()) if i % 2 else (b"json", json.dumps({"caption": captions[i]}).encode())
                for suffix, payload in (("jpg", data), (meta[0].decode(), meta[1])):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def test_coco_uses_all_five_captions_skips_missing_files_and_tests_on_val2017(coco):
    train = load_dataset(f"coco:{coco}", "train", channels=3, size=32, val_size=4)
    val = load_dataset(f"coco:{coco}", "val", channels=3, size=32, val_size=4)
    test = load_dataset(f"coco:{coco}", "test", channels=3, size=32)
    assert (len(train), len(val), len(test)) == (36, 4, 12)  # the missing image skipped; val2017 is the test split
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    drawn = {c for seed in range(40) for c in train.captions(torch.tensor([0]), seed)}
    assert len(drawn) == 5 and all(c.endswith(f"take {k}") for c, k in zip(sorted(drawn), range(5)))
    red, green = train.images[:, 0].float().mean(), train.images[:, 1].float().mean()
    assert red > 1.5 * green  # colour kept: the glyphs are orange


def test_parquet_with_named_columns_and_its_errors(parquet, tmp_path):
    data = load_dataset(f"parquet:{parquet}", "train", channels=1, size=28, val_size=3, columns=("img", "caption"))
    test = load_dataset(f"parquet:{parquet}", "test", channels=1, size=28, val_size=3, columns=("img", "caption"))
    assert (len(data), len(test)) == (27, 3)  # no test split of its own: the validation slice
    assert data.captions(torch.tensor([0]), 0)[0].startswith("an orange")
    with pytest.raises(UserError, match=r"has no column 'image' \(its columns: img, caption\); name it as image_column"):
        load_dataset(f"parquet:{parquet}", "train", channels=1, size=28)
    r = run("clip-train", "--data", f"parquet:{parquet}", "--max-steps", 1, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "name it as --image-column" in r.output  # the CLI names its flag
    with pytest.raises(UserError, match="no .parquet file"):
        load_dataset(f"parquet:{tmp_path}", "train")


def test_shards_split_among_workers_once_each_and_count_a_corrupt_member(shards, caplog):
    from unclip.data.sources import Shards, decode_source

    for workers in (0, 2):
        source = Shards(f"{shards}/{{00000..00002}}.tar", 3, 16)
        captions = [c[0] for _, caps in decode_source(source, workers) for c in caps]
        assert len(captions) == 29 and len(set(captions)) == 29  # every sample once, across workers too
        assert source.skips == {"not a readable image (UnidentifiedImageError)": 1}
    with pytest.raises(UserError, match="matches no shard"):
        Shards(f"{shards}/{{00010..00012}}.tar")


def test_prepare_then_train_from_the_memory_mapped_file(shards, tmp_path):
    out = tmp_path / "scenes.u8"
    r = run("prepare", "--data", f"wds:{shards}/{{00000..00002}}.tar", "--size", 32, "--out", out)
    assert r.exit_code == 0, r.output
    assert "prepared 29 images" in r.output and "1 not a readable image" in r.output
    assert out.stat().st_size == 29 * 3 * 32 * 32 and json.loads((tmp_path / "scenes.u8.json").read_text())["count"] == 29
    prepared = load_dataset(f"prepared:{out}", "train", channels=3, size=32, val_size=3)
    memory = load_dataset(f"wds:{shards}/{{00000..00002}}.tar", "train", channels=3, size=32, val_size=3)
    assert type(prepared.images).__name__ == "StoredImages" and len(prepared) == len(memory) == 27
    idx = torch.tensor([5, 0, 26, 5])  # any order, repeats: rows read from disk as asked
    assert torch.equal(prepared.images[idx], memory.images[idx])
    assert prepared.captions(idx, 1) == memory.captions(idx, 1)
    assert prepared.images[idx].shape == (4, 3, 32, 32)
    grey = load_dataset(f"prepared:{out}", "val", channels=1, size=16, val_size=3)  # converted as read
    assert grey.images[torch.arange(2)].shape == (2, 1, 16, 16)  # val: min(val_size, a tenth)
    config = {"clip": {**TINY["clip"], "model": {**TINY["clip"]["model"], "image_channels": 3, "image_size": 32},
                       "train": {**TINY["clip"]["train"], "val_size": 3, "batch_size": 8}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = run("clip-train", "--config", tmp_path / "c.yaml", "--data", f"prepared:{out}", "--max-steps", 4,
            "--out", tmp_path / "clip")
    assert r.exit_code == 0, r.output
    assert "val_retrieval" in (tmp_path / "clip" / "metrics.jsonl").read_text()


def test_bad_sources_are_one_line(coco, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text("{broken")
    for spec, message in [(f"coco:{tmp_path}", "does not parse as JSON"),
                          (f"coco:{tmp_path / 'nothing'}", "no "),
                          (f"wds:{tmp_path}/{{0..3}}.tar", "matches no shard"),
                          (f"prepared:{tmp_path / 'none.u8'}", "no none.u8.json beside it")]:
        r = run("clip-train", "--data", spec, "--max-steps", 1, "--out", tmp_path / "run")
        assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, (spec, r.output)
    r = run("clip-train", "--data", "mnist", "--stream", "--max-steps", 1, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "--stream is for coco:, parquet:, wds: sources, not mnist" in r.output
    r = run("prepare", "--data", "mnist", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "t2i prepare reads coco:ROOT, parquet:PATH, wds:PATTERN" in r.output


@pytest.mark.parametrize("kind", ["prepared", "stream"])
def test_resume_continues_mid_epoch_exactly(kind, shards, tmp_path):
    """A run cut mid-epoch and resumed ends with the uninterrupted run's weights: a prepared source's batches are
    rows by index, a stream's lanes start again at the batch they were to draw, so the epoch goes on where it
    stopped."""
    from safetensors.torch import load_file

    from t2i.stages.clip import clip_stage
    from t2i.stages.trainer import fit
    from tests.stages.test_trainer import interrupt_at
    from unclip.config import ClipConfig, merge

    pattern = f"wds:{shards}/{{00000..00002}}.tar"
    data = {"data": pattern, "stream": True, "workers": 2}
    if kind == "prepared":
        out = tmp_path / "p.u8"
        assert run("prepare", "--data", pattern, "--size", 16, "--out", out).exit_code == 0
        data = {"data": f"prepared:{out}"}
    cfg = merge(ClipConfig(), {**TINY["clip"], "model": {**TINY["clip"]["model"], "image_size": 16},
                               "train": {**TINY["clip"]["train"], **data, "batch_size": 8, "val_size": 3,
                                         "max_steps": 6, "ckpt_every": 2}})
    fit(clip_stage(cfg), cfg.train, tmp_path / "whole")  # 27 images, 3 steps an epoch: 6 steps cross an epoch
    last = fit(interrupt_at(clip_stage(cfg), 2), cfg.train, tmp_path / "cut")  # stops after step 3, mid-epoch
    assert last["interrupted"] and last["step"] == 3  # odd: the resumed stream starts with its second lane
    fit(clip_stage(cfg), cfg.train, tmp_path / "cut", resume=True)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_a_stream_deals_each_shard_to_one_lane_and_resumes_at_its_batch(shards):
    """Three shards, three processes: each reads one shard (the held-out first records skipped), its records once
    a cycle; a corrupt record is replaced in its batch and counted. With two workers, a stream started at step 3
    draws what the stream from step 0 drew there."""
    from unclip.data.stream import StreamedCaptions

    spec = f"wds:{shards}/{{00000..00002}}.tar"
    data = load_dataset(spec, "train", channels=3, size=16, val_size=3, stream=True)
    val = load_dataset(spec, "val", channels=3, size=16, val_size=3, stream=True)
    assert isinstance(data, StreamedCaptions) and len(data) == 27
    assert val.ids.tolist() == [0, 1, 2] and val.images.shape == (3, 3, 16, 16)
    ids = {rank: [i for b in itertools.islice(data.batches(0, 0, 5, rank=rank, world=3, workers=0), 2)
                  for i in b.ids.tolist()] for rank in range(3)}
    assert sorted(ids[1]) == list(range(10, 20)) and sorted(ids[2]) == list(range(20, 30))  # a cycle each
    assert set(ids[0][:7]) == {3, 4, 5, 6, 8, 9} and all(3 <= i < 10 for i in ids[0])  # record 7 replaced
    assert set(data.skips) == {"not a readable image (UnidentifiedImageError)"}
    batches = list(itertools.islice(data.batches(seed=0, start_step=0, batch_size=5, workers=2), 6))
    assert all(b.images.shape == (5, 3, 16, 16) for b in batches)
    assert batches[1].captions(seed=0)[0].startswith("an orange")
    later = list(itertools.islice(data.batches(seed=0, start_step=3, batch_size=5, workers=2), 3))
    for a, b in zip(batches[3:], later):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    with pytest.raises(UserError, match="cannot give each of 4 readers"):
        next(data.batches(seed=0, start_step=0, batch_size=5, workers=4))


@pytest.mark.slow
def test_streamed_pipeline_trains_every_stage_from_the_cli(shards, tmp_path):
    """clip-train, decoder-train (the prior reads the stream once for its embeddings) and upsampler-train on a
    streamed source, end to end."""
    spec = f"wds:{shards}/{{00000..00002}}.tar"
    model = {**TINY["clip"]["model"], "image_channels": 3, "image_size": 16}
    small = {"batch_size": 6, "val_size": 3, "warmup_steps": 1, "max_steps": 2}
    config = {"clip": {**TINY["clip"], "model": model, "train": {**TINY["clip"]["train"], **small}},
              "prior": {**TINY["prior"], "train": {**TINY["prior"]["train"], **small}},
              "decoder": {**TINY["decoder"], "model": {**TINY["decoder"]["model"], "image_size": 8},
                          "train": {**TINY["decoder"]["train"], **small}},
              "upsampler": {"model": {"widths": [8, 16], "image_size": 16, "timesteps": 50}, "train": small}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", tmp_path / "c.yaml", "--data", spec, "--stream", "--workers", 1]
    r = run("clip-train", *common, "--out", tmp_path / "clip")
    assert r.exit_code == 0, r.output
    r = run("decoder-train", "--clip", tmp_path / "clip", *common, "--out", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    r = run("upsampler-train", "--pipeline", tmp_path / "pipe", *common)
    assert r.exit_code == 0, r.output
    for stage in ("prior", "decoder", "upsampler"):
        assert json.loads((tmp_path / "pipe" / stage / "run.json").read_text())["finished"], stage
    r = run("generate", "--checkpoints", tmp_path / "pipe", "--prompt", "an orange seven", "-n", 2,
            "--out", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "gen" / "grid.png") as grid:
        assert grid.mode == "RGB"


def stream_worker(rank: int, world: int, port: int, pattern: str, out: str) -> None:
    from t2i.stages.clip import clip_stage
    from t2i.stages.trainer import fit
    from tests.stages.test_distributed import join, leave
    from unclip.config import ClipConfig, merge

    join(rank, world, port)
    cfg = merge(ClipConfig(), {**TINY["clip"], "model": {**TINY["clip"]["model"], "image_size": 16},
                               "train": {**TINY["clip"]["train"], "data": pattern, "stream": True, "workers": 0,
                                         "batch_size": 8, "val_size": 3, "max_steps": 4}})
    stage = clip_stage(cfg)
    seen, inner = [], stage.loss

    def loss(batch, step, module):
        seen.extend(batch.ids.tolist())
        return inner(batch, step, module)

    stage.loss = loss
    fit(stage, cfg.train, Path(out) / "run")
    torch.save({"ids": seen, "weights": stage.model.state_dict()}, Path(out) / f"rank{rank}.pt")
    leave()


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards_in_lockstep(shards, tmp_path):
    """Under torchrun, each process streams its own lanes' shards (three shards, two lanes: 0 and 2, then 1)
    and both end with the same weights."""
    import torch.multiprocessing as mp

    from tests.stages.test_distributed import free_port

    mp.spawn(stream_worker, args=(2, free_port(), f"wds:{shards}/{{00000..00002}}.tar", str(tmp_path)), nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(a["ids"]) == len(b["ids"]) == 16  # 4 steps of 4 examples each
    assert all(3 <= i < 10 or 20 <= i < 30 for i in a["ids"]) and all(10 <= i < 20 for i in b["ids"])
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], msg=k)
