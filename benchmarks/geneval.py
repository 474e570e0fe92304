"""GenEval's six tasks (Ghosh et al. 2023) on digit scenes: the benchmark's prompts, written with the scenes'
caption grammar (unclip/data/scene_captions.py), each with the `Spec` a generated image must meet. The benchmark's,
not the library's: no training code reads them."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Optional

import yaml

from unclip.data.scene_captions import (COUNTS, HELD_OUT_FORMS, HELD_OUT_REL, REL_WORDS, article, noun, phrase, plural,
                                        relation_of)
from unclip.data.scenes import Scene, relation_holds


@dataclass
class Spec:
    """What a generated image must show: exactly these objects (digit, colour; None for any), and
    optionally relations between required objects i and j."""

    objects: list[tuple[Optional[int], Optional[str]]]
    relation: Optional[tuple[int, str, int]] = None  # (i, left|right|above|below, j)
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # more of them, all to hold

    def met_by(self, found: list[tuple[int, str, tuple[float, float]]]) -> bool:
        """`found`: detected objects as (digit, colour, centre). Count, digits, colours, relation all match."""
        if len(found) != len(self.objects):
            return False
        for order in permutations(range(len(found))):
            pairs = [(self.objects[i], found[j]) for i, j in enumerate(order)]
            if not all((d is None or d == fd) and (c is None or c == fc) for (d, c), (fd, fc, _) in pairs):
                continue
            relations = [self.relation, *self.relations] if self.relation else self.relations
            if all(relation_holds(found[order[i]][2], found[order[j]][2], rel) for i, rel, j in relations):
                return True
        return False


TASKS = ("single", "two", "count", "colour", "position", "attribution")


def task_scene_args(task: str, r: random.Random) -> dict:
    """`sample_scene` arguments for a real scene of the kind `task` prompts for (the evaluator's ceiling)."""
    a, b = r.sample(range(10), 2)
    return {
        "single": {"n": 1, "layout": "single"}, "colour": {"n": 1, "layout": "single"},
        "two": {"n": 2, "digits": [a, b]}, "position": {"n": 2, "digits": [a, b]},
        "attribution": {"n": 2, "digits": [a, b]},
        "count": {"n": (k := r.choice([2, 3, 4])), "digits": [a] * k},
    }[task]


def task_prompt(task: str, scene: Scene, r: random.Random, held_out: bool = False) -> tuple[str, Spec]:
    """The prompt of `task` that `scene` satisfies, and its Spec; `held_out` uses the unseen phrasing."""
    objs = scene.objects
    form = HELD_OUT_FORMS[task] if held_out else None
    if task in ("single", "colour"):
        o = objs[0]
        if task == "single":
            text = form.format(a=article(noun(o.digit, r))) if form else article(noun(o.digit, r))
            return text, Spec([(o.digit, None)])
        text = form.format(a=article(noun(o.digit, r)), c=o.colour) if form else phrase(o, r, colour=True, size=False)
        return text, Spec([(o.digit, o.colour)])
    if task == "count":
        k, d = len(objs), objs[0].digit
        text = form.format(k=r.choice(COUNTS[k]), p=plural(d, r)) if form else f"{r.choice(COUNTS[k])} {plural(d, r)}"
        return text, Spec([(d, None)] * k)
    a, b = objs
    if task == "two":
        pa, pb = article(noun(a.digit, r)), article(noun(b.digit, r))
        return (form.format(a=pa, b=pb) if form else f"{pa} and {pb}"), Spec([(a.digit, None), (b.digit, None)])
    if task == "attribution":
        if form:
            text = form.format(a=article(noun(a.digit, r)), ca=a.colour, b=article(noun(b.digit, r)), cb=b.colour)
        else:
            text = f"{phrase(a, r, True, False)} and {phrase(b, r, True, False)}"
        return text, Spec([(a.digit, a.colour), (b.digit, b.colour)])
    # position: the relation the layout guarantees, stated from either side
    first, second = (a, b) if r.random() < 0.5 else (b, a)
    rel = relation_of(scene, first)
    pa, pb = article(noun(first.digit, r)), article(noun(second.digit, r))
    text = form.format(a=pa, rel=HELD_OUT_REL[rel], b=pb) if form else f"{pa} {r.choice(REL_WORDS[rel])} {pb}"
    return text, Spec([(first.digit, None), (second.digit, None)], relation=(0, rel, 1))


PHRASINGS = Path(__file__).parent / "phrasings" / "scenes.yaml"


def phrasings(path: Path = PHRASINGS) -> list[tuple[str, Spec]]:
    """The held-out phrasings (benchmarks/phrasings/scenes.yaml: prompts written apart from the caption generator),
    each with its Spec."""
    entries = yaml.safe_load(Path(path).read_text())
    return [(e["prompt"], Spec([tuple(o) for o in e["objects"]], relations=[tuple(r) for r in e.get("relations", [])]))
            for e in entries]
