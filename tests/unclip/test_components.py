"""The registries: stages (unclip/components), samplers (unclip/diffusion/sampling.py) and data sources
(unclip/data): adding one is a module or a function plus a line, and everything that asks reads the registry."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from unclip import components
from unclip.checkpoint import export_pipeline, save_checkpoint
from unclip.components import STAGES, StageSpec
from unclip.config import TrainConfig, load_config, sections
from unclip.pipeline import Pipeline


@dataclass
class ToyModelConfig:
    width: int = 4


@dataclass
class ToyConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip_fingerprint: str = ""


class Toy(nn.Module):
    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.scale = nn.Parameter(torch.full((cfg.width,), 2.0))


def test_a_new_stage_is_a_spec_in_the_registry(tiny_pipeline, tmp_path, monkeypatch):
    spec = StageSpec("toy", ToyConfig, lambda cfg, clip_cfg: Toy(cfg.model), clip_bound=False, maximize=("val_toy",))
    monkeypatch.setitem(STAGES, "toy", spec)
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, folder)
    save_checkpoint(folder / "toy", Toy(ToyModelConfig(width=3)), ToyConfig(model=ToyModelConfig(width=3)))
    pipe = Pipeline.load(folder, "cpu")  # the loader found it in the registry
    assert isinstance(pipe.toy, Toy) and pipe.toy.scale.shape == (3,) and pipe.toy_config.model.width == 3
    assert "toy" in sections()  # a pipeline YAML may hold a `toy:` section
    (tmp_path / "p.yaml").write_text("toy:\n  model: {width: 5}\n")
    assert load_config(ToyConfig, tmp_path / "p.yaml").model.width == 5
    export_pipeline(folder, tmp_path / "shipped")  # export ships it
    assert (tmp_path / "shipped" / "toy" / "model.safetensors").is_file()
    assert spec.objective == "val_toy" and spec.direction == "maximize"
    assert Pipeline.load(tiny_pipeline, "cpu").toy is None  # a folder without it


def test_the_registry_says_what_the_rest_of_t2i_reads():
    assert list(STAGES) == ["clip", "text", "prior", "autoencoder", "decoder", "upsampler", "layout"]
    assert components.REQUIRED == ("clip", "prior", "decoder")
    assert {n: s.direction for n, s in STAGES.items() if n != "text"} == {  # text/ is imported, never trained
        "clip": "maximize", "prior": "maximize", "autoencoder": "maximize", "decoder": "minimize",
        "upsampler": "minimize", "layout": "minimize"}
    assert [n for n in STAGES if STAGES[n].clip_bound] == ["prior", "decoder", "layout"]
    from t2i.stages.trainer import direction

    assert direction("val_retrieval") == direction("prior_cosine") == "maximize" and direction("val_loss") == "minimize"


def test_a_new_sampler_is_a_function_in_the_registry(monkeypatch):
    from typer.testing import CliRunner

    import unclip.diffusion.sampling as sampling
    from unclip.diffusion.schedule import alphas_cumprod
    from unclip.options import SamplingOptions, validate

    calls = []

    def sample_x0_once(denoise, x, ac, timesteps, generator=None, callback=None):  # the shared signature
        calls.append(timesteps)
        return denoise(x, torch.full((x.shape[0],), timesteps[0]))

    monkeypatch.setitem(sampling.SAMPLERS, "once", sampling.Sampler(sample_x0_once))
    ac = alphas_cumprod("cosine", 50)
    out = sampling.sample("once", lambda x, t: torch.zeros_like(x), torch.randn(2, 3), ac, 5)
    assert torch.equal(out, torch.zeros(2, 3)) and calls == [sampling.spaced_timesteps(50, 5)]
    assert validate(SamplingOptions(sampler="once")).sampler == "once"
    with pytest.raises(Exception, match="unknown sampler 'nope': use one of ddpm, ddim, dpmpp, once"):
        validate(SamplingOptions(sampler="nope"))
    from t2i.cli import app

    r = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200)
    assert "ddpm|ddim|dpmpp" in r.output  # the CLI's choices were built from the registry when it was imported


def test_a_new_data_source_is_an_opener_in_the_registry(monkeypatch):
    import unclip.data as data
    from unclip.data import CaptionedImages, Kind, load_dataset
    from unclip.data.captions import TextCaptions

    def toy(name, where, split, request):
        n = int(where)
        images = torch.zeros(n, request.channels, request.size, request.size, dtype=torch.uint8)
        return data.carve(CaptionedImages(images, torch.arange(n), TextCaptions([[f"item {i}"] for i in range(n)])),
                          split, request.val_size)

    monkeypatch.setitem(data.SOURCES, "toy", Kind(toy, "toy:N"))
    train, val = (load_dataset("toy:40", split, channels=3, size=8, val_size=10) for split in ("train", "val"))
    assert (len(train), len(val)) == (36, 4) and train.images.shape[1:] == (3, 8, 8)
    with pytest.raises(Exception, match="unknown dataset 'toy'.*toy:N") as e:
        load_dataset("toy")  # it takes a value after the colon
    assert e.value.param == "data"
    with pytest.raises(Exception, match="stream is for coco:, parquet:, wds: sources"):
        load_dataset("toy:40", stream=True)
