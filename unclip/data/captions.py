"""Captions for labelled datasets, drawn per sample from templates over each label's names.

Drawing a fresh template and name per sample (and per epoch) makes the text encoder learn language
("six", "6" and "a handwritten six" mean one thing) rather than a label id.
"""
from __future__ import annotations

import random

import torch

from unclip.vocabulary import vocabulary_of

MNIST_NAMES = [
    [word, str(i)]
    for i, word in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
]
MNIST_TEMPLATES = [
    "{}",
    "a {}",
    "the digit {}",
    "the number {}",
    "a handwritten {}",
    "a handwritten digit {}",
    "a drawing of a {}",
    "a hand-drawn {}",
    "an image of a {}",
    "a picture of the number {}",
    "a scan of a handwritten {}",
    "a black and white {}",
    "a white {} on black",
]
FASHION_NAMES = [
    ["t-shirt", "top", "tee"],
    ["trouser", "trousers", "pants"],
    ["pullover", "sweater", "jumper"],
    ["dress"],
    ["coat", "jacket"],
    ["sandal", "sandals"],
    ["shirt"],
    ["sneaker", "sneakers", "trainer"],
    ["bag", "handbag"],
    ["ankle boot", "boot", "boots"],
]
FASHION_TEMPLATES = [
    "{}",
    "a {}",
    "a photo of a {}",
    "a product photo of a {}",
    "a grayscale picture of a {}",
    "an image of a {}",
    "a small picture of a {}",
    "a {} on a black background",
]


class LabelCaptions:
    """Random captions for class labels: `names[label]` are synonyms, `templates` wrap them."""

    def __init__(self, names: list[list[str]], templates: list[str]):
        self.names = names
        self.templates = templates

    @property
    def class_names(self) -> list[str]:
        return [n[0] for n in self.names]

    def vocabulary(self) -> frozenset[str]:
        """Every word a caption of these templates and names can hold."""
        return vocabulary_of(t.format(n) for t in self.templates for names in self.names for n in names)

    def sample(self, labels: torch.Tensor, keys: list[str]) -> list[str]:
        """A caption per label, its template and name drawn with `random.Random(key)`."""
        out = []
        for label, key in zip(labels.tolist(), keys):
            r = random.Random(key)
            out.append(r.choice(self.templates).format(r.choice(self.names[label])))
        return out


class TextCaptions:
    """The captions each image came with (COCO has five): one drawn per sample with `random.Random(key)`.
    Its `labels` are image indices into `options`."""

    class_names = None

    def __init__(self, options: list[list[str]]):
        self.options = options

    def vocabulary(self) -> frozenset[str]:
        return vocabulary_of(c for options in self.options for c in options)

    def sample(self, labels: torch.Tensor, keys: list[str]) -> list[str]:
        return [random.Random(key).choice(self.options[i]) for i, key in zip(labels.tolist(), keys)]
