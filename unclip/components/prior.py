"""The diffusion prior at sampling time: caption -> CLIP image embedding (DALL-E 2 sec. 2.2)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from unclip.components import StageSpec
from unclip.components.clip import encode_images, model_device, prompt_conditions, text_condition
from unclip.config import ClipConfig, PriorConfig
from unclip.diffusion.process import Diffusion
from unclip.errors import UserError
from unclip.models.clip import CLIP
from unclip.models.prior import DiffusionPrior
from unclip.tokenizer import Tokenizer


def build_prior(cfg: PriorConfig, clip_cfg: ClipConfig) -> DiffusionPrior:
    m, t = clip_cfg.model, cfg.text
    if t is None:
        return DiffusionPrior(cfg.model, m.embed_dim, m.text_width, m.text_context)
    return DiffusionPrior(cfg.model, m.embed_dim, t.width, t.context, text_embed_dim=t.embed_dim)


def prior_diffusion(prior: DiffusionPrior, cfg: PriorConfig, device: torch.device) -> Diffusion:
    return Diffusion.build(prior, cfg.model, device)


SPEC = StageSpec("prior", PriorConfig, build_prior, required=True, diffusion=prior_diffusion, maximize=("prior_cosine",),
                 reads_captions=lambda cfg: True)


@torch.no_grad()
def sample_image_embeddings(clip: CLIP, tokenizer: Tokenizer, prior: Diffusion, captions: list[str], sampler: str,
                            steps: int, guidance: float, generator: torch.Generator, candidates: int = 1,
                            negatives: Optional[list[str]] = None, callback=None) -> torch.Tensor:
    """Text -> unit-norm CLIP image embeddings (B, D) through the prior; of `candidates` draws per caption
    the one most similar to the caption's text embedding is kept (DALL-E 2, sec. 2.2). With `negatives`,
    guidance steers away from those captions instead of from no caption (Kandinsky 2.2's negative prompt).
    `callback(i, t, x_t, x0)` sees every step of the chain."""
    cond, negative = prompt_conditions(clip, tokenizer, captions, negatives)
    B, D = len(captions), prior.net.embed_dim  # CLIP's image embedding width (the caption's may differ)
    repeat = lambda c: tuple(x.repeat_interleave(candidates, 0) for x in c) if c is not None else None  # noqa: E731
    noise = torch.randn((B * candidates, D), generator=generator, device=generator.device)
    denoise = prior.denoiser(repeat(cond), guidance, repeat(negative))
    emb = prior.net.decode(prior.sample(sampler, denoise, noise, steps, generator=generator, callback=callback))
    if candidates == 1:
        return emb
    if not hasattr(clip, "encode_image"):  # a text/ encoder: its caption embeddings are not in CLIP's space
        raise UserError("prior_candidates ranks the prior's draws by CLIP's text embedding; this pipeline reads "
                        "captions with a text encoder of its own: leave it at 1", param="prior_candidates")
    emb = emb.view(B, candidates, D)
    return emb[torch.arange(B), nearest_candidates(emb, cond[0])]


def nearest_candidates(emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Of each caption's candidates' CLIP image embeddings (B, K, D), the index (B,) of the one most similar to
    its text embedding (B, D) (DALL-E 2's choice among the prior's draws; DALL-E 1's reranking of images)."""
    return (emb @ F.normalize(text_emb, dim=-1)[:, :, None]).squeeze(-1).argmax(1)


@torch.no_grad()
def prior_cosine(clip: CLIP, tokenizer: Tokenizer, prior: Diffusion, images: torch.Tensor, captions: list[str],
                 sampler: str = "ddim", steps: int = 16, seed: int = 0, reader: Optional[tuple] = None) -> dict:
    """How well the prior does its job: the mean cosine similarity between the embedding it samples for a
    caption and the true CLIP embedding of that caption's image, next to the same for the caption's own
    text embedding (the baseline a prior must beat; DALL-E 2 sec. 5.1). `reader`: the (encoder, tokenizer) the
    prior reads captions with, when not CLIP's (its embeddings live in another space: no baseline, NaN)."""
    device = model_device(clip)
    true = encode_images(clip, images).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    sampled = sample_image_embeddings(*(reader or (clip, tokenizer)), prior, captions, sampler, steps, 1.0, generator, 1)
    text = F.normalize(text_condition(clip, tokenizer, captions)[0], dim=-1) if reader is None else None
    return {"prior_cosine": (sampled * true).sum(-1).mean().item(),
            "text_cosine": (text * true).sum(-1).mean().item() if text is not None else float("nan")}
