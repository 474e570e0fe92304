"""`t2i decoder-train`: the prior, then the decoder, against one frozen CLIP, into a pipeline folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from t2i.stages.decoder import train_decoder
from t2i.stages.frozen_clip import FrozenClip
from t2i.stages.prior import train_prior
from t2i.stages.trainer import RUN_FILE, STATE_FILE, check_out, console
from t2i.stages.distributed import is_main
from unclip.checkpoint import (CONFIG_FILE, SAMPLING_FILE, WEIGHTS_FILE, atomic_write_text, check_fingerprint, copy_stage,
                              resolve_folder)
from unclip.config import ClipConfig, DecoderConfig, PriorConfig, load_config, load_yaml, merge, stage_section
from unclip.errors import CheckpointError, ConfigError
from unclip.components import STAGES
from unclip.components.prior import prior_diffusion
from unclip.options import SamplingOptions
from unclip.vocabulary import extend_vocabulary


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


def companion(out: Path, name: str, given: Optional[Path], needs: str, what: str, writer: str) -> Optional[Path]:
    """A stage stage two reads but does not train (text/, autoencoder/): the folder given by --NAME, else the one
    `out` already holds, else None; a folder without `needs` is refused."""
    folder = Path(given) if given is not None else (out / name if (out / name).is_dir() else None)
    if folder is not None and not (folder / needs).is_file():
        raise CheckpointError(f"--{name} {folder}: not {what} (no {needs}; {writer} writes one)")
    return folder


def train_stage_two(clip_dir: Path, config_path: Optional[Path], flags: dict, out: Path, stages: list[str],
                    resume: bool = False, overwrite: bool = False, text_dir: Optional[Path] = None,
                    autoencoder_dir: Optional[Path] = None) -> dict:
    """Train `stages` in order; {"interrupted": signal} if a stage was stopped (the rest is left for --resume),
    {"finished": True} if `resume` found every one finished (said at once, nothing loaded), else {}. `text_dir`: a
    pretrained caption encoder (`t2i text-import`) to read captions with instead of CLIP's text tower, copied into
    `out`/text/; an `out` that already has one reads with it. `autoencoder_dir`: an autoencoder (`t2i
    autoencoder-train`) for the decoder to draw in the latent space of, copied into `out`/autoencoder/; likewise."""
    clip_dir, out = resolve_folder(clip_dir, "clip"), Path(out)  # a folder, or a shipped name (mnist, scenes)
    clip_cfg = load_config(ClipConfig, clip_dir / CONFIG_FILE) if (clip_dir / CONFIG_FILE).is_file() else None
    if clip_cfg is None:
        raise CheckpointError(f"--clip {clip_dir}: not a CLIP checkpoint folder (no {CONFIG_FILE})")
    text_dir = companion(out, "text", text_dir, CONFIG_FILE, "a text encoder folder", "t2i text-import")
    autoencoder_dir = companion(out, "autoencoder", autoencoder_dir, WEIGHTS_FILE, "an autoencoder folder",
                                "t2i autoencoder-train")
    modes = {}
    for stage in stages:  # before minutes of loading and embedding: a refusal, or nothing to do, is said at once
        folder = out / stage
        begun = (folder / STATE_FILE).is_file() or (folder / RUN_FILE).is_file()  # --resume: a stage not begun starts
        modes[stage] = check_out(folder, stage, resume and begun, overwrite)
    if all(m == "finished" for m in modes.values()):
        if is_main():
            console.print(f"{', '.join(stages)}: finished in {out}; nothing to resume", soft_wrap=True, highlight=False)
        return {"finished": True}
    sampling = sampling_section(config_path)
    prior_cfg = stage_config(PriorConfig, "prior", clip_cfg, config_path, flags)
    decoder_cfg = stage_config(DecoderConfig, "decoder", clip_cfg, config_path, flags)
    frozen = FrozenClip.load(clip_dir, (prior_cfg if stages[0] == "prior" else decoder_cfg).train, text_dir,
                             autoencoder_dir if "decoder" in stages else None)
    copy_clip(clip_dir, out)
    for name, folder in (("text", text_dir), ("autoencoder", autoencoder_dir)):
        if folder is not None and (out / name).resolve() != folder.resolve():
            copy_stage(folder, out / name)
    if is_main():
        extend_vocabulary(out / "clip", getattr(frozen.data, "captioner", None))
    prior = None
    if "prior" in stages and modes["prior"] != "finished":
        last = train_prior(prior_cfg, frozen, out / "prior", modes["prior"] == "resume")
        if last.get("interrupted"):
            return last
    if (out / "prior" / WEIGHTS_FILE).is_file():
        model, cfg = STAGES["prior"].load(out / "prior", clip_cfg, frozen.device)
        check_fingerprint(out / "prior", cfg.clip_fingerprint, frozen.fingerprint)
        prior = prior_diffusion(model, cfg, frozen.device)
    if "decoder" in stages and modes["decoder"] != "finished":
        last = train_decoder(decoder_cfg, frozen, out / "decoder", prior, modes["decoder"] == "resume")
        if last.get("interrupted"):
            return last
    if sampling and is_main():
        write_sampling(out, sampling)
    return {}


def write_sampling(out: Path, sampling: dict) -> None:
    """The config's `sampling:` section as OUT/sampling.yaml, unless OUT has one: that one (set by hand, or by `t2i
    distill` for its student) is kept, and named where it differs."""
    path = out / SAMPLING_FILE
    if not path.is_file():
        atomic_write_text(path, yaml.safe_dump(sampling, sort_keys=False))
    elif (load_yaml(path) or {}) != sampling:
        console.print(f"note: {path} kept as it is; the config's sampling: {sampling} was not written over it",
                      soft_wrap=True, highlight=False)


def sampling_section(config_path: Optional[Path]) -> Optional[dict]:
    """A pipeline config's `sampling:` section (the defaults its recipe was judged with), checked against
    SamplingOptions; `t2i decoder-train` writes it beside the stages as sampling.yaml."""
    section = (load_yaml(config_path) or {}).get("sampling") if config_path is not None else None
    if section:
        try:
            merge(SamplingOptions(), section)
        except ConfigError as e:
            raise ConfigError(f"{config_path}, sampling: {e}") from None
    return section or None
