"""What the prior and the decoder share: the frozen CLIP, its fingerprint, the data and its embeddings."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from unclip.checkpoint import fingerprint
from unclip.config import TrainConfig
from unclip.data import CaptionedImages, load_dataset
from unclip.models.clip import CLIP
from stages.distributed import training_device
from unclip.pipeline import load_clip
from unclip.tokenizer import Tokenizer
from unclip.zeroshot import encode_images

log = logging.getLogger(__name__)


@dataclass
class FrozenClip:
    clip: CLIP
    tokenizer: Tokenizer
    fingerprint: str
    data: CaptionedImages  # train split at CLIP's resolution
    val: CaptionedImages
    image_emb: torch.Tensor  # (N, D) unit-norm embeddings of `data`, on the device

    @classmethod
    def load(cls, clip_dir: Path, train: TrainConfig) -> "FrozenClip":
        device = training_device(train.device)  # joins the process group before anything is built
        clip, cfg = load_clip(clip_dir, device)
        clip.requires_grad_(False)
        m = cfg.model
        columns = (train.image_column, train.text_column)
        data = load_dataset(train.data, "train", train.data_dir, m.image_channels, m.image_size, train.val_size, columns)
        val = load_dataset(train.data, "val", train.data_dir, m.image_channels, m.image_size, train.val_size, columns)
        log.info("embedding %d training images with CLIP", len(data))
        return cls(clip, Tokenizer(m.text_context), fingerprint(clip.state_dict()), data, val,
                   encode_images(clip, data.images))

    def fixed_captions(self, n: int = 10) -> Optional[list[str]]:
        """Prompts for sample grids: the class names, or the first distinct validation captions."""
        names = self.data.class_names
        if names:
            return names[:n]
        captions = self.val.captions(torch.arange(min(4 * n, len(self.val))), seed=0)
        return list(dict.fromkeys(captions))[:n]
