"""Scenes: 1 to 4 coloured MNIST digits on a 64x64 black canvas, with count, size and position.

A compositional test domain in the spirit of CLEVR: every scene is generated from MNIST glyphs on the
fly (deterministic for a split, nothing written to disk), and every caption about it can be checked.
The contract an outside evaluator relies on:

- 64x64 RGB, black background; 1 to 4 digits whose square boxes do not overlap (at least `GAP` px apart).
- A digit is an MNIST glyph scaled to an s x s square, 18 <= s <= 32, times one `PALETTE` colour
  (pixel = gray / 255 x RGB). "small" means s <= 20, "large" s >= 28.
- Layouts: one digit anywhere or at a named place (`PLACES`); two side by side ("row") or one above
  the other ("column"); three or four in the quadrants ("grid").
- "A left of B": A's centre is left of B's by at least 10% of the width; likewise right, above, below.
- `HELD_OUT` colour-digit pairs never appear in a train or val scene (CLEVR CoGenT style); test has them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

SIZE, GAP = 64, 4
MAX_OBJECTS = 4
MIN_DIGIT, MAX_DIGIT = 18, 32
PALETTE = {
    "red": (255, 48, 48), "green": (48, 224, 64), "blue": (64, 96, 255), "yellow": (255, 224, 32),
    "magenta": (240, 64, 240), "cyan": (32, 224, 224), "white": (255, 255, 255),
}
COLOURS = list(PALETTE)
HELD_OUT = frozenset({("red", 0), ("green", 1), ("blue", 2), ("yellow", 3), ("magenta", 4), ("cyan", 5),
                      ("white", 6), ("red", 7), ("green", 8), ("blue", 9)})
# Named places: the centre a single digit is placed around (x, y); the evaluator's test is `at_place`.
PLACES = {
    "left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32),
    "top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
}
RELATIONS = ("left", "right", "above", "below")
# training scenes whose objects of a digit share one colour, and whose objects all do: so that "three blue 7s",
# "two green 5s above a yellow 1" and "three blue digits" are said often enough to learn (issue 46); test has none
TRAIN_SHARES = (0.3, 0.1)


@dataclass(frozen=True)
class Obj:
    digit: int
    colour: str
    size: int  # side of the square box, px
    x: int  # top-left corner of the box
    y: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2

    @property
    def size_word(self) -> str | None:
        return "small" if self.size <= 20 else "large" if self.size >= 28 else None


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # row: left to right; column: top to bottom; grid: quadrants in reading order
    layout: str  # single | place | row | column | grid
    place: str | None = None  # the named place of a `place` layout


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, width: int = SIZE) -> bool:
    """Whether centre `a` is `relation` (left | right | above | below) of centre `b` by >= 10% of the width."""
    margin = 0.1 * width
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left": dx >= margin, "right": -dx >= margin, "above": dy >= margin, "below": -dy >= margin}[relation]


def at_place(centre: tuple[float, float], place: str, width: int = SIZE) -> bool:
    """Whether a centre lies in the region a named place stands for (thirds of the canvas; centre: the middle)."""
    x, y = centre[0] / width, centre[1] / width
    tests = {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6}
    if place == "centre":
        return 0.3 <= x <= 0.7 and 0.3 <= y <= 0.7
    return all(tests[word] for word in place.split())


def _size(rng: np.random.Generator, largest: int) -> int:
    """A size class drawn evenly (small, unnamed, large), then a size in it, at most `largest`."""
    bands = [(MIN_DIGIT, 20), (21, 27), (28, largest)] if largest >= 28 else [(MIN_DIGIT, 20), (21, largest)]
    lo, hi = bands[rng.integers(len(bands))]
    return int(rng.integers(lo, hi + 1))


def _colour(rng: np.random.Generator, digit: int, allow_held_out: bool) -> str:
    choices = [c for c in COLOURS if allow_held_out or (c, digit) not in HELD_OUT]
    return choices[rng.integers(len(choices))]


def _digits(rng: np.random.Generator, n: int) -> list[int]:
    """Digits of a scene; a third of multi-digit scenes repeat one digit (so counting has examples)."""
    if n > 1 and rng.random() < 0.35:
        return [int(rng.integers(10))] * n
    return [int(d) for d in rng.integers(0, 10, n)]


def shared(colours: list[str], digits: list[int], share: str | None, allow_held_out: bool) -> list[str]:
    """The colours of a scene's objects made to agree: `share` "digit": the objects of a digit take its first
    object's colour; "all": every object takes the first colour that no digit of the scene is held out from."""
    if share == "digit":
        first = {}
        return [first.setdefault(d, c) for d, c in zip(digits, colours)]
    if share == "all":
        return [next(c for c in (colours[0], *COLOURS) if allow_held_out or all((c, d) not in HELD_OUT for d in digits))] \
            * len(colours)
    return colours


def sample_scene(rng: np.random.Generator, allow_held_out: bool, n: int | None = None, layout: str | None = None,
                 digits: list[int] | None = None, share: str | None = None) -> Scene:
    """A random scene; `n`, `layout` and `digits` may be fixed by the caller (the benchmark's tasks do); `share`
    makes its colours agree (`shared`)."""
    n = n or int(rng.choice(range(1, MAX_OBJECTS + 1), p=[0.3, 0.35, 0.15, 0.2]))
    digits = digits or _digits(rng, n)
    colours = shared([_colour(rng, d, allow_held_out) for d in digits], digits, share, allow_held_out)
    place = None
    if n == 1:
        layout = layout or ("place" if rng.random() < 0.6 else "single")
        s = _size(rng, MAX_DIGIT)
        if layout == "place":
            place = list(PLACES)[rng.integers(len(PLACES))]
            cx, cy = (c + int(rng.integers(-3, 4)) for c in PLACES[place])
            x, y = int(np.clip(cx - s // 2, 0, SIZE - s)), int(np.clip(cy - s // 2, 0, SIZE - s))
        else:
            x, y = (int(v) for v in rng.integers(0, SIZE - s + 1, 2))
        boxes = [(s, x, y)]
    elif n == 2:
        layout = layout or ("row" if rng.random() < 0.5 else "column")
        sizes = [_size(rng, (SIZE - GAP) // 2) for _ in range(2)]
        span = sizes[0] + sizes[1] + GAP
        start = int(rng.integers(0, SIZE - span + 1))
        along = [start, start + sizes[0] + GAP + int(rng.integers(0, SIZE - span - start + 1))]
        middle = int(rng.integers(0, SIZE - max(sizes) + 1))  # both centred near one line across
        across = [int(np.clip(middle + (max(sizes) - s) // 2 + rng.integers(-3, 4), 0, SIZE - s)) for s in sizes]
        boxes = [(s, a, c) if layout == "row" else (s, c, a) for s, a, c in zip(sizes, along, across)]
    else:
        layout = "grid"
        quadrants = sorted(rng.choice(4, n, replace=False).tolist())
        half = SIZE // 2
        boxes = []
        for q in quadrants:
            s = _size(rng, half - GAP // 2)
            ox, oy = (q % 2) * (half + GAP // 2), (q // 2) * (half + GAP // 2)
            room = half - GAP // 2 - s
            boxes.append((s, ox + int(rng.integers(0, room + 1)), oy + int(rng.integers(0, room + 1))))
    objects = tuple(Obj(d, c, s, x, y) for d, c, (s, x, y) in zip(digits, colours, boxes))
    return Scene(objects, layout, place)


def render(scene: Scene, glyphs: list[torch.Tensor]) -> torch.Tensor:
    """The scene as uint8 (3, 64, 64); `glyphs[i]` is the (28, 28) uint8 MNIST image of object i."""
    canvas = torch.zeros(3, SIZE, SIZE)
    for obj, glyph in zip(scene.objects, glyphs):
        g = F.interpolate(glyph[None, None].float(), size=(obj.size, obj.size), mode="bilinear", antialias=True)[0]
        rgb = torch.tensor(PALETTE[obj.colour], dtype=torch.float32)[:, None, None] / 255
        canvas[:, obj.y : obj.y + obj.size, obj.x : obj.x + obj.size] = g * rgb
    return canvas.round().clamp(0, 255).to(torch.uint8)


class GlyphPool:
    """MNIST glyphs by digit, to draw scenes with; a glyph is an index into `images` (N, 1, 28, 28)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]

    def pick(self, digit: int, rng: np.random.Generator) -> int:
        """A random glyph of `digit` (-1, a blank, where the pool has none)."""
        pool = self.by_digit[digit]
        return int(pool[rng.integers(len(pool))]) if len(pool) else -1

    def picks(self, scene: Scene, rng: np.random.Generator) -> list[int]:
        """A random glyph for each object of `scene`."""
        return [self.pick(o.digit, rng) for o in scene.objects]

    def render(self, scene: Scene, picks: list[int]) -> torch.Tensor:
        return render(scene, [self.images[i, 0] if i >= 0 else torch.zeros(28, 28, dtype=torch.uint8) for i in picks])


def make_scenes(pool: GlyphPool, count: int, seed: int, allow_held_out: bool, render: bool = True,
                shares: tuple[float, float] = (0.0, 0.0), **fixed) -> tuple[list[Scene], Optional[torch.Tensor], list[list[int]]]:
    """`count` scenes drawn with glyphs from `pool`; deterministic for `seed`. Returns (scenes, uint8 images
    (count, 3, 64, 64), or None without `render` (the same scenes and glyphs), each scene's glyphs as indices into
    the pool's images). `shares`: the chance that a scene's objects of one digit share a colour, and that all its
    objects do (`shared`; drawn from a generator of their own, so the scenes are otherwise those of (0, 0))."""
    rng, agree = np.random.default_rng(seed), np.random.default_rng([seed, 46])
    scenes, out, picks = [], torch.zeros(count, 3, SIZE, SIZE, dtype=torch.uint8) if render else None, []
    for i in range(count):
        u = agree.random()
        share = "all" if u < shares[1] else "digit" if u < shares[0] + shares[1] else None
        scene = sample_scene(rng, allow_held_out, share=share, **fixed)
        picks.append(pool.picks(scene, rng))
        if render:
            out[i] = pool.render(scene, picks[-1])
        scenes.append(scene)
    return scenes, out, picks
