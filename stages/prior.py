"""Stage two, part one: the diffusion prior, text embedding -> CLIP image embedding."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from t2i.stages.clip import caption_seed
from t2i.stages.frozen_clip import FrozenClip
from t2i.stages.samples import chain_recorder, fixed_captions, gallery, save_sheet
from t2i.stages.trainer import Stage, fit, seeded
from unclip.config import PriorConfig
from unclip.data import CaptionedImages
from unclip.diffusion.process import Diffusion
from unclip.models.prior import DiffusionPrior, residual_whitening
from t2i.stages.distributed import training_device
from unclip.images import to_uint8
from unclip.components.clip import text_condition
from unclip.components.prior import build_prior, prior_cosine, prior_diffusion, sample_image_embeddings
from unclip.options import SamplingOptions


def prior_stage(cfg: PriorConfig, frozen: FrozenClip) -> Stage:
    # the Stage's config, saved beside the weights
    cfg = replace(cfg, clip_fingerprint=frozen.fingerprint, text=frozen.text_dims)
    t = cfg.train
    device = training_device(t.device)
    model = seeded(t.seed, lambda: build_prior(cfg, frozen.clip_config))
    model = model.to(device)
    base = prior_diffusion(model, cfg, device)
    data, image_emb = frozen.captioned(t.workers)
    if cfg.model.whiten:  # (a resumed run's are then overwritten by the saved ones, which are the same)
        model.set_whitening(*fit_whitening(frozen, data, image_emb, model.scale, t.seed))

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x0, cond = training_example(frozen, cfg, model, image_emb, batch, step)
        m = cfg.model
        return replace(base, net=module).loss(x0, cond, m.cond_drop, min_snr_gamma=m.min_snr_gamma), {}

    def validate(shipped: DiffusionPrior) -> dict:
        val = frozen.val
        idx = torch.arange(min(500, len(val)))  # fixed images and captions: comparable across epochs
        captions = val.captions(idx, seed=0)
        return prior_cosine(frozen.clip, frozen.tokenizer, prior_diffusion(shipped, cfg, device), val.images[idx], captions,
                            reader=frozen.text)

    def sample(shipped: DiffusionPrior, step: int, out: Path) -> torch.Tensor:
        return save_prior_samples(frozen, prior_diffusion(shipped, cfg, device), step, out)

    return Stage("prior", model, cfg, data, loss, validate=validate, sample=sample,
                 metrics_shown=["loss", "prior_cosine"], objective="prior_cosine")


def training_example(frozen: FrozenClip, cfg: PriorConfig, prior: DiffusionPrior, image_emb: torch.Tensor,
                     batch: CaptionedImages, step: int) -> tuple:
    """(x0, condition) of a training batch: its images' CLIP embeddings (`image_emb`, looked up), in the space the
    prior diffuses, and one of each image's captions."""
    cond = text_condition(*frozen.captions(), batch.captions(seed=caption_seed(cfg.train.seed, step)))
    return prior.encode(image_emb[batch.example_ids.to(frozen.device)]), cond


def validation_example(frozen: FrozenClip, prior: DiffusionPrior, idx: torch.Tensor) -> tuple:
    """(x0, condition) of validation examples `idx`: fixed captions."""
    emb = frozen.clip.encode_image(frozen.val.pixels(idx).to(frozen.device))
    return prior.encode(emb), text_condition(*frozen.captions(), frozen.val.captions(idx, seed=0))


@torch.no_grad()
def save_prior_samples(frozen: FrozenClip, prior: Diffusion, step: int, out: Path,
                       guidance: Optional[float] = None) -> torch.Tensor:
    """The prior draws embeddings, not pictures: each cell of its sheet is the training image (a stream's:
    validation image) whose CLIP embedding is nearest to the embedding predicted (a column per fixed prompt).
    `guidance`: the prior's; None, the library's default (SamplingOptions)."""
    options = SamplingOptions()  # the library's defaults (a shipped pipeline's sampling.yaml may set others)
    callback, shots = chain_recorder(options.steps)
    final = sample_image_embeddings(*frozen.captions(), prior, fixed_captions(frozen), options.sampler,
                                    options.steps, options.prior_guidance if guidance is None else guidance,
                                    torch.Generator(frozen.device).manual_seed(0), callback=callback)
    images, embeddings = gallery(frozen)
    nearest = lambda emb: images.pixels((emb @ embeddings.T).argmax(1).cpu())  # noqa: E731
    return save_sheet([to_uint8(nearest(e)) for e in [prior.net.decode(s) for s in shots] + [final]], out, step)


@torch.no_grad()
def fit_whitening(frozen: FrozenClip, data: CaptionedImages, image_emb: torch.Tensor, scale: float, seed: int,
                  n: int = 16_384) -> tuple[torch.Tensor, ...]:
    """`residual_whitening` of up to `n` training examples (a fixed draw), each with one of its captions."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    captions = data.subset(idx, batch=True).captions(seed=caption_seed(seed, 0))
    text = torch.cat([text_condition(*frozen.captions(), captions[i:i + 1024])[0]
                      for i in range(0, len(captions), 1024)])
    return residual_whitening(image_emb[idx.to(image_emb.device)] * scale, text)


def train_prior(cfg: PriorConfig, frozen: FrozenClip, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    return fit(prior_stage(cfg, frozen), cfg.train, out, resume, overwrite=overwrite)
