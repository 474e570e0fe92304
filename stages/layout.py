"""The layout stage: caption -> objects and boxes (unclip/models/layout.py), against the pipeline's frozen CLIP.

It learns from the captions and the layouts of the training scenes alone (no pixels): `t2i layout-train
--pipeline DIR` writes DIR/layout/, and a decoder trained with `layout: true` then draws what it is given.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from t2i.stages.clip import caption_seed
from t2i.stages.distributed import is_main, training_device
from t2i.stages.frozen_clip import load_text
from t2i.stages.stage_two import stage_config
from t2i.stages.trainer import Stage, check_out, fit, held_out_loss, nothing_to_resume, seeded
from unclip.checkpoint import CONFIG_FILE, fingerprint
from unclip.config import ClipConfig, LayoutConfig, load_config
from unclip.data import CaptionedImages, layout_fields, load_split
from unclip.errors import CheckpointError, ConfigError
from unclip.models.layout import LayoutModel
from unclip.components.clip import load_clip, text_condition
from unclip.components.layout import build_layout
from unclip.options import SamplingOptions
from unclip.tokenizer import Tokenizer, vocabulary_words
from unclip.vocabulary import extend_vocabulary

CHECKED = 500  # validation captions whose sampled layouts are checked


def layout_stage(cfg: LayoutConfig, clip_dir: Path, data: CaptionedImages, val: CaptionedImages,
                 text_dir: Optional[Path] = None) -> Stage:
    """`text_dir`: the pipeline's own caption encoder (text/), read instead of CLIP's text tower."""
    t = cfg.train
    device = training_device(t.device)
    clip, clip_cfg = load_clip(clip_dir, device)
    clip.requires_grad_(False)
    reader, dims = (clip, Tokenizer(clip_cfg.model.text_context)), None
    if text_dir is not None:
        *reader, dims = load_text(text_dir, device)
    # the Stage's config, saved beside the weights
    cfg = replace(cfg, clip_fingerprint=fingerprint(clip.state_dict()), text=dims)
    model = seeded(t.seed, lambda: build_layout(cfg, clip_cfg)).to(device)
    stray = stray_vocabulary(data.captioner) if cfg.stray_words else []

    def example(examples: CaptionedImages, labels: torch.Tensor, captions: list[str], seed: int) -> tuple:
        _, features, mask = text_condition(*reader, captions)
        layouts = examples.captioner.layouts(labels, captions, unnamed=torch.Generator().manual_seed(seed))
        return layouts.to(device), features, mask

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        captions = batch.captions(seed=caption_seed(t.seed, step))
        if stray:
            r = random.Random(caption_seed(t.seed, step))
            captions = [with_stray_words(c, r, cfg.stray_words, stray) for c in captions]
        layouts, features, mask = example(batch, batch.labels, captions, caption_seed(t.seed, step))
        return model.loss(layouts, features, mask, module), {}

    @torch.no_grad()
    def validate(shipped: LayoutModel) -> dict:
        shipped.eval()

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return shipped.loss(*example(val, val.labels[idx], val.captions(idx, seed=0), 0))

        idx = torch.arange(min(CHECKED, len(val)))
        layouts, features, mask = example(val, val.labels[idx], val.captions(idx, seed=0), 0)
        drawn = shipped.sample(features, mask, torch.Generator(device).manual_seed(0), SamplingOptions().layout_temperature)
        return {"val_loss": held_out_loss(batch_loss, len(val), t.batch_size, device),
                "val_digits": digits_agree(drawn, layouts).float().mean().item()}

    return Stage("layout", model, cfg, data, loss, validate=validate, metrics_shown=["loss", "val_loss", "val_digits"],
                 objective="val_loss")


def stray_vocabulary(captioner) -> list[str]:
    """The tokenizer's whole words that the captioner's captions never use (`LayoutConfig.stray_words`)."""
    words = getattr(captioner, "words", None)
    if words is None:
        raise ConfigError("layout stray_words: this data's captioner does not list the words its captions use")
    return [w for w in vocabulary_words() if w not in words]


def with_stray_words(text: str, r: random.Random, rate: float, words: Sequence[str]) -> str:
    """`text` with a word of `words` put in at a random place with chance `rate`, and a second with chance `rate`
    again (at most two: scenes' longest captions, 44 BPE tokens in 20,000, then seldom pass their 48-token context):
    what the words name is unchanged, so the layout is too."""
    out = text.split(" ")
    for _ in range(2):
        if r.random() >= rate:
            break
        out.insert(r.randint(0, len(out)), r.choice(words))
    return " ".join(out)


def digits_agree(drawn: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B,) True where two batches of layouts (B, N, F) hold the same first fields (scenes: digits) as multisets: for
    captions that name every object, a layout that draws what the caption says."""
    key = lambda layout: layout[..., 0].sort(-1).values  # noqa: E731  (-1, absent, sorts first)
    return (key(drawn) == key(true)).all(-1)


def layout_setup(pipeline: Path, config_path: Optional[Path], flags: dict) -> tuple[LayoutConfig, CaptionedImages,
                                                                                    CaptionedImages]:
    """The config of `pipeline/layout/` (on the data CLIP was trained on unless the config or flags say otherwise),
    its fields set from the data, and the training and validation splits."""
    pipeline = Path(pipeline)
    if not (pipeline / "clip" / CONFIG_FILE).is_file():
        raise CheckpointError(f"--pipeline {pipeline}: no clip/{CONFIG_FILE} (train or copy CLIP there first)")
    clip_cfg = load_config(ClipConfig, pipeline / "clip" / CONFIG_FILE)
    cfg = stage_config(LayoutConfig, "layout", clip_cfg, config_path, flags)
    t, m = cfg.train, cfg.model
    training_device(t.device)  # joins the process group (torchrun) before anything is built
    c = clip_cfg.model  # the stage reads captions and layouts, no pixels: scenes are not drawn
    data = load_split(t, "train", c.image_channels, c.image_size, pixels=False)
    fields = layout_fields(data, "the layout stage")
    cfg = replace(cfg, model=replace(m, fields=list(fields.values()), field_names=list(fields),
                                     max_objects=data.captioner.max_objects))
    return cfg, data, load_split(t, "val", c.image_channels, c.image_size, pixels=False)


def train_layout(pipeline: Path, config_path: Optional[Path], flags: dict, resume: bool = False,
                 overwrite: bool = False) -> dict:
    if check_out(Path(pipeline) / "layout", "layout", resume, overwrite) == "finished":  # before the data loads
        return nothing_to_resume(Path(pipeline) / "layout", "layout")
    cfg, data, val = layout_setup(pipeline, config_path, flags)
    if is_main():
        extend_vocabulary(Path(pipeline) / "clip", data.captioner)
    text = Path(pipeline) / "text"
    return fit(layout_stage(cfg, Path(pipeline) / "clip", data, val, text if text.is_dir() else None), cfg.train,
               Path(pipeline) / "layout", resume, overwrite=overwrite)
