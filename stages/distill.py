"""`t2i distill`: progressive distillation (Salimans & Ho 2022) of a pipeline's decoder into one that samples
in a few DDIM steps, written as a new pipeline folder.

Round after round (teacher_steps -> teacher_steps / 2 -> ... -> steps), a student starts from its teacher's
weights and learns to take in one DDIM step what the teacher takes in two; the loss is
`unclip.diffusion.gaussian.progressive_distillation_loss`, the loop the one every stage trains with. The first
teacher's chain is classifier-free guided at `DistillConfig.guidance` (Meng et al. 2023), so the students learn the
guidance too and sample at 1. The rounds are run folders under `OUT/distill/steps-N/` (each resumable, each a
decoder folder of its own) beside the DistillConfig they ran with (`OUT/distill/config.yaml`); `OUT` gets the
pipeline's CLIP, prior, upsampler and sampling.yaml (its guidance then 1) and, as `decoder/`, the last student.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from stages.decoder import save_samples, training_example, validation_example
from stages.distributed import is_main, training_device
from stages.frozen_clip import FrozenClip
from stages.stage_two import stage_config
from stages.runs import run_status
from stages.trainer import STATE_FILE, Stage, fit, held_out_loss
from unclip.checkpoint import (CONFIG_FILE, SAMPLING_FILE, WEIGHTS_FILE, atomic_write_text, check_fingerprint,
                               copy_stage, resolve_folder)
from unclip.config import ClipConfig, DecoderConfig, DistillConfig, load_config, load_yaml, to_yaml
from unclip.data import CaptionedImages
from unclip.diffusion.models import Diffusion
from unclip.errors import CheckpointError, ConfigError
from unclip.models.unet import UNet
from unclip.pipeline import decoder_diffusion, load_decoder, load_prior, load_sampling, prior_diffusion


def round_steps(cfg: DistillConfig) -> list[int]:
    """The students' step counts, one a round: teacher_steps / 2, / 4, ..., steps."""
    ratio = cfg.teacher_steps / cfg.steps if cfg.steps >= 1 else 0
    if cfg.steps < 1 or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
        raise ConfigError(f"distill: teacher_steps ({cfg.teacher_steps}) must be steps ({cfg.steps}) times a power "
                          "of two, at least 2")
    return [cfg.teacher_steps >> r for r in range(1, round(math.log2(ratio)) + 1)]


def distill_stage(cfg: DistillConfig, student_cfg: DecoderConfig, teacher: Diffusion, guidance: float,
                  frozen: FrozenClip, prior: Optional[Diffusion]) -> Stage:
    """One round: the student (a copy of the teacher's network) learns the teacher's two-step chain, guided at
    `guidance`, in one step."""
    t, m = cfg.train, student_cfg.model
    device = teacher.ac.device
    model = UNet(m, frozen.clip.config.embed_dim, text_width=frozen.clip.config.text_width)
    model = model.to(device, memory_format=torch.channels_last)  # as the decoder's
    model.load_state_dict(teacher.net.state_dict())
    base = decoder_diffusion(model, student_cfg, device)

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x0, cond = training_example(frozen, student_cfg, batch, step)  # as the decoder was trained
        return replace(base, net=module).distillation_loss(teacher, x0, cond, m.cond_drop, guidance=guidance), {}

    def validate(shipped: UNet) -> dict:
        student = replace(base, net=shipped.eval())

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x0, cond = validation_example(frozen, student_cfg, idx)
            return student.distillation_loss(teacher, x0, cond, 0.0, generator, guidance)

        return {"val_loss": held_out_loss(batch_loss, len(frozen.val), t.batch_size, device)}

    def sample(shipped: UNet, step: int, out: Path) -> torch.Tensor:
        return save_samples(frozen, replace(base, net=shipped), student_cfg, prior, step, out)

    return Stage("distill", model, student_cfg, frozen.data, loss, validate=validate, sample=sample,
                 metrics_shown=["loss", "val_loss"], objective="val_loss")


def distill(pipeline: str | Path, out: Path, config_path: Optional[Path], flags: dict, resume: bool = False) -> dict:
    """Distill `pipeline`'s decoder round by round into `out` (a pipeline folder); the last round's metrics,
    with "interrupted" when a round was stopped (the rest is left for --resume)."""
    pipeline, out = resolve_folder(pipeline), Path(out)
    for stage in ("clip", "prior", "decoder"):
        if not (pipeline / stage / CONFIG_FILE).is_file():
            raise CheckpointError(f"--pipeline {pipeline}: no {stage}/{CONFIG_FILE} (a pipeline folder holds clip/, "
                                  "prior/ and decoder/)")
    if out.resolve() == pipeline.resolve():
        raise ConfigError("--out must be a new folder: the distilled pipeline is written beside the teacher's")
    clip_cfg = load_config(ClipConfig, pipeline / "clip" / CONFIG_FILE)
    cfg = stage_config(DistillConfig, "distill", clip_cfg, config_path, flags)
    rounds = round_steps(cfg)
    if cfg.guidance is None:  # checked before minutes of loading and embedding
        sampling = load_sampling(pipeline)
        if sampling.text_guidance is not None:
            raise ConfigError(f"{pipeline / SAMPLING_FILE} guides with two scales (text_guidance), which distillation "
                              "does not learn: name the one scale to distill with --guidance")
        cfg = replace(cfg, guidance=sampling.guidance)
    device = training_device(cfg.train.device)
    teacher_net, teacher_cfg = load_decoder(pipeline / "decoder", clip_cfg, device)
    if teacher_cfg.model.distilled_steps:
        raise ConfigError(f"{pipeline / 'decoder'} is already distilled ({teacher_cfg.model.distilled_steps} steps); "
                          "distill the pipeline it came from")
    frozen = FrozenClip.load(pipeline / "clip", cfg.train)
    check_fingerprint(pipeline / "decoder", teacher_cfg.clip_fingerprint, frozen.fingerprint)
    prior_net, prior_cfg = load_prior(pipeline / "prior", clip_cfg, device)
    prior = prior_diffusion(prior_net, prior_cfg, device)
    teacher = replace(decoder_diffusion(teacher_net.requires_grad_(False), teacher_cfg, device),
                      distilled_steps=cfg.teacher_steps)  # the first teacher's chain: DDIM, trailing
    if is_main():  # what the rounds were asked to do, beside them
        atomic_write_text(out / "distill" / CONFIG_FILE, to_yaml(cfg))
    last: dict = {}
    guidance = cfg.guidance  # the first round's teacher only: its students have learnt it
    for n in rounds:
        folder = out / "distill" / f"steps-{n}"
        student_cfg = replace(teacher_cfg, model=replace(teacher_cfg.model, distilled_steps=n), train=cfg.train)
        if not (run_status(folder).get("finished") and (folder / WEIGHTS_FILE).is_file()):
            stage = distill_stage(cfg, student_cfg, teacher, guidance, frozen, prior)
            last = fit(stage, cfg.train, folder, resume and (folder / STATE_FILE).is_file())
            if last.get("interrupted"):
                return last
        net, student_cfg = load_decoder(folder, clip_cfg, device)
        teacher, guidance = decoder_diffusion(net.requires_grad_(False), student_cfg, device), 1.0
    if is_main():
        for stage in ("clip", "prior", "upsampler"):
            if (pipeline / stage / WEIGHTS_FILE).is_file():
                copy_stage(pipeline / stage, out / stage)
        defaults = (load_yaml(pipeline / SAMPLING_FILE) or {}) if (pipeline / SAMPLING_FILE).is_file() else {}
        if cfg.guidance != 1.0:  # the decoder's guidance is in its weights
            defaults = {**{k: v for k, v in defaults.items() if k != "text_guidance"}, "guidance": 1.0}
        if defaults:
            atomic_write_text(out / SAMPLING_FILE, yaml.safe_dump(defaults, sort_keys=False))
        copy_stage(out / "distill" / f"steps-{rounds[-1]}", out / "decoder")
    return last
