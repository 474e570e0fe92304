"""Read a 64x64 scene image back into objects: (digit, colour, centre) for each connected bright region.

The evaluator of `benchmarks/scenes.py`, independent of t2i's models:
- objects are the connected regions of pixels brighter than `THRESHOLD` in any channel, after a 5x5
  dilation that joins a glyph's broken strokes (gaps up to 4 px; the ink of two objects is further apart:
  their boxes are at least 4 px apart and MNIST leaves a margin inside each box);
  regions under `MIN_AREA` pixels are specks, not digits;
- each region is cropped, brought to MNIST's framing (gray, longest side 20 px, centre of mass in the middle of 28x28) and
  read by the MNIST judge of `benchmarks/judge.py` (a supervised CNN, 99.3% on MNIST's test set);
- its colour is the palette colour nearest in direction to the region's summed RGB (pixel = gray x RGB,
  so the sum points along the colour whatever the glyph's gray levels);
- its centre is the centre of its bounding box.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.judge import Judge, predict
from unclip.data.scenes import PALETTE

THRESHOLD = 48  # of 255, in the brightest channel
MIN_AREA = 12  # pixels of the undilated region
COLOUR_NAMES = list(PALETTE)
COLOUR_DIRECTIONS = F.normalize(torch.tensor(list(PALETTE.values()), dtype=torch.float32), dim=1)  # (7, 3)


def components(mask: torch.Tensor, max_iters: int = 256) -> torch.Tensor:
    """Connected components (8-neighbourhood) of boolean masks (N, H, W) -> int labels (N, H, W), 0 = background.
    Label propagation: every pixel starts with its own index and takes the largest label of its neighbours
    inside the mask until nothing changes."""
    N, H, W = mask.shape
    start = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(N, -1, -1)
    labels = torch.where(mask, start, torch.zeros(()))
    for _ in range(max_iters):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def mnist_crop(gray: torch.Tensor) -> torch.Tensor:
    """A glyph's float crop (h, w), any brightness -> uint8 (1, 28, 28) framed as MNIST frames its digits."""
    gray = gray / gray.max().clamp(min=1e-6) * 255
    h, w = gray.shape
    scale = 20 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    g = F.interpolate(gray[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    mass = g.sum().clamp(min=1e-6)  # centre of mass to the middle of the 28x28 frame, as MNIST does
    cy = (g.sum(1) * torch.arange(nh)).sum() / mass
    cx = (g.sum(0) * torch.arange(nw)).sum() / mass
    top = int(min(max(round(13.5 - cy.item()), 0), 28 - nh))
    left = int(min(max(round(13.5 - cx.item()), 0), 28 - nw))
    out = torch.zeros(28, 28)
    out[top : top + nh, left : left + nw] = g
    return out.round().clamp(0, 255).to(torch.uint8)[None]


def detect(images: torch.Tensor) -> list[list[tuple[torch.Tensor, str, tuple[float, float]]]]:
    """uint8 (N, 3, H, W) -> per image, its objects as (MNIST-framed crop, colour name, centre (x, y))."""
    x = images.float()
    bright = x.amax(1)  # (N, H, W)
    mask = bright > THRESHOLD
    grown = F.max_pool2d(mask[:, None].float(), 5, stride=1, padding=2)[:, 0].bool()
    labels = components(grown)
    found = []
    for n in range(len(images)):
        objects = []
        for label in labels[n].unique():
            if label == 0:
                continue
            region = (labels[n] == label) & mask[n]
            if region.sum() < MIN_AREA:
                continue
            ys, xs = torch.nonzero(region, as_tuple=True)
            y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
            crop = (bright[n] * region)[y0:y1, x0:x1]
            rgb = (x[n] * region).sum((1, 2))
            colour = COLOUR_NAMES[int((COLOUR_DIRECTIONS @ F.normalize(rgb, dim=0)).argmax())]
            objects.append((mnist_crop(crop), colour, ((x0 + x1) / 2, (y0 + y1) / 2)))
        found.append(objects)
    return found


def read_scenes(judge: Judge, images: torch.Tensor) -> list[list[tuple[int, str, tuple[float, float]]]]:
    """uint8 (N, 3, 64, 64) -> per image, the objects it shows as (digit, colour, centre)."""
    found = detect(images)
    crops = [crop for objects in found for crop, _, _ in objects]
    digits = predict(judge, torch.stack(crops)).tolist() if crops else []
    out, k = [], 0
    for objects in found:
        out.append([(digits[k + i], colour, centre) for i, (_, colour, centre) in enumerate(objects)])
        k += len(objects)
    return out
