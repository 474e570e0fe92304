"""Stage one at sampling time: CLIP (ours, or an imported open_clip model) encoding images and captions."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unclip.checkpoint import resolve_folder
from unclip.components import StageSpec
from unclip.config import ClipConfig
from unclip.device import resolve_device
from unclip.images import to_float
from unclip.models.clip import CLIP
from unclip.models.prior import embed_scale
from unclip.tokenizer import Tokenizer


def build_clip(cfg: ClipConfig, clip_cfg: Optional[ClipConfig] = None) -> CLIP:
    """Our CLIP, or a pretrained open_clip model imported by `t2i clip-import` (the same interface)."""
    if cfg.open_clip is not None:
        from unclip.models.open_clip_import import ImportedCLIP

        return ImportedCLIP(cfg)
    return CLIP(cfg.model)


SPEC = StageSpec("clip", ClipConfig, build_clip, required=True, clip_bound=False,
                 maximize=("val_zero_shot", "val_retrieval"))


def load_clip(folder: str | Path, device: str | torch.device = "auto") -> tuple[CLIP, ClipConfig]:
    """A CLIP checkpoint folder, or a shipped pipeline's CLIP by name (`mnist`)."""
    return SPEC.load(resolve_folder(folder, "clip"), None, resolve_device(device))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: CLIP, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Unit-norm embeddings (N, D) of uint8 images (N, C, H, W), in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [model.encode_image(to_float(images[i: i + batch_size].to(device))) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: CLIP, tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit-norm embeddings (B, D), per-token features (B, L, W), token ids (B, L)) of captions."""
    was_training = model.training
    model.eval()
    tokens = tokenizer(texts).to(model_device(model))
    emb, features = model.encode_text(tokens)
    model.train(was_training)
    return emb, features, tokens


@torch.no_grad()
def text_condition(clip: CLIP, tokenizer: Tokenizer, captions: list[str]) -> tuple[torch.Tensor, ...]:
    """The condition captions give the later stages: (scaled text embedding (B, D), token features (B, L, W),
    mask (B, L)). `clip` and `tokenizer` may be a pipeline's text/ encoder and its tokenizer (`Pipeline.captions`)."""
    emb, features, tokens = encode_texts(clip, tokenizer, captions)
    mask = tokenizer.mask(tokens)
    length = int(mask.sum(1).max())  # positions after every caption's end carry nothing: drop them
    return emb * embed_scale(emb.shape[-1]), features[:, :length], mask[:, :length]


def prompt_conditions(clip: CLIP, tokenizer: Tokenizer, captions: list[str],
                      negatives: Optional[list[str]] = None) -> tuple[tuple, Optional[tuple]]:
    """`text_condition` of the captions and of their negative prompts (one each, or None), padded alike so
    that classifier-free guidance can batch them together."""
    cond = text_condition(clip, tokenizer, captions + (negatives or []))
    if negatives is None:
        return cond, None
    if len(negatives) != len(captions):
        raise ValueError(f"{len(negatives)} negative prompts for {len(captions)} captions")
    n = len(captions)
    return tuple(c[:n] for c in cond), tuple(c[n:] for c in cond)
