"""The cascade's last stage: a diffusion upsampler from the decoder's size to the pipeline's output size.

It needs neither CLIP nor the captions (DALL-E 2's upsamplers are unconditional but for the low-resolution
image), only the images: each training image shrunk to the decoder's size is its condition.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from t2i.stages.distributed import training_device
from t2i.stages.stage_two import stage_config
from t2i.stages.samples import chain_recorder, save_sheet
from t2i.stages.trainer import Stage, check_out, fit, held_out_loss, nothing_to_resume, seeded
from unclip.checkpoint import CONFIG_FILE
from unclip.config import ClipConfig, DecoderConfig, UpsamplerConfig, load_config
from unclip.data import CaptionedImages, load_split
from unclip.data.stream import StreamedCaptions
from unclip.errors import CheckpointError, ConfigError
from unclip.images import resize, to_uint8
from unclip.components.upsampler import degrade, sampling_level
from unclip.models.upsampler import Upsampler
from unclip.components.upsampler import upsample, upsampler_diffusion
from unclip.options import SamplingOptions

SHOWN = 8  # validation images in the sample sheet


def upsampler_stage(cfg: UpsamplerConfig, data: CaptionedImages | StreamedCaptions, val: CaptionedImages) -> Stage:
    t, m = cfg.train, cfg.model
    device = training_device(t.device)
    model = seeded(t.seed, lambda: Upsampler(m)).to(device, memory_format=torch.channels_last)  # as the decoder's
    base = upsampler_diffusion(model, cfg, device)
    levels = max(1, round(m.aug_max * m.timesteps))  # augmentation levels s drawn from [0, levels)

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x0 = batch.pixels().to(device)
        s = torch.randint(0, levels, (len(batch),), device=device)
        sigma = float(torch.rand(())) * m.blur_max
        low = degrade(resize(x0, m.low_size), m.image_size, s, base.ac, sigma)
        return replace(base, net=module).loss(x0, (low, s), m.cond_drop, min_snr_gamma=m.min_snr_gamma), {}

    def validate(shipped: Upsampler) -> dict:
        """The loss on validation images, conditioned as sampling conditions (no blur, level `aug_level`)."""
        diffusion = upsampler_diffusion(shipped.eval(), cfg, device)

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x0 = val.pixels(idx).to(device)
            s = sampling_level(m, len(idx), device)
            low = degrade(resize(x0, m.low_size), m.image_size, s, diffusion.ac, generator=generator)
            return diffusion.loss(x0, (low, s), 0.0, generator)

        return {"val_loss": held_out_loss(batch_loss, len(val), t.batch_size, device)}

    def sample(shipped: Upsampler, step: int, out: Path) -> torch.Tensor:
        """The stage's sheet (stages/samples.py), a column per validation image: the original, its low-resolution
        version enlarged, then the upsampler's chain from that."""
        generator = torch.Generator(device).manual_seed(0)
        x0 = val.pixels(torch.arange(min(SHOWN, len(val)))).to(device)
        low = resize(x0, m.low_size)
        options = SamplingOptions()
        callback, shots = chain_recorder(options.upsampler_steps)
        final = upsample(upsampler_diffusion(shipped, cfg, device), cfg, low, options.sampler, options.upsampler_steps,
                         generator, callback=callback)
        enlarged = torch.nn.functional.interpolate(low, size=m.image_size, mode="nearest")
        return save_sheet([to_uint8(x) for x in [x0, enlarged, *shots, final]], out, step)

    return Stage("upsampler", model, cfg, data, loss, validate=validate, sample=sample,
                 metrics_shown=["loss", "val_loss"], objective="val_loss")


def upsampler_setup(pipeline: Path, config_path: Optional[Path], flags: dict,
                    eval_split: str = "val") -> tuple[UpsamplerConfig, CaptionedImages | StreamedCaptions, CaptionedImages]:
    """The config of `pipeline/upsampler/` for the pipeline's decoder: from its size (`low_size`) to `image_size`,
    on the data CLIP was trained on unless the config or flags say otherwise; the training data and the split
    it is validated on."""
    pipeline = Path(pipeline)
    for stage in ("clip", "decoder"):
        if not (pipeline / stage / CONFIG_FILE).is_file():
            raise CheckpointError(f"--pipeline {pipeline}: no {stage}/{CONFIG_FILE} (train CLIP and the decoder first)")
    clip_cfg = load_config(ClipConfig, pipeline / "clip" / CONFIG_FILE)
    decoder = load_config(DecoderConfig, pipeline / "decoder" / CONFIG_FILE).model
    cfg = stage_config(UpsamplerConfig, "upsampler", clip_cfg, config_path, flags)
    cfg = replace(cfg, model=replace(cfg.model, image_channels=decoder.image_channels, low_size=decoder.image_size))
    m, t = cfg.model, cfg.train
    training_device(t.device)  # joins the process group (torchrun) before anything is built
    if m.image_size <= m.low_size:
        raise ConfigError(f"upsampler image_size {m.image_size} must be larger than the decoder's {m.low_size}")
    return cfg, load_split(t, "train", m.image_channels, m.image_size), load_split(t, eval_split, m.image_channels,
                                                                                  m.image_size)


def train_upsampler(pipeline: Path, config_path: Optional[Path], flags: dict, resume: bool = False,
                    overwrite: bool = False) -> dict:
    if check_out(Path(pipeline) / "upsampler", "upsampler", resume, overwrite) == "finished":  # before the data loads
        return nothing_to_resume(Path(pipeline) / "upsampler", "upsampler")
    cfg, data, val = upsampler_setup(pipeline, config_path, flags)
    return fit(upsampler_stage(cfg, data, val), cfg.train, Path(pipeline) / "upsampler", resume, overwrite=overwrite)
