"""A caption grammar for scenes: what, how many, which colour, how large, where; words and numerals.

Training captions are drawn afresh per sample and step (`SceneCaptions.sample`): sometimes the full
description of every object, sometimes a true partial one (only the digits, a count, one relation),
so the text encoder has to learn words, not template ids. `HELD_OUT_FORMS` are phrasings that never
appear in training (benchmarks/geneval.py writes the benchmark's prompts from this grammar).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from unclip.data.scenes import COLOURS, MAX_OBJECTS, SIZE, GlyphPool, Obj, Scene
from unclip.layouts import GRID, box_tokens
from unclip.vocabulary import vocabulary_of

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PLURALS = ["zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines"]
COUNTS = {2: ["two", "2"], 3: ["three", "3"], 4: ["four", "4"]}
PLACE_WORDS = {
    "left": ["on the left", "at the left"], "right": ["on the right", "at the right"],
    "top": ["at the top", "on top"], "bottom": ["at the bottom", "on the bottom"],
    "centre": ["in the centre", "in the middle", "in the center"],
    **{f"{v} {h}": [f"in the {v} {h} corner", f"in the {v} {h}", f"at the {v} {h}"]
       for v in ("top", "bottom") for h in ("left", "right")},
}
# Phrasings kept out of training, to measure whether the text encoder generalises (issue: held-out phrasings).
HELD_OUT_FORMS = {
    "single": "there is {a}",
    "colour": "{a} painted {c}",
    "count": "exactly {k} {p}",
    "two": "both {a} and {b}",
    "position": "{a} placed {rel} {b}",
    "attribution": "{a} painted {ca} and {b} painted {cb}",
}
REL_WORDS = {"left": ["to the left of", "left of"], "right": ["to the right of", "right of"],
             "above": ["above", "over"], "below": ["below", "under", "beneath"]}
HELD_OUT_REL = {"left": "to the left side of", "right": "to the right side of", "above": "higher than", "below": "lower than"}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big"]}
# every word the captions are written with, training's and the held-out phrasings': what a stray word never is
CAPTION_WORDS = frozenset(re.findall(r"[a-z]+", " ".join([
    *WORDS, *PLURALS, *COLOURS, "a an the digit in coloured colored pair of and", *HELD_OUT_FORMS.values(),
    *HELD_OUT_REL.values(), *(w for ws in (*COUNTS.values(), *PLACE_WORDS.values(), *REL_WORDS.values(),
                                           *SIZE_WORDS.values()) for w in ws)])))


TRAINING_WORDS = vocabulary_of([*WORDS, *PLURALS, *COLOURS, "a an the digit in coloured colored pair of and s",
                                *(str(d) for d in range(10)),
                                *(w for ws in (*COUNTS.values(), *PLACE_WORDS.values(), *REL_WORDS.values(),
                                               *SIZE_WORDS.values()) for w in ws)])


def word_objects(scene: Scene, text: str) -> list[int]:
    """What each whitespace word of a caption of `scene` names, as a bitmask of its objects (bit i: object i): a
    digit (word, numeral or plural) every object of that digit, a colour every object of that colour; a count ("two"
    in "two red 7s") and every other word nothing. What a decoder's cross-attention is taught to ground."""
    words = [w.strip(",").lower() for w in text.split()]
    plural = lambda w: w in PLURALS or (len(w) == 2 and w[0].isdigit() and w[1] == "s")  # noqa: E731
    counts = {w for ws in COUNTS.values() for w in ws}
    bits = []
    for i, w in enumerate(words):
        digit = next((d for d in range(10) if w in (WORDS[d], str(d), PLURALS[d], f"{d}s")), None)
        after = words[i + 1 : i + 3]
        if digit is not None and w in counts and after and (plural(after[0]) or after[0] in COLOURS and after[1:]
                                                            and plural(after[1])):
            digit = None  # a count ("two 7s", "three red sevens"): the plural after it names the objects
        named = [o.digit == digit if digit is not None else o.colour == w for o in scene.objects]
        bits.append(sum(1 << j for j, hit in enumerate(named) if hit))
    return bits


def mention_order(scene: Scene, text: str) -> list[int]:
    """The scene's objects (indices) in the order a caption of it names them: by the places of the words that name
    each (`word_objects`), compared in turn ("a red 3 and a red 7": the 3, named by words 1, 2 and 5, before the 7,
    named by words 1, 5 and 6); objects no word names last, and ties in the scene's order."""
    bits = word_objects(scene, text)
    named = [[i for i, b in enumerate(bits) if b >> j & 1] or [len(bits)] for j in range(len(scene.objects))]
    return sorted(range(len(scene.objects)), key=lambda j: (named[j], j))


def box_masks(scene: Scene) -> torch.Tensor:
    """(MAX_OBJECTS, 64, 64) float: 1 inside each object's box, rows past the scene's objects empty."""
    masks = torch.zeros(MAX_OBJECTS, SIZE, SIZE)
    for j, o in enumerate(scene.objects):
        masks[j, o.y : o.y + o.size, o.x : o.x + o.size] = 1
    return masks


def noun(d: int, r: random.Random) -> str:
    return r.choice([WORDS[d], str(d), WORDS[d], f"digit {d}"])


def plural(d: int, r: random.Random) -> str:
    return r.choice([PLURALS[d], f"{d}s"])


def article(phrase: str) -> str:
    """'a' or 'an' before a phrase: of our words only eight and 8 take 'an'."""
    return ("an " if phrase.startswith(("eight", "8")) else "a ") + phrase


def phrase(obj, r: random.Random, colour: bool, size: bool, place: Optional[str] = None) -> str:
    """One object: 'a small red seven', 'a 7 in red', 'a seven coloured red at the top left'."""
    n = noun(obj.digit, r)
    size_word = obj.size_word if size else None
    if size_word:
        size_word = r.choice(SIZE_WORDS[size_word])
    if colour and r.random() < 0.3:
        core = article(" ".join(w for w in (size_word, n) if w)) + r.choice([" in ", " coloured ", " colored "]) + obj.colour
    else:
        core = article(" ".join(w for w in (size_word, obj.colour if colour else None, n) if w))
    return core + (" " + r.choice(PLACE_WORDS[place]) if place else "")


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def counted(scene: Scene, r: random.Random, colour: bool) -> str:
    """Every digit of the scene with its count: 'two sevens and a three', '3 red 6s'."""
    groups: dict[int, list] = {}
    for o in scene.objects:
        groups.setdefault(o.digit, []).append(o)
    parts = []
    for d, objs in groups.items():
        same = colour and len({o.colour for o in objs}) == 1
        c = objs[0].colour + " " if same else ""
        if len(objs) == 1:
            parts.append(article(c + noun(d, r)))
        elif len(objs) == 2 and r.random() < 0.25:
            parts.append(f"a pair of {c}{PLURALS[d]}")
        else:
            parts.append(f"{r.choice(COUNTS[len(objs)])} {c}{plural(d, r)}")
    r.shuffle(parts)
    return join(parts)


def caption(scene: Scene, r: random.Random) -> str:
    """One random true caption of `scene` (the training distribution)."""
    objs, kind = scene.objects, r.random()
    colour, size = r.random() < 0.75, r.random() < 0.4
    if len(objs) == 1:
        place = scene.place if scene.place and r.random() < 0.75 else None
        text = phrase(objs[0], r, colour, size, place)
        return r.choice(["the " + text[text.index(" ") + 1:], text]) if kind < 0.2 else text
    if kind < 0.25:
        return counted(scene, r, colour)
    if scene.layout in ("row", "column") and kind < 0.75:
        a, b = objs if r.random() < 0.5 else objs[::-1]
        rel = ("left" if a is objs[0] else "right") if scene.layout == "row" else ("above" if a is objs[0] else "below")
        pa, pb = phrase(a, r, colour, size), phrase(b, r, colour, size)
        if r.random() < 0.2:
            first, second = (("on the left", "on the right") if scene.layout == "row" else ("at the top", "at the bottom"))
            pa, pb = (phrase(objs[0], r, colour, size), phrase(objs[1], r, colour, size))
            return f"{first} {pa}, {second} {pb}"
        return f"{pa} {r.choice(REL_WORDS[rel])} {pb}"
    if scene.layout == "grid" and kind < 0.75:
        quadrants = [("top " if o.centre[1] < 32 else "bottom ") + ("left" if o.centre[0] < 32 else "right") for o in objs]
        parts = [phrase(o, r, colour, size, q) for o, q in zip(objs, quadrants)]
        return join(parts)
    parts = [phrase(o, r, colour, size) for o in objs]
    r.shuffle(parts)
    return join(parts)


class SceneCaptions:
    """Random captions for scenes; the `labels` it is given are scene indices. With the glyphs the scenes were
    drawn with (`pool`, `picks`), it also draws each caption's hard negative scene (`twins`)."""

    class_names = None  # scenes have no classes: CLIP is validated by caption retrieval
    layout_fields = {"digit": 10, "colour": len(COLOURS)}  # what a layout says of each object (unclip/models/layout.py)
    words = CAPTION_WORDS
    max_objects = MAX_OBJECTS

    def __init__(self, scenes: list[Scene], pool: Optional[GlyphPool] = None, picks: Optional[list[list[int]]] = None):
        self.scenes, self.pool, self.picks = scenes, pool, picks

    @staticmethod
    def vocabulary() -> frozenset[str]:
        """The words training captions are written with: the grammar's, without the held-out phrasings'."""
        return TRAINING_WORDS

    def sample(self, labels: torch.Tensor, keys: list[str]) -> list[str]:
        return [caption(self.scenes[i], random.Random(key)) for i, key in zip(labels.tolist(), keys)]

    def groundings(self, labels: torch.Tensor, captions: list[str], tokenizer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For captions of scenes `labels` (`sample`'s), what their tokens name: each scene's object boxes
        (`box_masks`, (B, MAX_OBJECTS, 64, 64)) and, per token of the first `length` (`tokenizer`'s ids), the objects
        its word names (`word_objects`) as (B, length, MAX_OBJECTS) 0/1 floats; the start token and the rest name none."""
        names = [[[0] * MAX_OBJECTS for _ in range(length)] for _ in captions]
        for rows, i, text in zip(names, labels.tolist(), captions):
            for (start, end), bits in zip(tokenizer.word_spans(text), word_objects(self.scenes[i], text)):
                for row in rows[start:end]:
                    row[:] = [(bits >> j) & 1 for j in range(MAX_OBJECTS)]
        return torch.stack([box_masks(self.scenes[i]) for i in labels.tolist()]), torch.tensor(names, dtype=torch.float)

    def layouts(self, labels: torch.Tensor, captions: Optional[list[str]] = None) -> torch.Tensor:
        """Scenes `labels`' layouts (B, MAX_OBJECTS, 6) long: each object's digit, colour and box corners on the
        layout lattice (`box_tokens`), -1 past a scene's last object; the objects in the order `captions` (one a
        label) name them, else the scene's."""
        texts = captions if captions is not None else [None] * len(labels)
        return torch.stack([self.scene_layout(self.scenes[i], text) for i, text in zip(labels.tolist(), texts)])

    @staticmethod
    def scene_layout(scene: Scene, text: Optional[str] = None) -> torch.Tensor:
        """A scene's layout (MAX_OBJECTS, 6) long (`layouts`' rows), its objects in the order caption `text` names
        them (`mention_order`): what the layout stage learns to write, object k being the caption's k-th (LayoutGPT
        and LLM-grounded diffusion list a caption's objects so), so that it reads each object's digit and colour off
        the words that name it rather than guess which of two named digits comes first and whose colour it takes."""
        objects = scene.objects if text is None else [scene.objects[j] for j in mention_order(scene, text)]
        rows = [[o.digit, COLOURS.index(o.colour), *box_tokens(o.x, o.y, o.x + o.size, o.y + o.size, SIZE)]
                for o in objects]
        return torch.tensor(rows + [[-1] * 6] * (MAX_OBJECTS - len(rows)), dtype=torch.long)

    @staticmethod
    def layout_scene(layout: torch.Tensor) -> Scene:
        """The scene a layout (N, 6) (`layouts`' rows; a layout stage's draw) describes, each box made the square
        of its mean side (at least 4 px) about its centre, to render with real glyphs (a perfect decoder's image)."""
        objects = []
        for digit, colour, *box in layout.tolist():
            if digit < 0:
                continue
            x0, y0, x1, y1 = (v * SIZE / GRID for v in box)
            side = max(4, round((x1 - x0 + y1 - y0) / 2))
            x = int(np.clip(round((x0 + x1 - side) / 2), 0, SIZE - side))
            y = int(np.clip(round((y0 + y1 - side) / 2), 0, SIZE - side))
            objects.append(Obj(digit, COLOURS[colour], side, x, y))
        return Scene(tuple(objects), "list")

    def sample_with_negatives(self, labels: torch.Tensor, keys: list[str]) -> tuple[list[str], list[str]]:
        """Captions (the same as `sample`'s) and, for each, a hard negative: the same words about a minimally
        changed scene (NegCLIP)."""
        pairs = [caption_with_negative(self.scenes[i], key)[:2] for i, key in zip(labels.tolist(), keys)]
        return [p for p, _ in pairs], [n for _, n in pairs]

    def twins(self, labels: torch.Tensor, keys: list[str]) -> tuple[list[str], list[str], torch.Tensor]:
        """Captions (as `sample`'s), their hard negatives, and the negatives' scenes drawn, uint8 (B, 3, 64, 64):
        each example's minimally changed twin, a pair of its own (NegCLIP's hard negative images)."""
        if self.pool is None or self.picks is None:
            raise ValueError("twins need the glyphs the scenes were drawn with")
        texts, negatives, images = [], [], []
        for i, key in zip(labels.tolist(), keys):
            text, negative, other = caption_with_negative(self.scenes[i], key, drawable=True)
            picks = twin_glyphs(self.scenes[i], self.picks[i], other, self.pool, np.random.default_rng(zlib.crc32(key.encode())))
            texts.append(text), negatives.append(negative), images.append(self.pool.render(other, picks))
        return texts, negatives, torch.stack(images)


# ---- hard negatives (ARO-style): the same caption of a minimally changed scene ----

NEGATIVES = ("colour", "relation", "digit", "count")


def perturb(scene: Scene, kind: str, r: random.Random) -> Optional[Scene]:
    """`scene` changed in one way a binding CLIP must notice, or None where `kind` does not apply:
    colour: two different digits swap colours; relation: two different digits swap places; digit: one digit changes;
    count: one object of an all-same-digit scene is dropped (or, from two, a third is added: layout 'list')."""
    objs = list(scene.objects)
    if kind in ("colour", "relation"):
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if objs[i].digit != objs[j].digit
                 and (kind == "relation" or objs[i].colour != objs[j].colour)]
        if not pairs:
            return None
        i, j = r.choice(pairs)
        a, b = objs[i], objs[j]
        if kind == "colour":
            objs[i], objs[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
        else:
            objs[i], objs[j] = replace(b, size=a.size, x=a.x, y=a.y), replace(a, size=b.size, x=b.x, y=b.y)
        return replace(scene, objects=tuple(objs))
    if kind == "digit":
        i = r.randrange(len(objs))
        new = r.choice([d for d in range(10) if d != objs[i].digit])
        objs[i] = replace(objs[i], digit=new)
        return replace(scene, objects=tuple(objs))
    if len(objs) < 2 or len({o.digit for o in objs}) != 1:
        return None
    if len(objs) > 2:
        del objs[r.randrange(len(objs))]
        return replace(scene, objects=tuple(objs))
    return replace(scene, objects=(objs[0], replace(objs[0], colour=objs[1].colour), objs[1]), layout="list")


PLACE_TERMS = ("left", "right", "above", "over", "under", "below", "beneath", "top", "bottom", "centre", "center",
               "middle")


def stacks(scene: Scene, kind: str) -> bool:
    """Whether `perturb(scene, kind)` adds a digit on top of the first (the count of two of a digit made three): a
    scene that reads as it should but cannot be drawn."""
    return kind == "count" and len(scene.objects) == 2


def caption_with_negative(scene: Scene, seed: int | str, drawable: bool = False) -> tuple[str, str, Scene]:
    """A random caption, the same caption (same random choices) of a perturbed scene that means something
    else, and that scene. A swap of places only counts where the caption says where things are. `drawable`:
    only perturbations that render as they read (not the count's third digit added on top of the first)."""
    r = random.Random(seed)
    text = caption(scene, random.Random(seed))
    kinds = [k for k in NEGATIVES if k != "digit" and (k != "relation" or any(w in text for w in PLACE_TERMS))
             and not (drawable and stacks(scene, k))]
    r.shuffle(kinds)
    for kind in [*kinds, "digit"]:  # a digit change always shows: every caption names every digit
        other = perturb(scene, kind, r)
        if other is not None:
            negative = caption(other, random.Random(seed))
            if negative != text:
                return text, negative, other
    other = perturb(scene, "digit", r)
    return text, caption(other, random.Random(seed)), other


def twin_glyphs(scene: Scene, picks: list[int], other: Scene, pool: GlyphPool, rng: np.random.Generator) -> list[int]:
    """Glyphs to draw `other` (a perturbation of `scene`, drawn with `picks`) with: an object keeps the glyph of
    the object it was (same digit and box, else the same digit, as when two swap places); a new digit gets a new one."""
    keep = {(o.digit, o.x, o.y): g for o, g in zip(scene.objects, picks)}
    by_digit = {o.digit: g for o, g in zip(scene.objects, picks)}
    return [keep.get((o.digit, o.x, o.y), by_digit.get(o.digit)) if o.digit in by_digit else pool.pick(o.digit, rng)
            for o in other.objects]
