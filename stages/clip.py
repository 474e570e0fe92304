"""Stage one recipe: contrastive training of CLIP on captioned images."""
from __future__ import annotations

from pathlib import Path

import torch

from stages import distributed as dist
from stages.trainer import Stage, fit, seeded
from unclip.config import ClipConfig
from unclip.data import load_dataset
from unclip.models.clip import CLIP, contrastive_loss
from unclip.pipeline import resolve_device
from unclip.tokenizer import Tokenizer
from unclip.zeroshot import encode_images, encode_texts, zero_shot_accuracy


def caption_generator(seed: int, step: int) -> torch.Generator:
    """Captions of a step depend on (seed, step, rank) alone, so a resumed run draws the same ones."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + dist.rank())


def clip_stage(cfg: ClipConfig) -> Stage:
    t, m = cfg.train, cfg.model
    device = resolve_device(t.device)
    data = load_dataset(t.data, "train", t.data_dir, m.image_channels, m.image_size, t.val_size)
    val = load_dataset(t.data, "val", t.data_dir, m.image_channels, m.image_size, t.val_size)
    model = seeded(t.seed, lambda: CLIP(m)).to(device)
    tokenizer = Tokenizer(m.text_context)

    def loss(idx: torch.Tensor, step: int, module: torch.nn.Module):
        tokens = tokenizer(data.captions(idx, caption_generator(t.seed, step))).to(device)
        image_emb, text_emb, scale = module(data.pixels(idx).to(device), tokens)
        image_emb, text_emb = dist.all_gather_with_grad(image_emb), dist.all_gather_with_grad(text_emb)
        groups = dist.all_gather(data.groups(idx).to(device))
        value = contrastive_loss(image_emb, text_emb, scale, groups)
        with torch.no_grad():
            best = (image_emb @ text_emb.T).argmax(1)
            acc = (groups[best] == groups).float().mean().item()
        return value, {"acc": acc, "temperature": 1 / scale.item()}

    def validate(model: CLIP) -> dict:
        if val.labels is not None:
            acc, _ = zero_shot_accuracy(model, tokenizer, val.images, val.labels, val.class_names, cfg.template)
            return {"val_zero_shot": acc}
        # A caption folder has no classes: score retrieval of each image's caption among the distinct ones.
        texts = list(dict.fromkeys(val.texts))
        image_emb = encode_images(model, val.images)
        text_emb = encode_texts(model, tokenizer, texts)[0]
        best = (image_emb @ text_emb.T).argmax(1).cpu()
        return {"val_retrieval": (torch.tensor([texts[i] == t for i, t in zip(best.tolist(), val.texts)]).float().mean().item())}

    return Stage("clip", model, cfg, len(data), loss, validate=validate, metrics_shown=["loss", "acc"])


def train_clip(cfg: ClipConfig, out: Path, resume: bool = False) -> dict:
    return fit(clip_stage(cfg), cfg.train, out, resume)
