"""Stage two, part two: the decoder, CLIP image embedding -> image, with sample grids while training."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from stages.clip import caption_seed
from stages.frozen_clip import FrozenClip
from stages.trainer import Stage, fit, seeded
from unclip.config import DecoderConfig
from unclip.diffusion.models import Diffusion
from unclip.images import grid, nearest_steps, resize, save_png, to_uint8
from unclip.models.unet import UNet
from stages.distributed import training_device
from unclip.pipeline import (SamplingOptions, decode, decoder_condition, decoder_diffusion, sample_image_embeddings,
                             text_condition)

PER_PROMPT = 6


def save_samples(frozen: FrozenClip, decoder: Diffusion, cfg: DecoderConfig, prior: Optional[Diffusion],
                 step: int, out: Path) -> None:
    """A grid for fixed prompts (through the prior when there is one; else reconstructions of validation
    images, the originals in the first column) and a strip of the predicted x0 along one chain."""
    device = frozen.image_emb.device
    generator = torch.Generator(device).manual_seed(0)
    options = SamplingOptions()  # what `t2i generate` draws with
    if prior is not None:
        prompts = [p for p in frozen.fixed_captions() for _ in range(PER_PROMPT)]
        emb = sample_image_embeddings(frozen.clip, frozen.tokenizer, prior, prompts, options.sampler, options.steps,
                                      options.prior_guidance, generator, options.prior_candidates)
        text = text_condition(frozen.clip, frozen.tokenizer, prompts)[1:] if cfg.model.text_tokens else None
        originals = None
    else:
        idx = torch.arange(min(10, len(frozen.val)))
        originals = to_uint8(resize(frozen.val.pixels(idx), cfg.model.image_size))
        emb = frozen.clip.encode_image(frozen.val.pixels(idx).to(device)).repeat_interleave(PER_PROMPT - 1, 0)
        text = None
    chain = []
    keep = nearest_steps(options.steps)
    record = lambda i, t, x, x0: chain.append(x0[:1]) if i in keep else None  # noqa: E731
    images = to_uint8(decode(decoder, cfg, emb, options.sampler, options.steps, options.guidance, generator, record,
                             text=text))
    if originals is not None:
        images = torch.cat([originals[:, None], images.view(len(originals), PER_PROMPT - 1, *images.shape[1:])], 1)
        images = images.flatten(0, 1)
    samples = out / "samples"
    save_png(grid(images, ncol=PER_PROMPT), samples / f"grid_{step:07d}.png", scale=2)
    save_png(grid(to_uint8(torch.cat(chain)), ncol=len(chain)), samples / f"denoise_{step:07d}.png", scale=2)


def decoder_stage(cfg: DecoderConfig, frozen: FrozenClip, prior: Optional[Diffusion] = None) -> Stage:
    t, m = cfg.train, cfg.model
    device = training_device(t.device)
    clip_m = frozen.clip.config
    m.image_channels = clip_m.image_channels
    m.image_size = m.image_size or clip_m.image_size  # what CLIP sees, unless the decoder is a cascade's base
    cfg.clip_fingerprint = frozen.fingerprint
    model = seeded(t.seed, lambda: UNet(m, clip_m.embed_dim, text_width=clip_m.text_width)).to(device)
    base = decoder_diffusion(model, cfg, device)

    def loss(idx: torch.Tensor, step: int, module: torch.nn.Module):
        x0 = resize(frozen.data.pixels(idx).to(device), m.image_size)
        text = None
        if m.text_tokens:  # the captions CLIP and the prior saw for these images, dropped `text_drop` of the time
            captions = frozen.data.captions(idx, caption_seed(t.seed, step))
            _, features, mask = text_condition(frozen.clip, frozen.tokenizer, captions)
            text = (features, mask & (torch.rand(len(idx), device=device) >= m.text_drop)[:, None])
        cond = decoder_condition(cfg, frozen.image_emb[idx.to(device)], text)
        return replace(base, net=module).loss(x0, cond, m.cond_drop), {}

    def sample(shipped: UNet, step: int, out: Path) -> None:
        save_samples(frozen, decoder_diffusion(shipped, cfg, device), cfg, prior, step, out)

    return Stage("decoder", model, cfg, len(frozen.data), loss, sample=sample)


def train_decoder(cfg: DecoderConfig, frozen: FrozenClip, out: Path, prior: Optional[Diffusion] = None,
                  resume: bool = False) -> dict:
    return fit(decoder_stage(cfg, frozen, prior), cfg.train, out, resume)
