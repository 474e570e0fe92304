"""The stages of a pipeline, one module each, and the one registry that names them.

Each module owns its stage at sampling time: how its network is built from its config (`build`), how a pipeline
folder's stage loads (`StageSpec.load`), its diffusion (`StageSpec.diffusion`, for diffusion stages), and how it is
conditioned and sampled. `STAGES` is read by everything that asks which stages exist: the pipeline's loader,
`config.load_config`'s YAML sections, checkpoint export, the trainer's and `t2i tune`'s objectives, `t2i runs`.

Adding a stage is a module here plus a line in `STAGES` (docs/architecture.md walks through one).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from unclip.checkpoint import load_checkpoint
from unclip.config import ClipConfig


@dataclass(frozen=True)
class StageSpec:
    """What the rest of t2i needs to know of a stage."""

    name: str  # its folder in a pipeline folder, its section in a pipeline YAML, its command's stage name
    config: type  # its config dataclass (config.yaml beside its weights)
    build: Callable  # build(cfg, clip_cfg) -> nn.Module: the network its config describes, for the pipeline's CLIP
    required: bool = False  # every pipeline folder has it (clip/, prior/, decoder/)
    diffusion: Optional[Callable] = None  # diffusion(net, cfg, device) -> Diffusion, for diffusion stages
    # trained against the pipeline's CLIP: its config records the CLIP's fingerprint, checked when it loads
    clip_bound: bool = True
    # the validation metrics its training reports where higher is better (the rest, a loss, are lower-is-better);
    # the first is the one `t2i tune` optimises, else val_loss
    maximize: tuple[str, ...] = ()
    # reads_captions(cfg): the stage, so configured, reads the caption encoder's output (CLIP's text tower, or the
    # pipeline's text/ encoder: unclip/components/text.py), and records which it was trained against
    reads_captions: Callable[[object], bool] = lambda cfg: False

    def load(self, folder: Path, clip_cfg: Optional[ClipConfig], device: torch.device) -> tuple[torch.nn.Module, object]:
        """(network in eval mode on `device`, config) of this stage's folder."""
        model, cfg = load_checkpoint(folder, self.config, lambda c: self.build(c, clip_cfg))
        return model.to(device).eval(), cfg

    def open(self, folder: Path, clip_cfg: Optional[ClipConfig], device: torch.device) -> tuple[object, object]:
        """(what the pipeline samples with: the Diffusion of a diffusion stage, else the network, config)."""
        model, cfg = self.load(folder, clip_cfg, device)
        return (self.diffusion(model, cfg, device) if self.diffusion else model), cfg

    @property
    def objective(self) -> str:
        return self.maximize[0] if self.maximize else "val_loss"

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"


def _registry() -> dict[str, StageSpec]:
    from unclip.components import autoencoder, clip, decoder, layout, prior, text, upsampler

    # in the order a pipeline loads them: CLIP and the caption encoder first (the others are checked against them),
    # the autoencoder before the decoder that draws in its latents, the decoder before the stages that fit it (the
    # upsampler enlarges its images, the layout stage writes the fields it reads)
    return {spec.name: spec for spec in (clip.SPEC, text.SPEC, prior.SPEC, autoencoder.SPEC, decoder.SPEC, upsampler.SPEC,
                                         layout.SPEC)}


STAGES: dict[str, StageSpec] = _registry()
REQUIRED = tuple(name for name, spec in STAGES.items() if spec.required)
MAXIMIZE = tuple(metric for spec in STAGES.values() for metric in spec.maximize)
