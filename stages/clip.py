"""Stage one recipe: contrastive training of CLIP on captioned images."""
from __future__ import annotations

from pathlib import Path

import torch

from t2i.stages import distributed as dist
from t2i.stages.trainer import Stage, check_out, fit, fixed_images, nothing_to_resume, seeded
from unclip.vocabulary import save_vocabulary
from unclip.config import ClipConfig
from unclip.data import CaptionedImages, load_split
from unclip.data.prepared import convert
from unclip.errors import UserError
from unclip.models.clip import CLIP, contrastive_loss, twin_direction_loss
from unclip.images import to_float
from unclip.tokenizer import Tokenizer
from unclip.components.clip import encode_images, encode_texts
from unclip.zeroshot import zero_shot_accuracy


PRECISE_BN_IMAGES = 4096


def caption_seed(seed: int, step: int) -> int:
    """The seed of a step's captions (with each example's index): a resumed run draws the same ones."""
    return seed * 1_000_003 + step


def clip_stage(cfg: ClipConfig, eval_split: str = "val") -> Stage:
    """CLIP's stage, validated on `eval_split` (the test split only to report a finished search's winner)."""
    t, m = cfg.train, cfg.model
    if cfg.open_clip is not None:
        raise UserError("this CLIP config is an imported open_clip model, which stays frozen: train the prior and "
                        "the decoder against it with t2i decoder-train --clip DIR")
    device = dist.training_device(t.device)
    data = load_split(t, "train", m.image_channels, m.image_size)
    val = load_split(t, eval_split, m.image_channels, m.image_size)
    model = seeded(t.seed, lambda: CLIP(m)).to(device)
    tokenizer = Tokenizer(m.text_context)
    if cfg.hard_negatives and not hasattr(data.captioner, "sample_with_negatives"):
        raise UserError(f"hard_negatives needs captions that can be perturbed (--data scenes), not {t.data}")
    if cfg.hard_negative_images and not cfg.hard_negatives:
        raise UserError("hard_negative_images draws the hard negatives' scenes: set hard_negatives too")
    if cfg.twin_direction and not cfg.hard_negative_images:
        raise UserError("twin_direction compares each scene with its drawn twin: set hard_negative_images too")

    def loss(batch: CaptionedImages, step: int, module: torch.nn.Module):
        seed, n = caption_seed(t.seed, step), len(batch)
        pixels, negatives = batch.pixels(), None
        keys = batch.caption_keys(torch.arange(n), seed) if cfg.hard_negatives else None
        if cfg.hard_negative_images:  # the twins are examples of their own: (scene, caption) and (twin, negative)
            captions, negatives, twins = batch.captioner.twins(batch.labels, keys)
            pixels = torch.cat([pixels, to_float(convert(twins, m.image_channels, m.image_size))])
            captions, negatives = captions + negatives, None
        elif cfg.hard_negatives:
            captions, negatives = batch.captioner.sample_with_negatives(batch.labels, keys)
        else:
            captions = batch.captions(seed=seed)
        tokens = tokenizer(captions + (negatives or [])).to(device)
        image_emb, text_emb, scale = module(pixels.to(device), tokens)
        text_emb, negative_emb = text_emb[: len(captions)], text_emb[len(captions) :] if negatives else None
        direction = None
        if cfg.twin_direction:  # this rank's pairs: its scenes, then their twins in the same order
            direction = twin_direction_loss(*image_emb.chunk(2), *text_emb.chunk(2), scale)
        image_emb, text_emb = dist.all_gather_with_grad(image_emb), dist.all_gather_with_grad(text_emb)
        if negative_emb is not None:
            negative_emb = dist.all_gather_with_grad(negative_emb)
        groups = dist.all_gather(batch.groups(captions).to(device))
        value = contrastive_loss(image_emb, text_emb, scale, groups, negative_emb)
        with torch.no_grad():
            best = (image_emb @ text_emb.T).argmax(1)
            acc = (groups[best] == groups).float().mean().item()
        shown = {"acc": acc, "temperature": 1 / scale.item()}
        if direction is not None:
            value, shown["direction"] = value + cfg.twin_direction * direction, direction.item()
        return value, shown

    def validate(model: CLIP) -> dict:
        if val.class_names:
            acc, _ = zero_shot_accuracy(model, tokenizer, val.images, val.labels, val.class_names, cfg.template)
            return {"val_zero_shot": acc}
        # No classes (a caption folder, scenes): retrieve each image's caption among the distinct captions
        # of (at most 1,000) validation images; captions drawn with a fixed seed, so epochs compare.
        idx = torch.arange(min(1000, len(val)))
        captions = val.captions(idx, seed=0)
        texts = list(dict.fromkeys(captions))
        image_emb = encode_images(model, val.images[idx])
        text_emb = encode_texts(model, tokenizer, texts)[0]
        best = (image_emb @ text_emb.T).argmax(1).cpu()
        return {"val_retrieval": torch.tensor([texts[i] == c for i, c in zip(best.tolist(), captions)]).float().mean().item()}

    calibration = None

    def finalize(model: CLIP) -> None:
        nonlocal calibration
        if calibration is None:
            calibration = fixed_images(data, PRECISE_BN_IMAGES, t.seed)
        precise_batchnorm(model, lambda: (calibration.pixels(torch.arange(i, min(i + t.batch_size, len(calibration))))
                                          .to(device) for i in range(0, len(calibration), t.batch_size)))

    return Stage("clip", model, cfg, data, loss, validate=validate, finalize=finalize,
                 metrics_shown=["loss", "acc"], objective="val_zero_shot" if val.class_names else "val_retrieval")


@torch.no_grad()
def precise_batchnorm(model: CLIP, batches) -> None:
    """Recompute the BatchNorm statistics of the image tower for its current weights, averaged over fixed
    training batches (PreciseBN, Wu & Johnson 2021). The running averages of training lag behind weights that
    move fast: on scenes they cost the eval-mode embedding 12 points of hard-negative digit accuracy."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    for x in batches():
        model.encode_image(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def train_clip(cfg: ClipConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    if check_out(out, "clip", resume, overwrite) == "finished":  # before the data loads: said at once
        return nothing_to_resume(out, "clip")
    stage = clip_stage(cfg)
    vocabulary = getattr(getattr(stage.data, "captioner", None), "vocabulary", None)  # a stream's is not known
    if vocabulary is not None and dist.is_main():
        save_vocabulary(out, vocabulary())  # the words of its captions, for warnings of words it never saw
    return fit(stage, cfg.train, out, resume, overwrite=overwrite)
