"""Stage two, part one: the diffusion prior, text embedding -> CLIP image embedding."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from stages.clip import caption_generator
from stages.frozen_clip import FrozenClip
from stages.trainer import Stage, fit
from unclip.config import PriorConfig
from unclip.models.prior import DiffusionPrior
from unclip.pipeline import embed_scale, prior_diffusion, resolve_device, sample_image_embeddings, text_condition


@torch.no_grad()
def prior_similarity(frozen: FrozenClip, diffusion, captions_seed: int = 0, n: int = 500, steps: int = 16) -> dict:
    """Mean cosine similarity to the true image embedding of held-out captions: of the prior's samples,
    and of the text embedding itself (the baseline a prior must beat)."""
    val = frozen.val
    idx = torch.arange(min(n, len(val)))
    captions = val.captions(idx, torch.Generator().manual_seed(captions_seed))
    true = F.normalize(frozen.clip.encode_image(val.pixels(idx).to(frozen.image_emb.device)), dim=-1)
    generator = torch.Generator(frozen.image_emb.device).manual_seed(0)
    sampled = sample_image_embeddings(frozen.clip, frozen.tokenizer, diffusion, captions, "ddim", steps, 1.0, generator, 1)
    text = F.normalize(text_condition(frozen.clip, frozen.tokenizer, captions)[0], dim=-1)
    return {"prior_cosine": (sampled * true).sum(-1).mean().item(), "text_cosine": (text * true).sum(-1).mean().item()}


def prior_stage(cfg: PriorConfig, frozen: FrozenClip) -> Stage:
    t = cfg.train
    device = resolve_device(t.device)
    clip_m = frozen.clip.config
    cfg.clip_fingerprint = frozen.fingerprint
    model = DiffusionPrior(cfg.model, clip_m.embed_dim, clip_m.text_width, clip_m.text_context).to(device)
    scale = embed_scale(clip_m.embed_dim)
    base = prior_diffusion(model, cfg, device)

    def loss(idx: torch.Tensor, step: int, module: torch.nn.Module):
        cond = text_condition(frozen.clip, frozen.tokenizer, frozen.data.captions(idx, caption_generator(t.seed, step)))
        return replace(base, net=module).loss(frozen.image_emb[idx.to(device)] * scale, cond, cfg.model.cond_drop), {}

    def validate(shipped: DiffusionPrior) -> dict:
        return prior_similarity(frozen, prior_diffusion(shipped, cfg, device))

    return Stage("prior", model, cfg, len(frozen.data), loss, validate=validate,
                 metrics_shown=["loss", "prior_cosine"])


def train_prior(cfg: PriorConfig, frozen: FrozenClip, out: Path, resume: bool = False) -> dict:
    return fit(prior_stage(cfg, frozen), cfg.train, out, resume)
