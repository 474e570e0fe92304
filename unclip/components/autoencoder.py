"""A pipeline's autoencoder (autoencoder/), where its decoder draws in latent space (Rombach et al. 2022; Kandinsky
2.2 is unCLIP so built): the decoder diffuses the autoencoder's latents, conditioned as a pixel decoder is, and the
pipeline decodes its result to pixels; image-to-image encodes the init image first. Trained on images alone by
`t2i autoencoder-train`, before the decoder (whose config records its fingerprint, checked when the pipeline loads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unclip.checkpoint import fingerprint
from unclip.components import StageSpec
from unclip.config import AutoencoderConfig, ClipConfig, DecoderConfig
from unclip.errors import CheckpointError
from unclip.images import resize
from unclip.models.autoencoder import Autoencoder


def build_autoencoder(cfg: AutoencoderConfig, clip_cfg: Optional[ClipConfig] = None) -> Autoencoder:
    return Autoencoder(cfg.model)


SPEC = StageSpec("autoencoder", AutoencoderConfig, build_autoencoder, clip_bound=False, maximize=("val_psnr",))


def check_fits(decoder: DecoderConfig, autoencoder: Optional[Autoencoder], folder: Path) -> None:
    """A latent decoder needs the autoencoder it was trained in: present, and the same weights."""
    if not decoder.model.latent:
        return
    if autoencoder is None:
        raise CheckpointError(f"{folder}: its decoder draws in an autoencoder's latent space, but it has no autoencoder/")
    printed = fingerprint(autoencoder.state_dict())
    if printed != decoder.autoencoder_fingerprint:
        raise CheckpointError(f"{folder}/autoencoder is not the autoencoder its decoder was trained with "
                              f"(fingerprint {printed[:12]}, the decoder's {decoder.autoencoder_fingerprint[:12]})")


@torch.no_grad()
def to_latents(autoencoder: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of any size -> the normalised latents of them at the autoencoder's size."""
    return autoencoder.encode(resize(images, autoencoder.config.image_size))
