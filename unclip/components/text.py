"""A pipeline's own caption encoder (text/), where it has one: a frozen pretrained text encoder imported by
`t2i text-import` (unclip/models/pretrained_text.py). Without one, stage two reads CLIP's text tower.

A pipeline reads every caption with one encoder: each stage that reads captions records the encoder it was
trained against (`TextEncoderDims` in its config; None: CLIP's), and a pipeline folder loads only if they agree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unclip.checkpoint import fingerprint
from unclip.components import StageSpec
from unclip.config import ClipConfig, TextConfig, TextEncoderDims
from unclip.errors import CheckpointError


def build_text(cfg: TextConfig, clip_cfg: Optional[ClipConfig] = None) -> torch.nn.Module:
    from unclip.models.pretrained_text import PretrainedText

    return PretrainedText(cfg)


SPEC = StageSpec("text", TextConfig, build_text, clip_bound=False)


def text_tokenizer(folder: Path, cfg: TextConfig):
    from unclip.models.pretrained_text import PretrainedTokenizer

    return PretrainedTokenizer(folder, cfg)


def dims(encoder: torch.nn.Module, cfg: TextConfig) -> TextEncoderDims:
    """What a stage trained against this encoder records of it."""
    from unclip.models.pretrained_text import feature_width

    width = feature_width(cfg)
    return TextEncoderDims(embed_dim=width, width=width, context=cfg.context, fingerprint=fingerprint(encoder.state_dict()))


def check_reads(stage: str, recorded: Optional[TextEncoderDims], text_print: Optional[str], folder: Path) -> None:
    """A stage loads into a pipeline only if it reads captions with the pipeline's encoder: text/'s (`text_print`,
    its fingerprint) or, without one, CLIP's."""
    if recorded is None and text_print is not None:
        raise CheckpointError(f"{folder}: its {stage} was trained against CLIP's text tower, but the pipeline reads "
                              "captions with its text/ encoder; retrain it with decoder-train --text (or remove text/)")
    if recorded is not None and recorded.fingerprint != text_print:
        where = "has no text/ encoder" if text_print is None else "has another text/ encoder"
        raise CheckpointError(f"{folder}: its {stage} was trained against a pretrained text encoder, but the pipeline "
                              f"{where}; put the one it was trained against in text/")
