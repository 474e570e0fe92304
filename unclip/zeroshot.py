"""Zero-shot classification with a trained CLIP: the caption of highest similarity wins."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import UnidentifiedImageError

from unclip.config import ClipConfig
from unclip.data import load_dataset
from unclip.data.captions import FASHION_NAMES, MNIST_NAMES
from unclip.data.folder import load_image
from unclip.errors import UserError
from unclip.images import to_float
from unclip.models.clip import CLIP
from unclip.tokenizer import Tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: CLIP, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Unit-norm embeddings (N, D) of uint8 images (N, C, H, W), in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [
        model.encode_image(to_float(images[i : i + batch_size].to(device)))
        for i in range(0, len(images), batch_size)
    ]
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


def classify(model: CLIP, tokenizer: Tokenizer, images: torch.Tensor, labels: list[str], template: str = "{}") -> torch.Tensor:
    """Probabilities (N, K) of each label's caption (`template` filled with the label) for each image."""
    image_emb = encode_images(model, images)
    text_emb = encode_texts(model, tokenizer, [template.format(label) for label in labels])[0]
    return (model.scale().detach() * image_emb @ text_emb.T).softmax(-1)


def zero_shot_accuracy(model: CLIP, tokenizer: Tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       class_names: list[str], template: str) -> tuple[float, torch.Tensor]:
    """(accuracy, per-class accuracy (K,)) of classifying `images` against one prompt per class."""
    pred = classify(model, tokenizer, images, class_names, template).argmax(-1).cpu()
    correct = (pred == labels).float()
    per_class = torch.stack([correct[labels == k].mean() for k in range(len(class_names))])
    return correct.mean().item(), per_class


def dataset_class_names(spec: str) -> Optional[list[str]]:
    return {"mnist": [n[0] for n in MNIST_NAMES], "fashion-mnist": [n[0] for n in FASHION_NAMES]}.get(spec)


def evaluate_clip(model: CLIP, cfg: ClipConfig, data: str, data_dir: Optional[str | Path], template: str) -> dict:
    """Zero-shot accuracy of `model` on the test split of a labelled dataset."""
    test = load_dataset(data, "test", data_dir, cfg.model.image_channels, cfg.model.image_size)
    if test.labels is None:
        raise UserError(f"{data} has no class labels to evaluate zero-shot classification on")
    tokenizer = Tokenizer(cfg.model.text_context)
    acc, per_class = zero_shot_accuracy(model, tokenizer, test.images, test.labels, test.class_names, template)
    counts = torch.bincount(test.labels, minlength=len(test.class_names)).tolist()
    return {"accuracy": acc, "per_class": per_class.tolist(), "class_names": test.class_names, "counts": counts}


def load_images(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """Image files as uint8 (N, C, size, size); a file that is not an image is a UserError."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
        try:
            out.append(load_image(path, channels, size))
        except (UnidentifiedImageError, OSError, ValueError):
            raise UserError(f"{path} is not an image this tool can read") from None
    return torch.stack(out)


def classify_files(model: CLIP, cfg: ClipConfig, paths: list[Path], labels: Optional[list[str]], template: str):
    """For each image file, the labels ranked by probability: [(path, [(label, p), ...]), ...]."""
    labels = labels or dataset_class_names(cfg.train.data)
    if not labels:
        raise UserError("this CLIP was trained on a caption folder: pass the candidate captions with --labels")
    if "{}" not in template:
        raise UserError(f"--template {template!r} has no {{}} for the label")
    images = load_images(paths, cfg.model.image_channels, cfg.model.image_size)
    probs = classify(model, Tokenizer(cfg.model.text_context), images, labels, template).cpu()
    return [
        (path, sorted(zip(labels, p.tolist()), key=lambda lp: -lp[1])) for path, p in zip(paths, probs)
    ]
