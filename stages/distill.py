"""`t2i distill`: progressive distillation (Salimans & Ho 2022) of a pipeline's decoder (or, `--stage prior`, its
prior) into one that samples in a few DDIM steps, written as a new pipeline folder.

Round after round (teacher_steps -> teacher_steps / 2 -> ... -> steps), a student starts from its teacher's
weights and learns to take in one DDIM step what the teacher takes in two; the loss is
`unclip.diffusion.gaussian.progressive_distillation_loss`, the loop the one every stage trains with. The first
teacher's chain is classifier-free guided at `DistillConfig.guidance` (Meng et al. 2023), so the students learn the
guidance too and sample at 1. The rounds are run folders under `OUT/distill/steps-N/` (`prior-steps-N/` for a
prior; each resumable, each a stage folder of its own) beside the DistillConfig they ran with
(`OUT/distill/config.yaml`); `OUT` gets the pipeline's other stages and sampling.yaml (the distilled stage's
guidance then 1) and, as `decoder/` (`prior/`), the last student.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from t2i.stages.decoder import save_samples, training_example, validation_example
from t2i.stages.prior import save_prior_samples
from t2i.stages.prior import training_example as prior_example, validation_example as prior_validation_example
from t2i.stages.distributed import is_main, training_device
from t2i.stages.frozen_clip import FrozenClip
from t2i.stages.stage_two import stage_config
from t2i.stages.trainer import STATE_FILE, Stage, fit, held_out_loss, nothing_to_resume, run_status
from unclip.checkpoint import (CONFIG_FILE, SAMPLING_FILE, WEIGHTS_FILE, atomic_write_text,
                               check_fingerprint, copy_stage, resolve_folder)
from unclip.components import STAGES
from unclip.config import ClipConfig, DecoderConfig, DistillConfig, PriorConfig, load_config, load_yaml, to_yaml
from unclip.data import CaptionedImages
from unclip.diffusion.process import Diffusion
from unclip.errors import CheckpointError, ConfigError, UserError
from unclip.models.prior import DiffusionPrior
from unclip.options import GUIDANCE_KEYS, load_sampling


def round_steps(cfg: DistillConfig) -> list[int]:
    """The students' step counts, one a round: teacher_steps / 2, / 4, ..., steps."""
    ratio = cfg.teacher_steps / cfg.steps if cfg.steps >= 1 else 0
    if cfg.steps < 1 or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
        raise ConfigError(f"distill: teacher_steps ({cfg.teacher_steps}) must be steps ({cfg.steps}) times a power "
                          "of two, at least 2")
    return [cfg.teacher_steps >> r for r in range(1, round(math.log2(ratio)) + 1)]


@dataclass
class Target:
    """What a round needs of the stage it distils: its training data, (x0, condition) of a training batch (at
    a step) and of validation examples, and its sample sheet of a network."""

    data: CaptionedImages
    example: Callable[[CaptionedImages, int], tuple]
    validation_example: Callable[[torch.Tensor], tuple]
    sheet: Callable[[Diffusion, int, Path], torch.Tensor]


def decoder_target(cfg: DecoderConfig, frozen: FrozenClip, prior: Diffusion) -> Target:
    # the student learns the chain it samples: with the embedding always read, whatever embed_drop trained
    cfg = replace(cfg, model=replace(cfg.model, embed_drop=0.0))
    return Target(frozen.data, lambda batch, step: training_example(frozen, cfg, batch, step),  # as it was trained
                  lambda idx: validation_example(frozen, cfg, idx),
                  lambda decoder, step, out: save_samples(frozen, decoder, cfg, prior, step, out))


def prior_target(cfg: PriorConfig, frozen: FrozenClip, net: DiffusionPrior) -> Target:
    data, image_emb = frozen.captioned(cfg.train.workers)  # `net`'s whitening is every student's: fixed
    return Target(data, lambda batch, step: prior_example(frozen, cfg, net, image_emb, batch, step),
                  lambda idx: prior_validation_example(frozen, net, idx),
                  lambda prior, step, out: save_prior_samples(frozen, prior, step, out, guidance=1.0))


def distill_stage(cfg: DistillConfig, student_cfg: DecoderConfig | PriorConfig, teacher: Diffusion, guidance: float,
                  frozen: FrozenClip, target: Target) -> Stage:
    """One round: the student (a copy of the teacher's network) learns the teacher's two-step chain, guided at
    `guidance`, in one step."""
    t, m = cfg.train, student_cfg.model
    device = teacher.ac.device
    model = copy.deepcopy(teacher.net).requires_grad_(True)  # channels_last stays so (the decoder's)
    base = replace(teacher, net=model, distilled_steps=m.distilled_steps)

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        x0, cond = target.example(batch, step)
        return replace(base, net=module).distillation_loss(teacher, x0, cond, m.cond_drop, guidance=guidance), {}

    def validate(shipped: torch.nn.Module) -> dict:
        student = replace(base, net=shipped.eval())

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x0, cond = target.validation_example(idx)
            return student.distillation_loss(teacher, x0, cond, 0.0, generator, guidance)

        return {"val_loss": held_out_loss(batch_loss, len(frozen.val), t.batch_size, device)}

    def sample(shipped: torch.nn.Module, step: int, out: Path) -> torch.Tensor:
        return target.sheet(replace(base, net=shipped), step, out)

    return Stage("distill", model, student_cfg, target.data, loss, validate=validate, sample=sample,
                 metrics_shown=["loss", "val_loss"], objective="val_loss")



def round_folder(out: Path, stage: str, steps: int) -> Path:
    """A round's run folder: OUT/distill/steps-N (a decoder's), OUT/distill/prior-steps-N."""
    return out / "distill" / (f"steps-{steps}" if stage == "decoder" else f"{stage}-steps-{steps}")


def distill(pipeline: str | Path, out: Path, config_path: Optional[Path], flags: dict, resume: bool = False,
            overwrite: bool = False) -> dict:
    """Distill `pipeline`'s decoder (or prior) round by round into `out` (a pipeline folder); the last round's
    metrics, with "interrupted" when a round was stopped (the rest is left for --resume)."""
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
    if (out / cfg.stage / WEIGHTS_FILE).is_file():  # a distilled pipeline is there already: said at once
        if resume:
            return nothing_to_resume(out, f"distill {cfg.stage}")
        if not overwrite:
            raise UserError(f"{out} holds a distilled {cfg.stage}: replace it with --overwrite, or distill into "
                            "another --out")
    spec, guidance_key = STAGES[cfg.stage], GUIDANCE_KEYS[cfg.stage]
    if cfg.guidance is None:  # checked before minutes of loading and embedding
        sampling = load_sampling(pipeline)
        if cfg.stage == "decoder" and sampling.text_guidance is not None:
            raise ConfigError(f"{pipeline / SAMPLING_FILE} guides with two scales (text_guidance), which distillation "
                              "does not learn: name the one scale to distill with --guidance")
        cfg = replace(cfg, guidance=getattr(sampling, guidance_key))
    device = training_device(cfg.train.device)
    teacher_net, teacher_cfg = spec.load(pipeline / cfg.stage, clip_cfg, device)
    if teacher_cfg.model.distilled_steps:
        raise ConfigError(f"{pipeline / cfg.stage} is already distilled ({teacher_cfg.model.distilled_steps} steps); "
                          "distill the pipeline it came from")
    frozen = FrozenClip.load(pipeline / "clip", cfg.train, pipeline / "text" if (pipeline / "text").is_dir() else None,
                             pipeline / "autoencoder" if (pipeline / "autoencoder").is_dir() and cfg.stage == "decoder" else None)
    check_fingerprint(pipeline / cfg.stage, teacher_cfg.clip_fingerprint, frozen.fingerprint)
    if cfg.stage == "decoder":
        prior = STAGES["prior"].open(pipeline / "prior", clip_cfg, device)[0]  # for its sample sheets
        target = decoder_target(replace(teacher_cfg, train=cfg.train), frozen, prior)
    else:
        target = prior_target(replace(teacher_cfg, train=cfg.train), frozen, teacher_net)
    teacher = replace(spec.diffusion(teacher_net.requires_grad_(False), teacher_cfg, device),
                      distilled_steps=cfg.teacher_steps)  # the first teacher's chain: DDIM, trailing
    if is_main():  # what the rounds were asked to do, beside them
        atomic_write_text(out / "distill" / CONFIG_FILE, to_yaml(cfg))
    last: dict = {}
    guidance = cfg.guidance  # the first round's teacher only: its students have learnt it
    for n in rounds:
        folder = round_folder(out, cfg.stage, n)
        student_cfg = replace(teacher_cfg, model=replace(teacher_cfg.model, distilled_steps=n,
                                                         distilled_guidance=cfg.guidance), train=cfg.train)
        if overwrite or not (run_status(folder).get("finished") and (folder / WEIGHTS_FILE).is_file()):
            stage = distill_stage(cfg, student_cfg, teacher, guidance, frozen, target)
            last = fit(stage, cfg.train, folder, resume and (folder / STATE_FILE).is_file(), overwrite=overwrite)
            if last.get("interrupted"):
                return last
        net, student_cfg = spec.load(folder, clip_cfg, device)
        teacher, guidance = spec.diffusion(net.requires_grad_(False), student_cfg, device), 1.0
    if is_main():
        for stage in STAGES:
            if stage != cfg.stage and (pipeline / stage / WEIGHTS_FILE).is_file():
                copy_stage(pipeline / stage, out / stage)
        defaults = (load_yaml(pipeline / SAMPLING_FILE) or {}) if (pipeline / SAMPLING_FILE).is_file() else {}
        if cfg.guidance != 1.0 or cfg.student_guidance != 1.0:  # the teacher's guidance is in the student's weights
            dropped = ("text_guidance",) if cfg.stage == "decoder" else ()
            defaults = {**{k: v for k, v in defaults.items() if k not in dropped}, guidance_key: cfg.student_guidance}
        if defaults:
            atomic_write_text(out / SAMPLING_FILE, yaml.safe_dump(defaults, sort_keys=False))
        copy_stage(round_folder(out, cfg.stage, rounds[-1]), out / cfg.stage)
    return last
