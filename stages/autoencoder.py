"""`t2i autoencoder-train`: the autoencoder a latent decoder draws in, on images alone (captions unread).

Its loss is the L1 reconstruction error of a sample of the posterior plus `kl_weight` times the KL to N(0, I)
(Rombach et al. 2022 add a perceptual and an adversarial term; at 64 px on emoji L1 alone is what we measured:
docs/results/latent.md). Validation reports the PSNR of reconstructions from the posterior's mean; the sheet shows
validation images above their reconstructions. Before each validation and save, the latent statistics are taken
from fixed training images (`Autoencoder.set_statistics`), so the weights shipped normalise their latents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from t2i.stages.distributed import training_device
from t2i.stages.samples import save_sheet
from t2i.stages.trainer import VAL_IMAGES, Stage, check_out, fit, fixed_images, nothing_to_resume, seeded
from unclip.config import AutoencoderConfig, load_config, merge
from unclip.data import CaptionedImages, load_split
from unclip.data.stream import StreamedCaptions
from unclip.images import to_uint8
from unclip.models.autoencoder import Autoencoder, psnr

SHOWN = 8  # validation images in the sample sheet
STATISTICS_IMAGES = 1024  # fixed training images the latent statistics are taken over


def autoencoder_stage(cfg: AutoencoderConfig, data: CaptionedImages | StreamedCaptions, val: CaptionedImages) -> Stage:
    t, m = cfg.train, cfg.model
    device = training_device(t.device)
    model = seeded(t.seed, lambda: Autoencoder(m)).to(device, memory_format=torch.channels_last)  # as the decoder's

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x = batch.pixels().to(device)
        reconstruction, kl = module(x)
        l1 = (reconstruction - x).abs().mean()
        return l1 + m.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}

    def val_batches(shipped: Autoencoder):
        n = min(VAL_IMAGES, len(val))
        for start in range(0, n, t.batch_size):
            x = val.pixels(torch.arange(start, min(n, start + t.batch_size))).to(device)
            yield x, shipped.reconstruct(x)

    @torch.no_grad()
    def validate(shipped: Autoencoder) -> dict:
        shipped.eval()
        scores = torch.cat([psnr(x, y) for x, y in val_batches(shipped)])
        return {"val_psnr": scores.mean().item()}

    calibration = None

    def finalize(shipped: Autoencoder) -> None:
        nonlocal calibration
        if calibration is None:
            calibration = fixed_images(data, STATISTICS_IMAGES, t.seed)
        shipped.set_statistics(calibration.pixels(torch.arange(i, min(i + t.batch_size, len(calibration)))).to(device)
                               for i in range(0, len(calibration), t.batch_size))

    @torch.no_grad()
    def sample(shipped: Autoencoder, step: int, out: Path) -> torch.Tensor:
        x = val.pixels(torch.arange(min(SHOWN, len(val)))).to(device)
        return save_sheet([to_uint8(x), to_uint8(shipped.eval().reconstruct(x))], out, step)

    return Stage("autoencoder", model, cfg, data, loss, validate=validate, finalize=finalize, sample=sample,
                 metrics_shown=["loss", "val_psnr"], objective="val_psnr")


def autoencoder_config(config_path: Optional[Path], flags: dict) -> AutoencoderConfig:
    return merge(load_config(AutoencoderConfig, config_path), flags)


def train_autoencoder(cfg: AutoencoderConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    if check_out(Path(out), "autoencoder", resume, overwrite) == "finished":  # before the data loads
        return nothing_to_resume(Path(out), "autoencoder")
    m, t = cfg.model, cfg.train
    training_device(t.device)  # joins the process group (torchrun) before anything is built
    Autoencoder(m)  # a size its factor does not divide is refused before minutes of data
    data = load_split(t, "train", m.image_channels, m.image_size)
    val = load_split(t, "val", m.image_channels, m.image_size)
    return fit(autoencoder_stage(cfg, data, val), t, Path(out), resume, overwrite=overwrite)
