"""The latent stage end to end: the autoencoder (t2i autoencoder-train), a decoder that draws in its latent space,
and flow matching as a diffusion stage's objective."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from unclip.api import UnCLIPPipeline
from unclip.config import AutoencoderModelConfig
from unclip.errors import ConfigError
from unclip.models.autoencoder import Autoencoder, psnr
from unclip.pipeline import Pipeline

runner = CliRunner()
# 28x28 glyphs -> 4x14x14 latents (space-to-depth 2, one level), a decoder at patch 1 over them
AE = {"model": {"image_channels": 1, "image_size": 28, "patch": 2, "widths": [16], "latent_channels": 4},
      "train": {"data": "mnist", "max_steps": 54, "batch_size": 50, "lr": 3e-3, "warmup_steps": 2, "val_size": 100,
                "ckpt_every": 18, "ema_decay": 0.0}}


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


def test_the_autoencoder_folds_levels_and_normalises_its_latents():
    cfg = AutoencoderModelConfig(image_channels=3, image_size=32, patch=2, widths=[8, 16], latent_channels=4)
    ae = Autoencoder(cfg)
    assert ae.factor == 4 and ae.latent_size == 8
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    assert ae.encode(x).shape == (6, 4, 8, 8) and ae.decode(ae.encode(x)).shape == x.shape
    assert ae.decode(ae.encode(x)).abs().max() <= 1.0  # images, clamped
    ae.set_statistics([x[:3], x[3:]])
    z = ae.encode(x).transpose(0, 1).flatten(1)
    assert torch.allclose(z.mean(dim=1), torch.zeros(4), atol=1e-5) and torch.allclose(z.std(dim=1), torch.ones(4), atol=1e-4)
    with pytest.raises(ConfigError, match="not a multiple of its downsampling factor 4"):
        Autoencoder(AutoencoderModelConfig(image_size=30, patch=2, widths=[8, 16]))


def test_psnr_is_measured_over_the_unit_range():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x, x + 0.2), torch.full((2,), 20.0), atol=1e-4)  # 0.1 of the range: MSE 0.01


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory, mnist_dir) -> Path:
    root = tmp_path_factory.mktemp("autoencoder")
    (root / "ae.yaml").write_text(yaml.safe_dump({"autoencoder": AE}))
    r = run("autoencoder-train", "--config", root / "ae.yaml", "--data-dir", mnist_dir, "--out", root / "ae")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "autoencoder saved to" in said and "validation PSNR" in said
    return root / "ae"


def test_the_autoencoder_learns_and_ships_a_sheet_beside_its_weights(autoencoder):
    records = [json.loads(line) for line in (autoencoder / "metrics.jsonl").read_text().splitlines()]
    psnrs = [r["val_psnr"] for r in records if "val_psnr" in r]
    assert len(psnrs) == 3 and psnrs[2] > psnrs[0] + 0.8 and psnrs[2] > 16.0, psnrs
    assert (autoencoder / "samples" / "sheet_0000054.png").is_file()
    r = run("autoencoder-train", "--config", autoencoder.parent / "ae.yaml", "--out", autoencoder)
    assert r.exit_code == 1 and "--overwrite" in r.output  # a finished run is not written over without asking


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory, tiny_pipeline, tiny_config, mnist_dir, autoencoder) -> Path:
    """The tiny pipeline's CLIP and prior, and a decoder drawing in the autoencoder's latents."""
    out = tmp_path_factory.mktemp("latent") / "pipe"
    shutil.copytree(tiny_pipeline / "prior", out / "prior")
    config = yaml.safe_load(tiny_config.read_text())
    config["decoder"]["model"]["patch"] = 1  # 14x14 latents
    (out.parent / "latent.yaml").write_text(yaml.safe_dump(config))
    r = run("decoder-train", "--clip", tiny_pipeline / "clip", "--config", out.parent / "latent.yaml", "--stage", "decoder",
            "--autoencoder", autoencoder, "--data-dir", mnist_dir, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_a_latent_decoder_draws_latents_the_pipeline_decodes_to_pixels(latent_pipeline, autoencoder, tmp_path):
    cfg = yaml.safe_load((latent_pipeline / "decoder" / "config.yaml").read_text())
    assert cfg["model"]["latent"] and (cfg["model"]["image_channels"], cfg["model"]["image_size"]) == (4, 14)
    assert (latent_pipeline / "autoencoder" / "model.safetensors").is_file()  # the pipeline carries its autoencoder
    r = run("generate", "--checkpoints", latent_pipeline, "--prompt", "a 3", "-n", "3", "--steps", "4", "--animate",
            "--out", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    image = Image.open(tmp_path / "gen" / "0000.png")
    assert image.size == (28, 28)
    assert Image.open(tmp_path / "gen" / "denoise.gif").n_frames == 4  # the chain's latents decoded
    r = run("generate", "--checkpoints", latent_pipeline, "--prompt", "a 3", "-n", "2", "--steps", "4",
            "--init-image", tmp_path / "gen" / "0000.png", "--strength", "0.5", "--out", tmp_path / "i2i")
    assert r.exit_code == 0, r.output
    pipe = UnCLIPPipeline.from_pretrained(latent_pipeline, device="cpu")
    generator = lambda: pipe.generator(seed=1)  # noqa: E731
    assert pipe.image_size == 28
    varied = pipe.variations(tmp_path / "gen" / "0000.png", num_images=2, generator=generator(), output_type="pt",
                             steps=4).images
    frames = pipe.interpolate("a 3", "a 7", frames=3, generator=generator(), output_type="pt", steps=4).images
    assert varied.shape == (2, 1, 28, 28) and frames.shape == (3, 1, 28, 28)
    again = pipe.interpolate("a 3", "a 7", frames=3, generator=generator(), output_type="pt", steps=4).images
    assert torch.equal(frames, again)  # seeded


def test_a_latent_pipeline_exports_and_refuses_a_missing_or_foreign_autoencoder(latent_pipeline, tmp_path, mnist_dir):
    r = run("export", "--checkpoints", latent_pipeline, "--out", tmp_path / "shipped")
    assert r.exit_code == 0, r.output
    assert Pipeline.load(tmp_path / "shipped", "cpu").autoencoder is not None  # float16 keeps the fingerprint
    missing = tmp_path / "missing"
    shutil.copytree(latent_pipeline, missing)
    shutil.rmtree(missing / "autoencoder")
    r = run("generate", "--checkpoints", missing, "--prompt", "a 3", "-n", "1", "--out", tmp_path / "g")
    assert r.exit_code == 1 and "draws in an autoencoder's latent space, but it has no autoencoder/" in r.output
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"autoencoder": {**AE, "train": {**AE["train"], "max_steps": 2}}}))
    r = run("autoencoder-train", "--config", tmp_path / "other.yaml", "--data-dir", mnist_dir, "--out", missing / "autoencoder")
    assert r.exit_code == 0, r.output
    r = run("generate", "--checkpoints", missing, "--prompt", "a 3", "-n", "1", "--out", tmp_path / "g")
    assert r.exit_code == 1 and "is not the autoencoder its decoder was trained with" in r.output


def test_a_flow_matching_decoder_trains_and_samples_with_every_sampler(tiny_pipeline, tiny_config, mnist_dir, tmp_path):
    out = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline / "prior", out / "prior")
    config = yaml.safe_load(tiny_config.read_text())
    config["decoder"]["model"].update(prediction="flow", schedule="rectified", min_snr_gamma=5.0)
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(config))
    train = ("decoder-train", "--clip", tiny_pipeline / "clip", "--config", tmp_path / "flow.yaml", "--stage", "decoder",
             "--data-dir", mnist_dir, "--out", out)
    r = run(*train)
    assert r.exit_code == 1 and "flow matching (prediction: flow) weights its timesteps" in " ".join(r.output.split())
    config["decoder"]["model"]["min_snr_gamma"] = None
    (tmp_path / "flow.yaml").write_text(yaml.safe_dump(config))
    r = run(*train, "--overwrite")
    assert r.exit_code == 0, r.output
    losses = [json.loads(line)["loss"] for line in (out / "decoder" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert all(0.0 < loss < 10.0 for loss in losses)  # velocity targets: eps - x0, of variance about 2
    for sampler in ("ddim", "dpmpp", "ddpm"):
        r = run("generate", "--checkpoints", out, "--prompt", "a 3", "-n", "2", "--steps", "4", "--sampler", sampler,
                "--out", tmp_path / sampler)
        assert r.exit_code == 0, r.output
        assert Image.open(tmp_path / sampler / "0000.png").size == (28, 28)
