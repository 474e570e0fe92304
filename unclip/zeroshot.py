"""Zero-shot classification with a trained CLIP: the caption of highest similarity wins."""
from __future__ import annotations

import torch

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
        model.encode_image(images[i : i + batch_size].to(device).float().div(127.5).sub(1.0))
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
