"""How well a digit can be read from a noised scene: the ceiling a scenes decoder's x_t leaves for telling one digit
from another (docs/results/scenes.md). A small CNN is trained, per noise level, on the objects of two-digit
training scenes at the base decoder's 32x32, noised as the decoder's cosine schedule noises them at t = strength x 999
(fresh noise every batch), each object cropped at its true box; it is scored on the objects of test scenes (MNIST's
test digits). The true box is given, so this is a ceiling: what x_t holds of each digit where the decoder would look.

    python benchmarks/noised_digits.py --data-dir ../shared/data/mnist --out benchmarks/results/noised-digits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unclip.data import default_data_dir  # noqa: E402
from unclip.data.mnist import load_idx_dataset  # noqa: E402
from unclip.data.scenes import SIZE, GlyphPool, make_scenes  # noqa: E402
from unclip.diffusion.gaussian import q_sample  # noqa: E402
from unclip.diffusion.schedule import alphas_cumprod  # noqa: E402
from unclip.images import resize, to_float  # noqa: E402

BASE, CROP = 32, 16  # the base decoder's side; each object's box is resized to CROP x CROP


def objects(data_dir: Path, train: bool, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-digit scenes at BASE px as floats in [-1, 1] (S, 3, BASE, BASE), each object's (scene, box in BASE px:
    x, y, side) (2S, 4) and digit (2S,)."""
    pool = GlyphPool(*load_idx_dataset("mnist", data_dir, train=train))
    scenes, pixels, _ = make_scenes(pool, count, seed, allow_held_out=not train, n=2)
    scale = BASE / SIZE
    boxes = torch.tensor([[i, o.x * scale, o.y * scale, o.size * scale] for i, s in enumerate(scenes) for o in s.objects])
    digits = torch.tensor([o.digit for s in scenes for o in s.objects])
    return resize(to_float(pixels), BASE), boxes, digits


def crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each box of `boxes` (scene index, x, y, side) cut from its image and resized to CROP x CROP (bilinear)."""
    n = len(boxes)
    i, x, y, s = boxes.T
    side = images.shape[-1]
    # an affine grid per box, in the [-1, 1] coordinates grid_sample reads
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = s / side
    theta[:, 0, 2] = (2 * x + s) / side - 1
    theta[:, 1, 2] = (2 * y + s) / side - 1
    grid = F.affine_grid(theta, (n, images.shape[1], CROP, CROP), align_corners=False)
    return F.grid_sample(images[i.long()], grid, align_corners=False)


def classifier() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128 * (CROP // 4) ** 2, 256), nn.ReLU(), nn.Linear(256, 10))


def noised(images: torch.Tensor, t: int, ac: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if t < 0:
        return images
    return q_sample(images, torch.full((len(images),), t), torch.randn(images.shape, generator=generator), ac)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files")
    ap.add_argument("--strengths", default="0,0.3,0.5,0.7,0.9", help="noise levels, t = strength x 999 (0: clean)")
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--test-scenes", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "noised-digits")
    args = ap.parse_args()
    data_dir = args.data_dir or default_data_dir("mnist")
    torch.manual_seed(0)
    train, test = objects(data_dir, True, args.train_scenes, 1), objects(data_dir, False, args.test_scenes, 3)
    ac = alphas_cumprod("cosine", 1000)  # the scenes decoder's schedule
    report = {"train_objects": len(train[1]), "test_objects": len(test[1]), "crop": CROP, "base": BASE, "accuracy": {}}
    for strength in (float(s) for s in args.strengths.split(",")):
        t = round(strength * 999) if strength > 0 else -1
        generator = torch.Generator().manual_seed(0)
        net = classifier()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        start = time.perf_counter()
        for _ in range(args.epochs):
            for batch in torch.randperm(len(train[1])).split(256):
                scenes = train[1][batch, 0].long()
                images = noised(train[0][scenes], t, ac, generator)  # the whole scene noised, then the object cut
                boxes = train[1][batch].clone()
                boxes[:, 0] = torch.arange(len(batch))
                loss = F.cross_entropy(net(crops(images, boxes)), train[2][batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
        with torch.no_grad():
            images = noised(test[0], t, ac, torch.Generator().manual_seed(1))
            accuracy = (net(crops(images, test[1])).argmax(-1) == test[2]).float().mean().item()
        report["accuracy"][strength] = accuracy
        print(f"strength {strength} (t = {max(t, 0)}): {accuracy:.3f} of {len(test[2])} test objects read "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noised_digits.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
