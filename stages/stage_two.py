"""`t2i decoder-train`: the prior, then the decoder, against one frozen CLIP, into a pipeline folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from stages.decoder import train_decoder
from stages.frozen_clip import FrozenClip
from stages.prior import train_prior
from stages.trainer import STATE_FILE
from unclip.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_fingerprint, copy_stage
from unclip.config import ClipConfig, DecoderConfig, PriorConfig, load_config, load_yaml, merge, stage_section
from unclip.errors import CheckpointError
from unclip.pipeline import load_prior, prior_diffusion


def stage_config(cls, stage: str, clip_cfg: ClipConfig, config_path: Optional[Path], flags: dict):
    """Defaults, then CLIP's data (so the same data is not named twice), then the config file, then flags."""
    cfg = merge(cls(), {"train": {"data": clip_cfg.train.data, "data_dir": clip_cfg.train.data_dir}})
    if config_path is not None:
        cfg = merge(cfg, stage_section(load_yaml(config_path), stage))
    return merge(cfg, flags)


def copy_clip(clip_dir: Path, out: Path) -> None:
    """Make `out` a complete pipeline folder by keeping the CLIP it was trained on beside it."""
    if (out / "clip").resolve() != clip_dir.resolve():
        copy_stage(clip_dir, out / "clip")


def train_stage_two(clip_dir: Path, config_path: Optional[Path], flags: dict, out: Path, stages: list[str],
                    resume: bool = False) -> bool:
    """Train `stages` in order; False if a stage was interrupted (the rest is left for --resume)."""
    clip_dir, out = Path(clip_dir), Path(out)
    clip_cfg = load_config(ClipConfig, clip_dir / CONFIG_FILE) if (clip_dir / CONFIG_FILE).is_file() else None
    if clip_cfg is None:
        raise CheckpointError(f"--clip {clip_dir}: not a CLIP checkpoint folder (no {CONFIG_FILE})")
    prior_cfg = stage_config(PriorConfig, "prior", clip_cfg, config_path, flags)
    decoder_cfg = stage_config(DecoderConfig, "decoder", clip_cfg, config_path, flags)
    frozen = FrozenClip.load(clip_dir, (prior_cfg if stages[0] == "prior" else decoder_cfg).train)
    copy_clip(clip_dir, out)
    prior = None
    if "prior" in stages:
        if train_prior(prior_cfg, frozen, out / "prior", resume).get("interrupted"):
            return False
    if (out / "prior" / WEIGHTS_FILE).is_file():
        model, cfg = load_prior(out / "prior", clip_cfg, frozen.device)
        check_fingerprint(out / "prior", cfg.clip_fingerprint, frozen.fingerprint)
        prior = prior_diffusion(model, cfg, frozen.device)
    if "decoder" in stages:
        # `--resume` of a run stopped during the prior: the decoder has no state yet and starts afresh.
        resume = resume and (out / "decoder" / STATE_FILE).is_file()
        return not train_decoder(decoder_cfg, frozen, out / "decoder", prior, resume).get("interrupted")
    return True
