"""The layout format, shared by the scenes' captions (which write layouts), the layout stage (which draws them) and
the decoder (which reads them painted as a map).

A layout is a (B, N, F) long tensor: N object slots, F = len(fields) + 4 tokens an object (its label fields, then
its box's corners on a `GRID` x `GRID` lattice over the image), -1 in every slot past a layout's last object.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GRID = 32  # box corners on a 32 x 32 lattice over the image: 2 px at 64 x 64
BOX = 4  # x0, y0, x1, y1


def box_tokens(x0: float, y0: float, x1: float, y1: float, size: int) -> list[int]:
    """A box's corners in pixels of a `size` image as lattice coordinates (0 to GRID)."""
    return [round(v * GRID / size) for v in (x0, y0, x1, y1)]


def layout_map(layout: torch.Tensor, fields: list[int], size: int) -> torch.Tensor:
    """Layouts (B, N, F) painted as (B, 1 + sum(fields), size, size) floats: channel 0 is 1 everywhere (a layout
    is given: an all-zero map is none), then each object's field values one-hot over its box (Make-A-Scene's
    token map, with boxes)."""
    B, N, _ = layout.shape
    out = torch.zeros(B, 1 + sum(fields), size, size, device=layout.device)
    out[:, 0] = 1
    coords = torch.arange(size, device=layout.device).float() + 0.5  # pixel centres
    box = layout[..., -BOX:].float() * size / GRID  # (B, N, 4) in pixels
    inside_x = (coords >= box[..., 0, None]) & (coords < box[..., 2, None])  # (B, N, size)
    inside_y = (coords >= box[..., 1, None]) & (coords < box[..., 3, None])
    region = (inside_y[..., :, None] & inside_x[..., None, :]).float()  # (B, N, size, size)
    region = region * (layout[..., 0] >= 0).float()[..., None, None]
    offset = 1
    for k, n in enumerate(fields):
        onehot = F.one_hot(layout[..., k].clamp(min=0), n).float()  # (B, N, n)
        out[:, offset: offset + n] = torch.einsum("bnc,bnhw->bchw", onehot, region).clamp(max=1)
        offset += n
    return out


def no_layout(batch: int, fields: list[int], size: int, device: torch.device) -> torch.Tensor:
    """The map of no layout (variations, interpolation, a pipeline without a layout stage): all zeros."""
    return torch.zeros(batch, 1 + sum(fields), size, size, device=device)
