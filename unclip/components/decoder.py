"""The decoder at sampling time: CLIP image embedding (and, for decoders that read them, the caption's tokens and
a layout's map) -> image, with classifier-free guidance (DALL-E 2 sec. 2.1)."""
from __future__ import annotations

from typing import Optional

import torch

from unclip.components import StageSpec
from unclip.config import ClipConfig, DecoderConfig
from unclip.diffusion.process import Diffusion
from unclip.images import resize
from unclip.layouts import no_layout
from unclip.models.unet import UNet


def build_decoder(cfg: DecoderConfig, clip_cfg: ClipConfig) -> UNet:
    m = clip_cfg.model
    return UNet(cfg.model, m.embed_dim, text_width=cfg.text.width if cfg.text else m.text_width)


def decoder_diffusion(decoder: UNet, cfg: DecoderConfig, device: torch.device) -> Diffusion:
    # pixels: x0 estimates clamped to [-1, 1]; latents are unbounded
    return Diffusion.build(decoder, cfg.model, device, clip_x0=None if cfg.model.latent else 1.0)


SPEC = StageSpec("decoder", DecoderConfig, build_decoder, required=True, diffusion=decoder_diffusion,
                 reads_captions=lambda cfg: cfg.model.text_tokens)


def decoder_condition(cfg: DecoderConfig, image_emb: torch.Tensor, text: Optional[tuple] = None,
                      layout: Optional[torch.Tensor] = None) -> tuple:
    """The decoder's condition: the image embeddings, and the caption's (token features (B, L, W), mask (B, L)
    [, embed_kept (B,): False where the embedding alone is dropped, the caption read on its own]) when the
    decoder reads text; without a caption (variations, interpolation) no token is shown. A decoder that reads
    layouts also gets one's map (`layout_map`; None: no layout, an all-zero map)."""
    if text is None or not cfg.model.text_tokens:
        return (image_emb,)
    m = cfg.model
    if not m.layout:
        return (image_emb, *text)
    kept = text[2:] or (torch.ones(image_emb.shape[0], dtype=torch.bool, device=image_emb.device),)
    if layout is None:
        layout = no_layout(image_emb.shape[0], m.layout_fields, m.image_size, image_emb.device)
    return (image_emb, *text[:2], *kept, layout)


@torch.no_grad()
def decode(decoder: Diffusion, cfg: DecoderConfig, image_emb: torch.Tensor, sampler: str, steps: int, guidance: float,
           generator: torch.Generator, *, callback=None, noise: Optional[torch.Tensor] = None,
           text: Optional[tuple] = None, negative: Optional[tuple] = None, init: Optional[torch.Tensor] = None,
           strength: float = 1.0, text_guidance: Optional[float] = None,
           layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP image embeddings (B, D) (and, for decoders that read them, the captions' token features and mask
    from `text_condition`) -> images (B, C, H, W) in [-1, 1]. `negative` is the condition guidance steers
    away from (a negative prompt's `decoder_condition`); `init` images in [-1, 1] of any size and `strength`
    make it image-to-image (SDEdit). `text_guidance` (with a caption the decoder reads): the caption's own
    scale over the image embedding alone, `guidance` then the embedding's. `layout`: its map, for decoders that
    read layouts (`decoder_condition`)."""
    m = cfg.model
    if noise is None:
        shape = (image_emb.shape[0], m.image_channels, m.image_size, m.image_size)
        noise = torch.randn(shape, generator=generator, device=generator.device)
    cond = decoder_condition(cfg, image_emb, text, layout)
    if len(cond) > 1 and text_guidance is not None and text_guidance != guidance:
        tokens, mask, *kept = text  # the same tokens, none of them read: the caption dropped, the embedding as it was
        inner = decoder_condition(cfg, image_emb, (tokens, torch.zeros_like(mask), *kept), layout)
        denoise = decoder.denoiser(cond, text_guidance, negative, inner=(inner, guidance))
    else:
        denoise = decoder.denoiser(cond, guidance, negative)
    init = resize(init, m.image_size) if init is not None else None
    return decoder.sample(sampler, denoise, noise, steps, generator=generator, callback=callback, init=init,
                          strength=strength).clamp(-1, 1)
