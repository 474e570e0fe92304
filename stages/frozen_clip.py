"""What the prior and the decoder share: the frozen CLIP, its fingerprint, the data and its embeddings (computed
once; a stream's as its batches come), and for a decoder that draws in latent space the frozen autoencoder and the
data's latents (alike)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.progress import track

from unclip.checkpoint import fingerprint
from unclip.config import ClipConfig, TextEncoderDims, TrainConfig
from unclip.data import CaptionedImages, load_split
from unclip.data.captions import TextCaptions
from unclip.errors import ConfigError
from unclip.data.stream import StreamedCaptions
from unclip.images import resize
from unclip.models.autoencoder import Autoencoder
from unclip.models.clip import CLIP
from t2i.stages.distributed import is_main, training_device
from t2i.stages.trainer import console
from unclip.components.clip import load_clip
from unclip.tokenizer import Tokenizer
from unclip.components.clip import encode_images

log = logging.getLogger(__name__)
EMBED_CHUNK = 2000  # images a step of the progress bar (encode_images batches them by 1,000)


@dataclass
class FrozenClip:
    clip: CLIP
    clip_config: ClipConfig  # the stage's builders (`STAGES[name].build`) take it
    tokenizer: Tokenizer
    fingerprint: str
    data: CaptionedImages | StreamedCaptions  # train split at CLIP's resolution
    val: CaptionedImages
    device: torch.device
    # (N, D) unit-norm embeddings of `data` in memory, on the device; a stream's are made as batches come
    image_emb: Optional[torch.Tensor] = None
    _captioned: Optional[tuple[CaptionedImages, torch.Tensor]] = None
    # a pretrained caption encoder (text/, `t2i text-import`) that stage two reads captions with instead of CLIP's
    # text tower: (encoder, tokenizer), and what a stage trained against it records
    text: Optional[tuple[torch.nn.Module, object]] = None
    text_dims: Optional[TextEncoderDims] = None
    # a latent decoder's autoencoder (autoencoder/, `t2i autoencoder-train`), and the (N, L, s, s) latents of `data`
    # in memory; a stream's are made as batches come
    autoencoder: Optional[Autoencoder] = None
    latents: Optional[torch.Tensor] = None

    @classmethod
    def load(cls, clip_dir: Path, train: TrainConfig, text_dir: Optional[Path] = None,
             autoencoder_dir: Optional[Path] = None) -> "FrozenClip":
        device = training_device(train.device)  # joins the process group before anything is built
        clip, cfg = load_clip(clip_dir, device)
        clip.requires_grad_(False)
        m = cfg.model
        text = load_text(text_dir, device) if text_dir is not None else None  # before minutes of data
        data = load_split(train, "train", m.image_channels, m.image_size)
        val = load_split(train, "val", m.image_channels, m.image_size)
        frozen = cls(clip, cfg, Tokenizer(m.text_context), fingerprint(clip.state_dict()), data, val, device)
        if text is not None:
            frozen.text, frozen.text_dims = text[:2], text[2]
        if isinstance(data, CaptionedImages):  # minutes for 55,000 scenes on 2 cores: a progress bar
            chunks = track(data.images.split(EMBED_CHUNK), f"embedding {len(data)} training images with CLIP",
                           console=console, disable=not is_main())
            frozen.image_emb = torch.cat([encode_images(clip, chunk) for chunk in chunks])
        if autoencoder_dir is not None:
            frozen.load_autoencoder(autoencoder_dir)
        return frozen

    def load_autoencoder(self, folder: Path) -> None:
        """Read the decoder's targets as latents of the autoencoder in `folder`: in-memory data's encoded once."""
        from unclip.components import STAGES
        from unclip.components.autoencoder import to_latents

        self.autoencoder, cfg = STAGES["autoencoder"].load(Path(folder), None, self.device)
        self.autoencoder.requires_grad_(False)
        if cfg.model.image_channels != self.clip_config.model.image_channels:
            raise ConfigError(f"{folder}: the autoencoder encodes {cfg.model.image_channels}-channel images, the data "
                              f"has {self.clip_config.model.image_channels}")
        if isinstance(self.data, CaptionedImages):
            chunks = track(torch.arange(len(self.data)).split(EMBED_CHUNK // 4), f"encoding {len(self.data)} training "
                           "images with the autoencoder", console=console, disable=not is_main())
            self.latents = torch.cat([to_latents(self.autoencoder, self.data.pixels(idx).to(self.device)) for idx in chunks])

    @torch.no_grad()
    def targets(self, pixels: torch.Tensor, size: int, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the decoder learns to draw of images `pixels` in [-1, 1]: with an autoencoder their latents (looked up
        by training example `ids` where encoded once), else the pixels at `size`."""
        if self.autoencoder is None:
            return resize(pixels.to(self.device), size)
        if ids is not None and self.latents is not None:
            return self.latents[ids.to(self.device)]
        from unclip.components.autoencoder import to_latents

        return to_latents(self.autoencoder, pixels.to(self.device))

    @torch.no_grad()
    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's drawings as images: latents decoded by the autoencoder, pixels as they are."""
        return self.autoencoder.decode(x) if self.autoencoder is not None else x

    def captions(self) -> tuple[torch.nn.Module, object]:
        """(encoder, tokenizer) stage two reads captions with: the pretrained text encoder's, else CLIP's."""
        return self.text or (self.clip, self.tokenizer)

    @torch.no_grad()
    def embed(self, batch: CaptionedImages) -> torch.Tensor:
        """The CLIP image embeddings of a training batch: looked up, or for a stream computed."""
        if self.image_emb is not None:
            return self.image_emb[batch.example_ids.to(self.device)]
        return encode_images(self.clip, batch.images)

    def captioned(self, workers: int = 2) -> tuple[CaptionedImages, torch.Tensor]:
        """The prior's data: the training captions (without their images) and the images' embeddings. A stream
        is read once for it, its units split among `workers` DataLoader processes."""
        if self.image_emb is not None:
            return self.data, self.image_emb
        if self._captioned is None:
            log.info("embedding the %d training images of %s with CLIP (one pass over the stream)",
                     len(self.data), self.data.source.spec)
            embeddings, captions = [], []
            for images, caps in self.data.scan(workers):
                embeddings.append(encode_images(self.clip, images))
                captions += caps
            self._captioned = (CaptionedImages(images=None, labels=torch.arange(len(captions)),
                                               captioner=TextCaptions(captions)), torch.cat(embeddings))
        return self._captioned


def load_text(folder: Path, device: torch.device) -> tuple[torch.nn.Module, object, TextEncoderDims]:
    """A text/ stage folder (`t2i text-import`): its encoder, frozen, its tokenizer, and what a stage records of it."""
    from unclip.components import STAGES
    from unclip.components.text import dims, text_tokenizer

    encoder, cfg = STAGES["text"].load(Path(folder), None, device)
    encoder.requires_grad_(False)
    return encoder, text_tokenizer(Path(folder), cfg), dims(encoder, cfg)
