"""An independent classifier that judges generated images (MNIST digits, or Fashion-MNIST's ten kinds of
clothing), trained once per dataset and cached.

Unrelated to CLIP: a plain supervised CNN (no text, no contrastive loss), trained on the real
training set with small random shifts. Its penultimate features serve for the Frechet distance.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from unclip.data import load_dataset
from unclip.images import to_float
from unclip.zeroshot import dataset_class_names

log = logging.getLogger(__name__)
DIGITS = dataset_class_names("mnist")  # "zero" ... "nine": the prompts whose samples are judged
CACHE = Path(os.environ.get("T2I_BENCH_CACHE", Path(__file__).parent / "cache"))


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 2) -> torch.Tensor:
    padded = F.pad(x, (pixels,) * 4)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=g).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_judge(data_dir: str, epochs: int = 3, seed: int = 0, dataset: str = "mnist") -> Judge:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = load_dataset(dataset, "train", data_dir, val_size=0)
    model, n = Judge(), len(train)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(n // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            loss = F.cross_entropy(model(_shift(train.pixels(idx), g)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("judge epoch %d: loss %.4f", epoch, loss.item())
    return model.eval()


def judge_files(dataset: str) -> tuple[Path, Path]:
    stem = "judge" if dataset == "mnist" else f"judge-{dataset}"
    return CACHE / f"{stem}.safetensors", CACHE / f"{stem}_accuracy.txt"


def load_judge(data_dir: str, dataset: str = "mnist") -> Judge:
    """The cached judge of `dataset`, trained first if absent; its test accuracy is logged and cached."""
    path, accuracy = judge_files(dataset)
    model = Judge()
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train_judge(data_dir, dataset=dataset)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path)
    test = load_dataset(dataset, "test", data_dir)
    acc = (predict(model, test.images) == test.labels).float().mean().item()
    log.info("judge test accuracy %.4f", acc)
    accuracy.write_text(f"{acc:.4f}\n")
    return model.eval()


def judge_accuracy(dataset: str = "mnist") -> float:
    """The cached judge's accuracy on the real test images (the ceiling for judged accuracy)."""
    return float(judge_files(dataset)[1].read_text())


@torch.no_grad()
def features_and_logits(model: Judge, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) -> (features (N, 128), logits (N, 10))."""
    feats = [model.features(to_float(images[i : i + batch])) for i in range(0, len(images), batch)]
    f = torch.cat(feats)
    return f, model.head(f)


def predict(model: Judge, images: torch.Tensor) -> torch.Tensor:
    return features_and_logits(model, images)[1].argmax(-1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a and b (Heusel et al. 2017)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) via the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which is symmetric PSD.
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between feature vectors."""
    d = torch.cdist(features, features)
    n = len(features)
    return float(d.sum() / (n * (n - 1)))
