"""A caption grammar for scenes: what, how many, which colour, how large, where; words and numerals.

Training captions are drawn afresh per sample and step (`SceneCaptions.sample`): sometimes the full
description of every object, sometimes a true partial one (only the digits, a count, one relation),
so the text encoder has to learn words, not template ids. `HELD_OUT_FORMS` are phrasings that never
appear in training (benchmarks/geneval.py writes the benchmark's prompts from this grammar's core:
`noun`, `phrase`, `COUNTS`, `REL_WORDS`). Training captions also speak as people do (`caption` and the
functions it calls): more ways to say a relation ("next to", "with a 9 above it", the relation first), a count
("a couple of", "one", "three digits" with the digits unnamed), a colour ("a red-coloured 3"), fillers ("draw",
"a picture of"), articles left out ("red 4 and blue 3") and typos. Prompts written apart from all of this are the
scenes benchmark's phrasings file, which no training code reads. (Case needs no teaching: the tokenizer lowercases.)
"""
from __future__ import annotations

import random
import re
import zlib
from functools import lru_cache
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from unclip.data.scenes import COLOURS, MAX_OBJECTS, SIZE, GlyphPool, Obj, Scene, relation_holds
from unclip.layouts import GRID, box_tokens
from unclip.tokenizer import vocabulary_words
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
# What speech adds to the grammar (`caption`); none of HELD_OUT_FORMS' words ("painted", "exactly", "both", "placed",
# "higher", "lower", "side of") nor "there is": the grammar's held-out phrasings stay held out.
SPOKEN_REL = {"left": ["on the left of", "at the left of"], "right": ["on the right of", "at the right of"],
              "above": ["on top of", "atop"], "below": ["underneath"]}
IT_REL = {"left": ["to its left", "on its left", "left of it"], "right": ["to its right", "on its right", "right of it"],
          "above": ["above it", "over it", "on top of it"], "below": ["below it", "under it", "beneath it"]}
BESIDE = ["next to", "beside", "alongside", "by"]  # a row's two objects, the relation unsaid
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SIDE = {"left": "left", "right": "right", "above": "top", "below": "bottom"}  # where `a` is when a is REL of b
COPULAS = ["is", "sits", "stands"]
ONE = ["one", "a single", "just one", "only one"]  # a count of one, where "a" would do
COUPLE = ["a couple of"]  # two, with a plural
COLOUR_FORMS = ["{n} in {c}", "{n} coloured {c}", "{n} colored {c}", "{c}-coloured {n}", "{c}-colored {n}",
                "{n} that is {c}", "{n} which is {c}", "{n} in the colour {c}"]
PREFIXES = ["a picture of", "an image of", "a photo of", "draw", "draw me", "show", "show me", "i want", "i'd like",
            "give me", "make", "there's", "here's", "here is", "please draw", "can you draw", "generate"]
SUFFIXES = [" please", ".", "!"]
DIGITS_WORD = ["digits", "numbers"]  # objects counted with their digits unnamed: "three digits", "2 red numbers"


def typos(word: str) -> set[str]:
    """The misspellings `typo` makes of a word: a letter dropped, doubled, or swapped with the next."""
    out = {word[:i] + word[i + 1:] for i in range(len(word))} | {word[:i] + word[i] + word[i:] for i in range(len(word))}
    out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)}
    return out - {word}


TYPO_MIN = 4  # letters a word needs before a caption misspells it
DIGIT_NOUNS = ("digit", "digits", "number", "numbers")  # what an object is called when its digit is not said
SIZE_TERMS = {w for ws in SIZE_WORDS.values() for w in ws}
READ_WORDS = (*WORDS, *PLURALS, *COLOURS, *DIGIT_NOUNS, *SIZE_TERMS)


@lru_cache(maxsize=1)
def misspelt() -> dict[str, str]:
    """The misspelt words a caption may hold that its reading relies on (digits, colours, sizes, "digit"/"number"),
    each read as the word it misspells ("yelow": yellow); never a real word ("can" is no cyan, "even" no seven):
    none of the tokenizer's whole words."""
    named = READ_WORDS
    real = set(vocabulary_words()) | set(named)
    return {t: w for w in named if len(w) >= TYPO_MIN for t in sorted(typos(w)) if t not in real}
SPOKEN_WORDS = ["number with", "side by side one above the other a few and also plus", *BESIDE,
                *COPULAS, *ONE, *COUPLE, *(f.format(n="", c="") for f in COLOUR_FORMS), *PREFIXES, *SUFFIXES, *DIGITS_WORD,
                *(w for ws in (*SPOKEN_REL.values(), *IT_REL.values()) for w in ws)]
GRAMMAR_WORDS = [*WORDS, *PLURALS, *COLOURS, "a an the digit in coloured colored pair of and",
                 *(w for ws in (*COUNTS.values(), *PLACE_WORDS.values(), *REL_WORDS.values(), *SIZE_WORDS.values())
                   for w in ws)]
# every word the captions are written with, training's and the held-out phrasings': what a stray word never is
# (misspellings are none: stray words are the tokenizer's whole words, which no misspelling is)
CAPTION_WORDS = frozenset(re.findall(r"[a-z]+", " ".join([*GRAMMAR_WORDS, *SPOKEN_WORDS, *HELD_OUT_FORMS.values(),
                                                         *HELD_OUT_REL.values()])))
TRAINING_WORDS = vocabulary_of([*GRAMMAR_WORDS, *SPOKEN_WORDS, "s", *(str(d) for d in range(10))])


COUNT_WORDS = {"one", "1", *(w for ws in COUNTS.values() for w in ws)}
ARTICLES = {"a", "an", "the"}
NOUN_BEFORE = {*ARTICLES, "number", "digit"}  # after these a number word is the digit, never a count


def object_word(w: str) -> tuple[Optional[int], Optional[str]]:
    """The digit (word, numeral or plural) or colour a whitespace word of a caption names, if any: punctuation,
    a misspelling (`misspelt`) and a "-coloured" suffix read through."""
    w = w.strip(",.!?:;").lower()
    w = misspelt().get(w, w)
    if "-" in w:
        w = w.split("-")[0]
    digit = next((d for d in range(10) if w in (WORDS[d], str(d), PLURALS[d], f"{d}s")), None)
    return digit, (w if w in COLOURS else None)


def is_count(words: list[str], i: int) -> bool:
    """Whether number word `words[i]` counts what follows ("two 7s", "one magenta six", "three blue digits") rather
    than naming a digit ("a one", "digit 2", "a 1 and a 7"): it counts when, past colour and size words, a digit
    or "digit(s)"/"number(s)" follows it, and no article or "number" comes before it."""
    if words[i] not in COUNT_WORDS or (i and words[i - 1] in NOUN_BEFORE):
        return False
    for w in words[i + 1:]:
        digit, colour = object_word(w)
        if colour or w in SIZE_TERMS:
            continue
        return digit is not None or misspelt().get(w, w) in DIGIT_NOUNS
    return False


def pronoun(words: list[str], i: int) -> bool:
    """Whether `words[i]` is "one" standing for an object, not the digit: bare, before a place word ("one above the
    other")."""
    return words[i] == "one" and not (i and words[i - 1] in NOUN_BEFORE) and i + 1 < len(words) and \
        words[i + 1] in PLACE_TERMS


@lru_cache(maxsize=1024)  # a training batch's captions are read twice: their objects' order, then what they leave unsaid
def word_names(text: str) -> tuple[tuple[Optional[int], Optional[str]], ...]:
    """The digit or the colour each whitespace word of a caption names (`object_word`), but a count ("two" in "two
    red 7s", "one" in "one red 7") or the pronoun "one" names no digit."""
    words = [w.strip(",.!?:;").lower() for w in text.split()]
    words = [misspelt().get(w, w) for w in words]  # "fou zeros" counts as "four zeros" does
    names = [object_word(w) for w in words]
    return tuple((None, colour) if digit is not None and (is_count(words, i) or pronoun(words, i)) else (digit, colour)
                 for i, (digit, colour) in enumerate(names))


def word_objects(scene: Scene, text: str) -> list[int]:
    """What each whitespace word of a caption of `scene` names, as a bitmask of its objects (bit i: object i): a
    digit (word, numeral or plural) every object of that digit, a colour every object of that colour, every other word
    nothing (`word_names`). What a decoder's cross-attention is taught to ground, and the order the layout stage
    writes objects in (`mention_order`)."""
    bits = []
    for digit, colour in word_names(text):
        named = [o.digit == digit if digit is not None else o.colour == colour for o in scene.objects]
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


def counted(objs: tuple[Obj, ...] | list[Obj], r: random.Random, colour: bool) -> str:
    """Every digit of `objs` with its count: 'two sevens and a three', '3 red 6s', 'one magenta six', 'a couple of
    7s in blue'; a colour only where every object of that digit has it."""
    groups: dict[int, list] = {}
    for o in objs:
        groups.setdefault(o.digit, []).append(o)
    parts = []
    for d, same_digit in groups.items():
        c = same_digit[0].colour if colour and len({o.colour for o in same_digit}) == 1 else None
        if len(same_digit) == 1:
            parts.append(spoken_phrase(same_digit[0], r, c is not None, False, short=len(objs) > 2))
            continue
        k = len(same_digit)
        if k == 2 and r.random() < 0.25:
            count, p = r.choice(["a pair of", *COUPLE]), r.choice([PLURALS[d], plural(d, r)])
        else:
            count, p = r.choice(COUNTS[k]), plural(d, r)
        parts.append(f"{count} {p}" if c is None else r.choice([f"{count} {c} {p}", f"{count} {c} {p}",
                                                                  f"{count} {p} in {c}", f"{count} {c}-coloured {p}"]))
    r.shuffle(parts)
    return join(parts)


def spoken_phrase(obj: Obj, r: random.Random, colour: bool, size: bool, place: Optional[str] = None,
                  short: bool = False) -> str:
    """One object as `phrase` writes it, or as people also say it: 'one red 7', 'a red-coloured 7', 'a 7 that is
    red', 'the number 7 in red', 'a single small seven'. `short`: the grammar's words but for the determiner (a
    caption of three or four objects stays within scenes' 48-token context)."""
    if short or r.random() < 0.5:
        text = phrase(obj, r, colour, size, place)
    else:
        n = r.choice([noun(obj.digit, r), noun(obj.digit, r), f"number {obj.digit}", f"number {WORDS[obj.digit]}"])
        if size and obj.size_word:
            n = f"{r.choice(SIZE_WORDS[obj.size_word])} {n}"
        core = r.choice([*COLOUR_FORMS, "{c} {n}"]).format(n=n, c=obj.colour) if colour else n
        text = article(core) + (" " + r.choice(PLACE_WORDS[place]) if place else "")
    if r.random() < 0.2:  # another determiner than "a"
        text = r.choice(["one", "the"] if short else [*ONE, "the"]) + text[text.index(" "):]
    return text


def unnamed(objs: tuple[Obj, ...], r: random.Random, colour: bool) -> str:
    """The objects counted with their digits unnamed: 'three digits', '2 red numbers', 'a digit in blue'."""
    c = objs[0].colour if colour and len({o.colour for o in objs}) == 1 else None
    if len(objs) == 1:
        word = r.choice(["digit", "number"])
        return r.choice([f"a {word}", f"a single {word}", f"one {word}"]) if c is None else \
            r.choice([f"a {c} {word}", f"a {word} in {c}", f"one {c} {word}", f"a {c}-coloured {word}"])
    count, word = r.choice([WORDS[len(objs)], str(len(objs))] + (COUPLE if len(objs) == 2 else [])), r.choice(DIGITS_WORD)
    return f"{count} {word}" if c is None else r.choice([f"{count} {c} {word}", f"{count} {word} in {c}"])


def related(a: Obj, rel: str, b: Obj, r: random.Random, colour: bool, size: bool, row: bool) -> tuple[str, list[Obj]]:
    """Two objects, `a` `rel` of `b` (left | right | above | below), in the grammar's words or as people say it: the
    relation named, after a copula, from the second object ('a 2 with a 9 above it'), first ('left of a 7, a 3'), as
    places ('a 3 on the left and a 1 on the right'), or unsaid ('a 3 next to a 7', 'one above the other'); and the
    object it names first where the relation is said (`in_order`)."""
    pa, pb = spoken_phrase(a, r, colour, size), spoken_phrase(b, r, colour, size)
    words = REL_WORDS[rel] + SPOKEN_REL[rel]
    form = r.random()
    if form < 0.35:
        return f"{pa} {r.choice(words)} {pb}", [a]
    if form < 0.45:
        return f"{pa} {r.choice(COPULAS)} {r.choice(words)} {pb}", [a]
    if form < 0.6:
        return f"{pb} with {pa} {r.choice(IT_REL[rel])}", [b]
    if form < 0.7:
        return r.choice([f"{r.choice(words)} {pb}, {pa}", f"{r.choice(words)} {pb} {r.choice(COPULAS)} {pa}"]), [b]
    if form < 0.85:
        pa_place = r.choice(PLACE_WORDS[SIDE[rel]])
        pb_place = r.choice(PLACE_WORDS[SIDE[OPPOSITE[rel]]])
        return r.choice([f"{pa} {pa_place} and {pb} {pb_place}", f"{pa} {pa_place}, {pb} {pb_place}",
                         f"{pa_place} {pa}, {pb_place} {pb}"]), [a]
    if row:
        return r.choice([f"{pa} {r.choice(BESIDE)} {pb}", f"{pa} and {pb} side by side"]), []
    return f"{pa} and {pb}, one above the other", []


def in_order(scene: Scene, draw) -> Optional[str]:
    """A caption of `scene` from `draw()` (text and the objects it names first, or None), drawn again (up to 8 times)
    while the layout stage would be taught its objects in another order: where its words cannot tell two apart ('a 0
    with a 0 left of it'), they are written in the scene's order (`mention_order`), and its relation taught backwards."""
    for _ in range(8):
        drawn = draw()
        if drawn is None:
            return None
        text, first = drawn
        named = {j for j, o in enumerate(scene.objects) if any(o is f for f in first)}
        if set(mention_order(scene, text)[:len(named)]) == named:
            break
    return text


def relation_of(scene: Scene, first: Obj) -> str:
    """Where `first`, one object of a two-object row or column scene, is of the other: left, right, above or below."""
    on_top = first is scene.objects[0]  # a row's objects left to right, a column's top to bottom
    return ("left" if on_top else "right") if scene.layout == "row" else ("above" if on_top else "below")


def grouped(scene: Scene, r: random.Random, colour: bool) -> Optional[tuple[str, list[Obj]]]:
    """A grid scene as two groups, one above (or left of) the other, each counted: 'two green 5s above a yellow 1',
    and the group it names first; None where the scene's objects do not split so (every object of one group that way
    of every object of the other)."""
    rel = r.choice(["above", "left"])
    axis = 1 if rel == "above" else 0
    first = [o for o in scene.objects if o.centre[axis] < SIZE / 2]
    second = [o for o in scene.objects if o.centre[axis] >= SIZE / 2]
    if not first or not second or not all(relation_holds(a.centre, b.centre, rel) for a in first for b in second):
        return None
    if r.random() < 0.5:
        first, second, rel = second, first, OPPOSITE[rel]
    return f"{counted(first, r, colour)} {r.choice(REL_WORDS[rel] + SPOKEN_REL[rel])} {counted(second, r, colour)}", first


def grammar_caption(scene: Scene, r: random.Random) -> str:
    """One random true caption of `scene` before speech's fillers and typos (`caption`)."""
    objs, kind = scene.objects, r.random()
    colour, size = r.random() < 0.75, r.random() < 0.4
    if r.random() < 0.06:
        return unnamed(objs, r, colour)
    if len(objs) == 1:
        place = scene.place if scene.place and r.random() < 0.75 else None
        text = spoken_phrase(objs[0], r, colour, size, place)
        return r.choice([f"the {text.split(' ', 1)[1]}", text]) if kind < 0.2 and text.startswith(("a ", "an ")) else text
    if kind < 0.25:
        return counted(objs, r, colour)
    if scene.layout in ("row", "column") and kind < 0.75:
        def pair():
            a, b = objs if r.random() < 0.5 else objs[::-1]
            return related(a, relation_of(scene, a), b, r, colour, size, scene.layout == "row")
        return in_order(scene, pair)
    if scene.layout == "grid" and kind < 0.6:
        text = in_order(scene, lambda: grouped(scene, r, colour))
        if text is not None:
            return text
    if scene.layout == "grid" and kind < 0.85:
        quadrants = [("top " if o.centre[1] < 32 else "bottom ") + ("left" if o.centre[0] < 32 else "right") for o in objs]
        parts = [spoken_phrase(o, r, colour, size, q, short=True) for o, q in zip(objs, quadrants)]
        return join(parts)
    parts = [spoken_phrase(o, r, colour, size, short=len(objs) > 2) for o in objs]
    r.shuffle(parts)
    return r.choice([join(parts), join(parts), ", ".join(parts), " with ".join(parts), " plus ".join(parts)])


def typo(text: str, r: random.Random) -> str:
    """`text` with one word of `TYPO_MIN` letters or more misspelt (`typos`), if it has one; a digit or a colour only
    as `misspelt` reads it back (never into another real word)."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= TYPO_MIN and w.isalpha()]
    if long:
        i = r.choice(long)
        wrong = sorted(typos(words[i]))
        if words[i] in READ_WORDS:
            wrong = [t for t in wrong if misspelt().get(t) == words[i]]
        words[i] = r.choice(wrong)
    return " ".join(words)


def without_articles(text: str, r: random.Random, p: float = 0.7) -> str:
    """`text` with each article dropped at rate `p` ('red 4 and blue 3', 'blue 0 at top'), as people type: word
    dropout of the words that name nothing. Where a dropped article would change what a word names ('a 5 with a one
    left of it': a bare 'one' there stands for an object), `text` is kept whole."""
    short = " ".join(w for w in text.split(" ") if w not in ARTICLES or r.random() >= p)
    named = lambda t: [n for n in word_names(t) if n != (None, None)]  # noqa: E731
    return short if named(short) == named(text) else text


def caption(scene: Scene, r: random.Random) -> str:
    """One random true caption of `scene` (the training distribution): the grammar's, sometimes without its
    articles, with a filler before or after it ('draw a 7 please') or a word misspelt."""
    text = grammar_caption(scene, r)
    if r.random() < 0.12:
        text = without_articles(text, r)
    if r.random() < 0.2:
        text = f"{r.choice(PREFIXES)} {text}"
    if r.random() < 0.08:
        text += r.choice(SUFFIXES)
    if r.random() < 0.08:
        text = typo(text, r)
    return text


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

    def layouts(self, labels: torch.Tensor, captions: Optional[list[str]] = None,
                unnamed: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scenes `labels`' layouts (B, MAX_OBJECTS, 6) long: each object's digit, colour and box corners on the
        layout lattice (`box_tokens`), -1 past a scene's last object; the objects in the order `captions` (one a
        label) name them, else the scene's. With `unnamed`, a digit or a colour no word of its caption names ("three
        red digits", "a 5") is drawn from it uniformly instead: what the layout stage learns to write, so that one
        never tells it the other (no training scene shows a held-out pair: from true labels, "a green digit" is never
        a 1 nor "a 5" cyan, and it learns to read "a green 1" as a 7 and "a 5 in cyan" as a green 5)."""
        texts = captions if captions is not None else [None] * len(labels)
        layouts = torch.stack([self.scene_layout(self.scenes[i], text) for i, text in zip(labels.tolist(), texts)])
        if unnamed is not None and captions is not None:
            names = [[set(v) for v in zip(*word_names(text))] or [set(), set()] for text in captions]  # digits, colours
            for field, values in enumerate([range(10), COLOURS]):
                named = torch.tensor([[v in sets[field] for v in values] for sets in names])
                value = layouts[:, :, field]
                said = (value < 0) | named.gather(1, value.clamp(min=0))
                layouts[:, :, field] = torch.where(said, value, torch.randint(len(values), value.shape, generator=unnamed))
        return layouts

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
        """Captions (`sample`'s, but where no change of the scene would show in one, as in "three digits", another)
        and, for each, a hard negative: the same words about a minimally changed scene (NegCLIP)."""
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
    for attempt in range(8):  # a caption no change shows in ("three digits") gives way to another
        key = seed if attempt == 0 else f"{seed}:{attempt}"
        r = random.Random(key)
        text = caption(scene, random.Random(key))
        kinds = [k for k in NEGATIVES if k != "digit" and (k != "relation" or any(w in text for w in PLACE_TERMS))
                 and not (drawable and stacks(scene, k))]
        r.shuffle(kinds)
        for kind in [*kinds, "digit"]:  # a digit change shows in every caption that names the digits
            other = perturb(scene, kind, r)
            if other is not None:
                negative = caption(other, random.Random(key))
                if negative != text:
                    return text, negative, other
    other = perturb(scene, "digit", r)
    return text, caption(other, random.Random(key)), other


def twin_glyphs(scene: Scene, picks: list[int], other: Scene, pool: GlyphPool, rng: np.random.Generator) -> list[int]:
    """Glyphs to draw `other` (a perturbation of `scene`, drawn with `picks`) with: an object keeps the glyph of
    the object it was (same digit and box, else the same digit, as when two swap places); a new digit gets a new one."""
    keep = {(o.digit, o.x, o.y): g for o, g in zip(scene.objects, picks)}
    by_digit = {o.digit: g for o, g in zip(scene.objects, picks)}
    return [keep.get((o.digit, o.x, o.y), by_digit.get(o.digit)) if o.digit in by_digit else pool.pick(o.digit, rng)
            for o in other.objects]
