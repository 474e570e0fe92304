"""torchrun-style data parallel training on CPU (gloo): two processes behave like one with the whole batch."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
import torch.nn.functional as F

from t2i.stages import distributed as dist
from unclip.models.clip import contrastive_loss
from t2i.stages.runs import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def leave() -> None:
    """Leave the process group once every rank is done with its collectives: a rank destroying the group while
    the other's gloo threads still work on the last all-reduce aborted now and then (SIGABRT, "terminate called
    without an active exception")."""
    td.barrier()
    td.destroy_process_group()


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])


def loss_worker(rank: int, world: int, port: int, out: str) -> None:
    join(rank, world, port)
    td.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TwoTowers())
    x, y, groups = batch()
    part = slice(rank * 4, rank * 4 + 4)
    img, txt = model(x[part], y[part])
    loss = contrastive_loss(dist.all_gather_with_grad(img), dist.all_gather_with_grad(txt), torch.tensor(5.0),
                            dist.all_gather(groups[part]))
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]}, Path(out) / f"{rank}.pt")
    leave()


@pytest.mark.slow
def test_gathered_loss_and_gradients_match_one_process(tmp_path):
    mp.spawn(loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = TwoTowers()
    x, y, groups = batch()
    loss = contrastive_loss(*model(x, y), torch.tensor(5.0), groups)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach())
        for a, b in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(a, b.grad, atol=1e-6, rtol=1e-5)


def train_worker(rank: int, world: int, port: int, kind: str, pipeline: str, mnist_dir: str, out: str) -> None:
    join(rank, world, port)
    from t2i.stages.clip import clip_stage
    from t2i.stages.decoder import decoder_stage
    from t2i.stages.frozen_clip import FrozenClip
    from t2i.stages.prior import prior_stage
    from t2i.stages.trainer import fit
    from tests.conftest import TINY
    from unclip.config import ClipConfig, DecoderConfig, PriorConfig, TrainConfig, merge

    steps = {"train": {"max_steps": 4, "batch_size": 40, "data_dir": mnist_dir, "ckpt_every": 2}}
    if kind == "clip":
        stage = clip_stage(merge(merge(ClipConfig(), TINY["clip"]), steps))
    elif kind == "autoencoder":  # images alone: the training and validation splits
        from t2i.stages.autoencoder import autoencoder_stage
        from unclip.config import AutoencoderConfig
        from unclip.data import load_split

        cfg = merge(AutoencoderConfig(), {"model": {"image_channels": 1, "image_size": 28, "widths": [8]},
                                          "train": {**steps["train"], "data": "mnist", "val_size": 100}})
        stage = autoencoder_stage(cfg, *(load_split(cfg.train, split, 1, 28) for split in ("train", "val")))
    else:
        frozen = FrozenClip.load(Path(pipeline) / "clip", TrainConfig(data_dir=mnist_dir, val_size=100))
        cls, build = (PriorConfig, prior_stage) if kind == "prior" else (DecoderConfig, decoder_stage)
        stage = build(merge(merge(cls(), TINY[kind]), steps), frozen)
    fit(stage, stage.config.train, Path(out) / "run")
    torch.save(stage.model.state_dict(), Path(out) / f"rank{rank}.pt")
    leave()


@pytest.mark.parametrize("kind", ["clip", "prior", "decoder", "autoencoder"])
@pytest.mark.slow
def test_two_processes_train_in_lockstep_and_write_one_checkpoint(kind, tiny_pipeline, mnist_dir, tmp_path):
    mp.spawn(train_worker, args=(2, free_port(), kind, str(tiny_pipeline), str(mnist_dir), str(tmp_path)), nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir() if p.is_file())
    assert names == ["config.yaml", "metrics.jsonl", "model.safetensors", "run.json", "train_state.pt"]
    steps = read_metrics(run)[0]
    assert len(steps) == 4  # rank 0 alone logs


def equivalence_worker(rank: int, world: int, port: int, mnist_dir: str, out: str) -> None:
    join(rank, world, port)
    from t2i.stages.clip import clip_stage
    from t2i.stages.trainer import fit
    from tests.conftest import TINY
    from unclip.config import ClipConfig, merge

    cfg = merge(merge(ClipConfig(), TINY["clip"]), {"train": {"max_steps": 3, "batch_size": 40, "data_dir": mnist_dir}})
    stage = clip_stage(cfg)
    fit(stage, cfg.train, Path(out) / f"run{world}")
    if rank == 0:
        torch.save(stage.model.state_dict(), Path(out) / f"world{world}.pt")
    if world > 1:
        leave()


@pytest.mark.slow
def test_two_processes_of_half_the_batch_train_clip_like_one(mnist_dir, tmp_path):
    """The promise of docs/guides/train-your-data.md: N processes of batch B/N train like one of batch B, BatchNorm included
    (statistics over the global batch, captions a function of the example, not of the rank)."""
    equivalence_worker(0, 1, 0, str(mnist_dir), str(tmp_path))
    mp.spawn(equivalence_worker, args=(2, free_port(), str(mnist_dir), str(tmp_path)), nprocs=2)
    one, two = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world2.pt")
    losses = [[r["loss"] for r in read_metrics(tmp_path / f"run{w}")[0]] for w in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    stats = [k for k in one if "running" in k]
    # BatchNorm saw the same batches; its saved statistics are recomputed for the final weights (PreciseBN),
    # so they differ as little as those weights do (below)
    assert stats and all(torch.allclose(one[k], two[k], atol=1e-3) for k in stats)
    # Sums in another order differ in the last bits; Adam's first steps move a weight by about lr whatever the size
    # of its gradient, so a near-zero gradient's noise shows. Tolerance: all but 0.01% of weights within 1e-4.
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one if one[k].is_floating_point()])
    assert (diffs > 1e-4).float().mean() < 1e-4 and diffs.max() < 3e-3
