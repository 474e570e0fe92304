"""The layout stage at sampling time: caption -> objects and their boxes, drawn before the decoder, which reads
them painted as a map (unclip/layouts.py)."""
from __future__ import annotations

from typing import Optional

import torch

from unclip.components import StageSpec
from unclip.config import ClipConfig, DecoderConfig, LayoutConfig
from unclip.errors import CheckpointError
from unclip.layouts import layout_map
from unclip.models.layout import LayoutModel


def build_layout(cfg: LayoutConfig, clip_cfg: ClipConfig) -> LayoutModel:
    return LayoutModel(cfg.model, cfg.text.width if cfg.text else clip_cfg.model.text_width)


SPEC = StageSpec("layout", LayoutConfig, build_layout, reads_captions=lambda cfg: True)


def check_fits(cfg: LayoutConfig, decoder_cfg: DecoderConfig, folder) -> None:
    """A layout stage writes the fields its decoder reads."""
    if cfg.model.fields != decoder_cfg.model.layout_fields:
        raise CheckpointError(f"{folder} writes fields {cfg.model.fields}, but the decoder reads "
                              f"{decoder_cfg.model.layout_fields}")


def sample_layouts(layout: Optional[LayoutModel], decoder_cfg: DecoderConfig, text: tuple, generator: torch.Generator,
                   temperature: float = 1.0, box_temperature: Optional[float] = None,
                   layouts: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """For a decoder that reads layouts, the map (`layout_map`) of `layouts` (B, N, F) when given, else of a layout
    the layout stage draws for each caption (token features and mask from `text_condition`) at `temperature`
    (its boxes at `box_temperature`); None where there is none to read."""
    m = decoder_cfg.model
    if not m.layout or (layouts is None and layout is None):
        return None
    if layouts is None:
        layouts = layout.sample(*text, generator, temperature, box_temperature)
    return layout_map(layouts.to(text[0].device), m.layout_fields, m.image_size)
