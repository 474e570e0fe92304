"""Zero-shot classification with a trained CLIP: the caption of highest similarity wins."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from unclip.config import ClipConfig
from unclip.data import load_dataset
from unclip.data.captions import FASHION_NAMES, MNIST_NAMES
from unclip.data.folder import load_images
from unclip.errors import UserError
from unclip.components.clip import encode_images, encode_texts
from unclip.models.clip import CLIP
from unclip.tokenizer import Tokenizer


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


def classify_files(model: CLIP, cfg: ClipConfig, paths: list[Path], labels: Optional[list[str]], template: str):
    """For each image file, the labels ranked by probability: [(path, [(label, p), ...]), ...]."""
    labels = labels or dataset_class_names(cfg.train.data)
    if not labels:
        raise UserError("this CLIP was trained on a caption folder: give the candidate captions as labels", param="labels")
    if "{}" not in template:
        raise UserError(f"template {template!r} has no {{}} for the label", param="template")
    images = load_images(paths, cfg.model.image_channels, cfg.model.image_size)
    probs = classify(model, Tokenizer(cfg.model.text_context), images, labels, template).cpu()
    return [
        (path, sorted(zip(labels, p.tolist()), key=lambda lp: -lp[1])) for path, p in zip(paths, probs)
    ]
