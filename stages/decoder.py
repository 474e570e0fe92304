"""Stage two, part two: the decoder, CLIP image embedding -> image, with sample grids while training."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from t2i.stages.clip import caption_seed
from t2i.stages.frozen_clip import FrozenClip
from t2i.stages.samples import chain_recorder, fixed_captions, save_sheet
from t2i.stages.trainer import Stage, fit, held_out_loss, seeded
from unclip.config import DecoderConfig
from unclip.errors import ConfigError
from unclip.data import CaptionedImages, layout_fields
from unclip.diffusion.process import Diffusion
from unclip.images import to_uint8
from unclip.checkpoint import fingerprint
from unclip.layouts import layout_map
from unclip.models.unet import UNet, grounding_loss
from t2i.stages.distributed import training_device
from unclip.components.clip import text_condition
from unclip.components.decoder import build_decoder, decode, decoder_condition, decoder_diffusion
from unclip.components.prior import sample_image_embeddings
from unclip.options import SamplingOptions


def save_samples(frozen: FrozenClip, decoder: Diffusion, cfg: DecoderConfig, prior: Optional[Diffusion],
                 step: int, out: Path) -> torch.Tensor:
    """The stage's sheet (stages/samples.py): a column per fixed prompt, drawn through the prior when there is one;
    without one, reconstructions of validation images from their CLIP embeddings, the originals on top."""
    device = frozen.device
    generator = torch.Generator(device).manual_seed(0)
    options = SamplingOptions()  # the library's defaults (a shipped pipeline's sampling.yaml may set others)
    text, rows = None, []
    if prior is not None:
        prompts = fixed_captions(frozen)
        emb = sample_image_embeddings(*frozen.captions(), prior, prompts, options.sampler, options.steps,
                                      options.prior_guidance, generator, options.prior_candidates)
        text = text_condition(*frozen.captions(), prompts)[1:] if cfg.model.text_tokens else None
    else:
        originals = frozen.val.pixels(torch.arange(min(10, len(frozen.val))))
        emb = frozen.clip.encode_image(originals.to(device))
        rows.append(to_uint8(frozen.pixels(frozen.targets(originals, cfg.model.image_size))))
    callback, shots = chain_recorder(options.steps)
    final = decode(decoder, cfg, emb, options.sampler, options.steps, options.guidance, generator, callback=callback, text=text)
    return save_sheet(rows + [to_uint8(frozen.pixels(x)) for x in shots + [final]], out, step)


def training_example(frozen: FrozenClip, cfg: DecoderConfig, batch: CaptionedImages, step: int) -> tuple:
    """(x0, condition) of a training batch: its images at the decoder's size, their CLIP embeddings and, for a
    decoder that reads text, the captions' token features; the caption alone dropped `text_drop` of the time and,
    independently, the embedding alone `embed_drop` of the time; for one that reads layouts, the images' own,
    dropped `layout_drop` of the time."""
    m, device = cfg.model, frozen.device
    x0 = frozen.targets(batch.pixels(), m.image_size, batch.example_ids)
    text = None
    if m.text_tokens:  # the captions CLIP and the prior saw for these images
        captions = batch.captions(seed=caption_seed(cfg.train.seed, step))
        _, features, mask = text_condition(*frozen.captions(), captions)
        text = (features, mask & (torch.rand(len(batch), device=device) >= m.text_drop)[:, None])
        if m.embed_drop:
            text += (torch.rand(len(batch), device=device) >= m.embed_drop,)
    layout = true_layouts(cfg, batch.captioner, batch.labels, device) if m.layout else None
    if layout is not None:
        layout = layout * (torch.rand(len(batch), device=device) >= m.layout_drop)[:, None, None, None]
    return x0, decoder_condition(cfg, frozen.embed(batch), text, layout)


def true_layouts(cfg: DecoderConfig, captioner, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The maps (`layout_map`) of the layouts of examples `labels` (scenes: scene indices)."""
    return layout_map(captioner.layouts(labels).to(device), cfg.model.layout_fields, cfg.model.image_size)


def validation_example(frozen: FrozenClip, cfg: DecoderConfig, idx: torch.Tensor) -> tuple:
    """(x0, condition) of validation examples `idx`: fixed captions, no caption dropped."""
    pixels = frozen.val.pixels(idx).to(frozen.device)
    text = text_condition(*frozen.captions(), frozen.val.captions(idx, seed=0))[1:] \
        if cfg.model.text_tokens else None
    val = frozen.val
    layout = true_layouts(cfg, val.captioner, val.labels[idx], frozen.device) if cfg.model.layout else None
    return frozen.targets(pixels, cfg.model.image_size), decoder_condition(cfg, frozen.clip.encode_image(pixels), text, layout)


def decoder_stage(cfg: DecoderConfig, frozen: FrozenClip, prior: Optional[Diffusion] = None) -> Stage:
    """The decoder's training stage; its config (the Stage's, saved beside the weights) is `cfg` resolved against
    the CLIP and the data: their channels, size and layout fields, the CLIP's fingerprint. `cfg` is left as it is."""
    device = training_device(cfg.train.device)
    clip_m = frozen.clip.config
    m = cfg.model
    m = replace(m, image_channels=clip_m.image_channels,
                image_size=m.image_size or clip_m.image_size,  # what CLIP sees, unless the decoder is a cascade's base
                layout_fields=list(layout_fields(frozen.data, "decoder layout").values()) if m.layout else m.layout_fields)
    ae = frozen.autoencoder
    if ae is not None:  # a latent decoder: it draws the autoencoder's latents
        m = replace(m, latent=True, image_channels=ae.config.latent_channels, image_size=ae.latent_size)
    cfg = replace(cfg, model=m, clip_fingerprint=frozen.fingerprint, text=frozen.text_dims if m.text_tokens else None,
                  autoencoder_fingerprint=fingerprint(ae.state_dict()) if ae is not None else "")
    t = cfg.train
    model = seeded(t.seed, lambda: build_decoder(cfg, frozen.clip_config))
    model = model.to(device, memory_format=torch.channels_last)  # 1.07x a step on the CPU (docs/results/mnist-from-scratch.md, "Throughput")
    base = decoder_diffusion(model, cfg, device)

    if m.ground_weight and not (m.text_levels and hasattr(getattr(frozen.data, "captioner", None), "groundings")):
        raise ConfigError("decoder ground_weight needs text_levels (cross-attentions to ground) and data whose captions "
                          "say which object each word names (--data scenes)")
    if m.ground_weight and frozen.text is not None:
        raise ConfigError("decoder ground_weight grounds CLIP's BPE tokens: it does not combine with a text/ encoder")

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x0, cond = training_example(frozen, cfg, batch, step)
        if not m.ground_weight:
            return replace(base, net=module).loss(x0, cond, m.cond_drop, min_snr_gamma=m.min_snr_gamma), {}
        maps: list = []  # every cross-attention's weights, for the grounding loss
        net = lambda *args, **kwargs: module(*args, maps=maps, **kwargs)  # noqa: E731
        diffusion = replace(base, net=net).loss(x0, cond, m.cond_drop, min_snr_gamma=m.min_snr_gamma)
        captions = batch.captions(seed=caption_seed(cfg.train.seed, step))  # training_example's
        boxes, names = batch.captioner.groundings(batch.labels, captions, frozen.tokenizer, cond[1].shape[1])
        ground = grounding_loss(maps, boxes.to(device), names.to(device))
        return diffusion + m.ground_weight * ground, {"ground": ground.item()}

    def validate(shipped: UNet) -> dict:
        diffusion = decoder_diffusion(shipped.eval(), cfg, device)

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x0, cond = validation_example(frozen, cfg, idx)
            return diffusion.loss(x0, cond, 0.0, generator)

        return {"val_loss": held_out_loss(batch_loss, len(frozen.val), t.batch_size, device)}

    def sample(shipped: UNet, step: int, out: Path) -> torch.Tensor:
        return save_samples(frozen, decoder_diffusion(shipped, cfg, device), cfg, prior, step, out)

    return Stage("decoder", model, cfg, frozen.data, loss, validate=validate, sample=sample,
                 metrics_shown=["loss", "val_loss"], objective="val_loss")


def train_decoder(cfg: DecoderConfig, frozen: FrozenClip, out: Path, prior: Optional[Diffusion] = None,
                  resume: bool = False, overwrite: bool = False) -> dict:
    return fit(decoder_stage(cfg, frozen, prior), cfg.train, out, resume, overwrite=overwrite)
