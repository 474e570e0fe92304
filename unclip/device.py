"""Where t2i computes: `auto` (a CUDA GPU when PyTorch sees one), `cpu` or `cuda`."""
from __future__ import annotations

import torch

from unclip.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here; use 'cpu' or 'auto'",
                        param="device")
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}: use {', '.join(DEVICES)}", param="device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
