"""The scenes benchmark: GenEval's six tasks on coloured digits, held-out pairs and phrasings, CLIP's hard
negatives, the prior against its text baseline, and the time `t2i generate` takes.

    python benchmarks/scenes.py --data-dir ../shared/data/mnist                      # the shipped pipeline
    python benchmarks/scenes.py --data-dir DIR --checkpoints runs/scenes --out benchmarks/results/scenes-x
    python benchmarks/scenes.py --data-dir DIR --only ceiling,negatives              # parts by name
    python benchmarks/scenes.py --data-dir DIR --only grounding --checkpoints DIR    # where the decoder reads each word
    python benchmarks/scenes.py --data-dir DIR --only layout --checkpoints DIR       # the layout stage's draws, rendered
    python benchmarks/scenes.py --only time --time-against runs/teacher --time-runs 5   # generate -n 16, in turns
    python benchmarks/scenes.py --data-dir DIR --only phrasings   # benchmarks/phrasings/scenes.yaml, 8 images a prompt

Prompts come from real test scenes (MNIST test digits): each task's prompt is what its scene satisfies,
so the same evaluator (benchmarks/scene_eval.py) run on those real scenes gives the ceiling. A generated
image scores 1 when the objects read from it match the prompt's Spec exactly: count, digits, colours named,
relation named. Tasks sample seen colour-digit pairs; "held-out pairs" prompts name one of the ten pairs
no training image shows; "held-out phrasings" states each task in words training never used (the grammar's own
HELD_OUT_FORMS). The part "phrasings" scores prompts written apart from the grammar, as people type them
(benchmarks/phrasings/scenes.yaml), each image against its prompt's Spec, and the same prompts' layouts drawn with
real digits; no real scene stands behind them, so they have no ceiling.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.judge import load_judge  # noqa: E402
from benchmarks.overhead import time_generate  # noqa: E402
from benchmarks.scene_eval import read_scenes  # noqa: E402
from unclip.data import default_data_dir, load_dataset  # noqa: E402
from unclip.data.mnist import load_idx_dataset  # noqa: E402
from benchmarks.geneval import PHRASINGS, TASKS, Spec, phrasings, task_prompt, task_scene_args  # noqa: E402
from unclip.data.scene_captions import (IT_REL, NEGATIVES, OPPOSITE, PLACE_TERMS, PLACE_WORDS, REL_WORDS,  # noqa: E402
                                        SIDE, SceneCaptions, caption, perturb, phrase, relation_of, stacks,
                                        twin_glyphs)
from unclip.data.scenes import COLOURS, HELD_OUT, SIZE, GlyphPool, Scene, relation_holds, sample_scene  # noqa: E402
from unclip.layouts import GRID  # noqa: E402
from unclip.diffusion.gaussian import q_sample  # noqa: E402
from unclip.images import grid, resize, save_png, to_float, to_uint8  # noqa: E402
from unclip.models.unet import attention_shares  # noqa: E402
from unclip.models.clip import CLIP  # noqa: E402
from unclip.components.clip import load_clip, prompt_conditions, text_condition  # noqa: E402
from unclip.components.decoder import decoder_condition  # noqa: E402
from unclip.components.prior import nearest_candidates, prior_cosine  # noqa: E402
from unclip.options import SamplingOptions, sampling_options  # noqa: E402
from unclip.pipeline import Pipeline, decode_and_upsample, draw  # noqa: E402
from unclip.tokenizer import Tokenizer  # noqa: E402
from unclip.components.clip import encode_images, encode_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("ceiling", "layout", "forms", "generation", "phrasings", "grounding", "negatives", "prior", "time")
HELD_COLOUR = {d: c for c, d in HELD_OUT}


def mnist_test_glyphs(data_dir: str | None) -> GlyphPool:
    """MNIST's test digits, to render scenes with."""
    return GlyphPool(*load_idx_dataset("mnist", Path(data_dir) if data_dir else default_data_dir("mnist"), train=False))


def prompt_sets(glyphs: GlyphPool, per_task: int, per_prompt: int) -> dict[str, list[tuple[str, Spec, torch.Tensor, Scene]]]:
    """Per set, (prompt, Spec, `per_prompt` renderings (other MNIST glyphs) of the real scene it was written from,
    that scene)."""
    sets: dict[str, list] = {}
    for name in [*TASKS, "held-out pairs", "held-out phrasings"]:
        items = []
        for i in range(per_task):
            r, rng = random.Random(f"{name}:{i}"), np.random.default_rng([len(items), len(name), i])
            if name == "held-out phrasings":
                task = TASKS[i % len(TASKS)]
                scene = sample_scene(rng, False, **task_scene_args(task, r))
                text, spec = task_prompt(task, scene, r, held_out=True)
            elif name == "held-out pairs":  # colour and attribution prompts naming a pair no training image shows
                task = ("colour", "attribution")[i % 2]
                scene = sample_scene(rng, False, **task_scene_args(task, r))
                first = scene.objects[0]
                objects = (replace(first, colour=HELD_COLOUR[first.digit]), *scene.objects[1:])
                scene = replace(scene, objects=objects)
                text, spec = task_prompt(task, scene, r)
            else:
                scene = sample_scene(rng, False, **task_scene_args(name, r))
                text, spec = task_prompt(name, scene, r)
            items.append((text, spec, torch.stack([glyphs.render(scene, glyphs.picks(scene, rng)) for _ in range(per_prompt)]),
                          scene))
        sets[name] = items
    return sets


# the tasks whose prompts name two different digits, and what an image for one can show, by its digits alone
TWO_DIGIT_TASKS = ("two", "position", "attribution")
OUTCOMES = ("both", "one twice", "other")


def digit_outcome(spec: Spec, found: list) -> str:
    """Of an image for a prompt naming two different digits: 'both' read (whatever their colours and places), 'one
    twice' (one named digit drawn twice, the other missing: one digit's identity copied to both objects), or 'other'."""
    want, got = sorted(d for d, _ in spec.objects), sorted(d for d, _, _ in found)
    if got == want:
        return "both"
    return "one twice" if len(got) == 2 and got[0] == got[1] and got[0] in want else "other"


def task_scores(judge, images: dict[str, torch.Tensor], specs: dict[str, list[Spec]]) -> tuple[dict[str, float], dict]:
    """Per set, the share of its images that meet their Spec ("overall": the mean over GenEval's six tasks); and for
    the tasks naming two different digits, the share of each `digit_outcome`."""
    scores, outcomes = {}, {}
    for name in images:
        found = read_scenes(judge, images[name])
        scores[name] = float(np.mean([spec.met_by(f) for spec, f in zip(specs[name], found)]))
        if name in TWO_DIGIT_TASKS:
            drawn = [digit_outcome(spec, f) for spec, f in zip(specs[name], found)]
            outcomes[name] = {o: drawn.count(o) / len(drawn) for o in OUTCOMES}
    return {**scores, "overall": float(np.mean([scores[t] for t in TASKS]))}, outcomes


@torch.no_grad()
def best_of(pipe: Pipeline, captions: list[str], options: SamplingOptions, generator: torch.Generator, k: int) -> torch.Tensor:
    """DALL-E 1's reranking: `k` draws a caption, the one the pipeline's own CLIP finds nearest it kept."""
    drawn = draw(pipe, [c for c in captions for _ in range(k)], options, generator)  # (B k, C, H, W)
    images = encode_images(pipe.clip, to_uint8(resize(drawn, pipe.clip_config.model.image_size)))
    pick = nearest_candidates(images.view(len(captions), k, -1), encode_texts(pipe.clip, pipe.tokenizer, captions)[0])
    return drawn.view(len(captions), k, *drawn.shape[1:])[torch.arange(len(captions)), pick]


@torch.no_grad()
def draw_layouts(pipe: Pipeline, sets: dict, per_prompt: int, glyphs: GlyphPool, options: SamplingOptions,
                 batch: int = 256) -> dict:
    """Per set, what a perfect decoder would draw from the layout stage: `per_prompt` layouts a prompt drawn by
    the pipeline's layout stage at the options' temperatures, each rendered with real MNIST test glyphs (uint8 (prompts x
    per_prompt, 3, 64, 64)); and how far apart a prompt's layouts put their first object (`spread`)."""
    out, spreads = {}, {}
    for name, items in sets.items():
        prompts = [text for text, *_ in items for _ in range(per_prompt)]
        images, layouts = [], []
        for start in range(0, len(prompts), batch):
            generator = torch.Generator(pipe.device).manual_seed(start)
            _, features, mask = text_condition(pipe.clip, pipe.tokenizer, prompts[start: start + batch])
            layouts.append(pipe.layout.sample(features, mask, generator, options.layout_temperature,
                                              options.layout_box_temperature).cpu())
            for i, layout in enumerate(layouts[-1]):
                scene = SceneCaptions.layout_scene(layout)
                images.append(glyphs.render(scene, glyphs.picks(scene, np.random.default_rng(start + i))))
        out[name] = torch.stack(images)
        spreads[name] = spread(torch.cat(layouts).view(len(items), per_prompt, *layouts[0].shape[1:]))
    return out, spreads


def spread(layouts: torch.Tensor) -> float:
    """How much a prompt's layouts (prompts, draws, N, F) vary: the mean distance in pixels at 64x64 between the
    centres of their first objects, over every pair of draws of a prompt (0: the same place every time)."""
    box = layouts[:, :, 0, -4:].float() * SIZE / GRID
    centre = torch.stack([box[..., 0] + box[..., 2], box[..., 1] + box[..., 3]], -1) / 2  # (prompts, draws, 2)
    distance = torch.cdist(centre, centre)  # (prompts, draws, draws)
    draws = layouts.shape[1]
    return float(distance.sum() / (len(layouts) * draws * (draws - 1)))


@torch.no_grad()
def phrasing_scores(pipe: Pipeline, judge, glyphs: GlyphPool, options: SamplingOptions, per_prompt: int,
                    path: Path = PHRASINGS, data_dir: Optional[str] = None, batch: int = 64) -> dict:
    """The prompts of a phrasings file (`phrasings`), `per_prompt` images each: the share of images meeting their
    prompt's Spec, generated and (with a layout stage) its layouts drawn with real digits, and per prompt how many
    of its images are right; for prompts that leave two or more digits unnamed ("four digits"), how many of their
    right images show one digit only (four 2s), against real scenes of that many digits (`same_digit`)."""
    items = phrasings(path)
    said = said_in_training([text for text, _ in items], data_dir)
    prompts = [text for text, _ in items for _ in range(per_prompt)]
    images = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator(pipe.device).manual_seed(start)
        images.append(to_uint8(resize(draw(pipe, prompts[start: start + batch], options, generator), SIZE)))
    drawn = {"generated": torch.cat(images)}
    if pipe.layout is not None:
        drawn["layouts drawn"] = draw_layouts(pipe, {"p": [(t, s, None, None) for t, s in items]}, per_prompt, glyphs,
                                              options)[0]["p"]
    out: dict = {"file": str(path), "prompts": len(items), "per_prompt": per_prompt, "said_in_training": sorted(said)}
    unsaid = np.array([text.lower() not in said for text, _ in items])
    open_ = [len(spec.objects) > 1 and all(d is None for d, _ in spec.objects) for _, spec in items]
    specs = [spec for _, spec in items for _ in range(per_prompt)]
    for kind, ims in drawn.items():
        found = read_scenes(judge, ims)
        met = np.array([spec.met_by(f) for spec, f in zip(specs, found)]).reshape(len(items), per_prompt)
        one_digit = [len({d for d, _, _ in f}) == 1 for k, f in enumerate(found) if open_[k // per_prompt]
                     and met.flat[k]]
        out[kind] = {"score": float(met.mean()), "unsaid_score": float(met[unsaid].mean()),
                     "right": {text: int(m.sum()) for (text, _), m in zip(items, met)},
                     "same_digit": float(np.mean(one_digit)) if one_digit else float("nan")}
    return out


def said_in_training(prompts: list[str], data_dir: Optional[str] = None, per_scene: int = 4) -> set[str]:
    """Which of `prompts` (lower-cased) the caption generator writes word for word among `per_scene` random captions
    of each training scene (220,000 for scenes' 55,000): short prompts ("a 4", "three digits") are also the grammar's."""
    wanted = {p.lower() for p in prompts}
    train = load_dataset("scenes", "train", data_dir, 3, SIZE, pixels=False).captioner
    return {c for k in range(per_scene) for i, scene in enumerate(train.scenes)
            if (c := caption(scene, random.Random(f"said:{k}:{i}"))) in wanted}


RELATION_FORMS = {  # how a caption may say that a is `rel` of b (unclip/data/scene_captions.py's `related` says all)
    "a REL b": lambda pa, rel, pb, r: f"{pa} {r.choice(REL_WORDS[rel])} {pb}",
    "b with a REL it": lambda pa, rel, pb, r: f"{pb} with {pa} {r.choice(IT_REL[rel])}",
    "a at PLACE and b at PLACE": lambda pa, rel, pb, r: f"{pa} {PLACE_WORDS[SIDE[rel]][0]} and {pb} {PLACE_WORDS[SIDE[OPPOSITE[rel]]][0]}",
    "REL b, a": lambda pa, rel, pb, r: f"{r.choice(REL_WORDS[rel])} {pb}, {pa}",
}


@torch.no_grad()
def relation_forms(pipe: Pipeline, count: int = 200, seed: int = 0) -> dict:
    """Per way of saying a relation (`RELATION_FORMS`), the share of the layout stage's layouts, for captions of `count`
    test scenes of two different digits side by side or one above the other, that put the two digits the way the
    caption says (scenes' `relation_holds`, on the boxes' centres)."""
    out, rng = {}, np.random.default_rng(seed)
    scenes = [sample_scene(rng, True, n=2, layout=("row", "column")[i % 2], digits=rng.choice(10, 2, replace=False).tolist())
              for i in range(count)]
    for name, form in RELATION_FORMS.items():
        texts, truth = [], []
        for i, s in enumerate(scenes):
            r = random.Random(f"{name}:{i}")
            a, b = s.objects if r.random() < 0.5 else s.objects[::-1]
            rel = relation_of(s, a)
            texts.append(form(phrase(a, r, True, False), rel, phrase(b, r, True, False), r))
            truth.append((a.digit, rel, b.digit))
        _, features, mask = text_condition(*pipe.captions(), texts)
        layouts = pipe.layout.sample(features, mask, torch.Generator(pipe.device).manual_seed(seed), 0.5, 0.1).cpu()
        right = 0
        for layout, (da, rel, db) in zip(layouts, truth):
            centres = {o[0]: ((o[2] + o[4]) / 2 * SIZE / GRID, (o[3] + o[5]) / 2 * SIZE / GRID) for o in layout.tolist()
                       if o[0] >= 0}
            right += da in centres and db in centres and relation_holds(centres[da], centres[db], rel)
        out[name] = {"right": right / count, "example": texts[0]}
    return out


# each relation phrase of the captions' grammar -> a phrase of the opposite relation
REVERSED = {p: REL_WORDS[OPPOSITE[rel]][min(k, len(REL_WORDS[OPPOSITE[rel]]) - 1)]
            for rel, phrases in REL_WORDS.items() for k, p in enumerate(phrases)}


RELATION = re.compile(rf"\b({'|'.join(map(re.escape, sorted(REVERSED, key=len, reverse=True)))})\b")  # longest first


def reverse_relation(text: str) -> str:
    """A position prompt with its relation reversed: "a 3 to the left of a 7" -> "a 3 to the right of a 7"."""
    return RELATION.sub(lambda m: REVERSED[m.group(1)], text, count=1)


@torch.no_grad()
def relation_reading(pipe: Pipeline, items: list) -> dict:
    """Does the layout stage read the relation word? For each position prompt, its real scene's layout scored by the
    layout stage under the prompt and under the prompt with its relation reversed: the share of prompts under
    which the real layout is the likelier, and the mean log-likelihood ratio (nats). A stage deaf to the word: 0.5
    and 0."""
    layouts = torch.stack([SceneCaptions.scene_layout(scene, text) for text, *_, scene in items]).to(pipe.device)

    def log_likelihood(prompts: list[str]) -> torch.Tensor:
        _, features, mask = text_condition(pipe.clip, pipe.tokenizer, prompts)
        return -pipe.layout.token_nll(layouts, features, mask).sum(1)

    prompts = [text for text, *_ in items]
    ratio = log_likelihood(prompts) - log_likelihood([reverse_relation(t) for t in prompts])
    return {"prompt_likelier": float((ratio > 0).float().mean()), "log_ratio": float(ratio.mean()),
            "prompts": len(prompts)}


@torch.no_grad()
def generate_sets(pipe: Pipeline, sets: dict, per_prompt: int, options: SamplingOptions, batch: int = 64,
                  true_embeddings: bool = False, caption_only: bool = False, candidates: int = 1,
                  from_real: bool = False, true_layouts: bool = False) -> dict:
    """Per set, uint8 images (prompts x per_prompt, 3, 64, 64) (enlarged if the pipeline draws smaller). With
    `true_embeddings` the prior is bypassed: each sample is decoded from the CLIP image embedding of its own real
    rendering (the set's), with the caption (what a perfect prior would hand the decoder).
    `caption_only`: the prior is bypassed and the decoder reads the caption alone, its CLIP embedding dropped
    (GLIDE's condition; for a decoder trained with `embed_drop`). `candidates` > 1: the best of that many draws
    by the pipeline's CLIP (`best_of`). `from_real`: each sample starts from its own real rendering noised to
    `options.strength` (SDEdit), to find where along the chain the decoder loses what it sees. `true_layouts`: a
    decoder that reads layouts is given each prompt's real scene's layout instead of the layout stage's (a perfect
    layout stage's)."""
    out = {}
    for name, items in sets.items():
        prompts = [text for text, *_ in items for _ in range(per_prompt)]
        scenes = [scene for *_, scene in items for _ in range(per_prompt)]
        real = torch.cat([im for _, _, im, _ in items])  # per_prompt renderings a prompt: one a sample
        images = []
        for start in range(0, len(prompts), batch):
            generator = torch.Generator(pipe.device).manual_seed(start)
            captions = prompts[start : start + batch]
            init = to_float(real[start : start + batch]) if from_real else None
            strength = options.strength if from_real else 1.0
            if caption_only or true_embeddings:  # the decoder leaves the caption out if it reads none
                cond, _ = prompt_conditions(pipe.clip, pipe.tokenizer, captions)
                if caption_only:  # the embedding is dropped: the text embedding stands in, unread
                    kept = torch.zeros(len(captions), dtype=torch.bool, device=pipe.device)
                    emb, text = cond[0], (*cond[1:], kept)
                else:
                    emb, text = encode_images(pipe.clip, real[start : start + batch]), cond[1:]
                drawn = decode_and_upsample(pipe, emb, options, generator, text=text, init=init, strength=strength)
            elif candidates > 1:
                drawn = best_of(pipe, captions, options, generator, candidates)
            else:
                layouts = SceneCaptions(scenes[start: start + batch]).layouts(torch.arange(len(captions))) \
                    if true_layouts else None
                drawn = draw(pipe, captions, options, generator, init=init, strength=strength, layouts=layouts)
            images.append(to_uint8(resize(drawn, SIZE)))
        out[name] = torch.cat(images)
        print(f"  generated {name}: {len(prompts)} images", flush=True)
    return out


@torch.no_grad()
def attention_grounding(pipe: Pipeline, sets: dict, strengths: tuple[float, ...] = (0.7, 0.5, 0.3)) -> dict:
    """Where the decoder's cross-attention puts the words that name objects (`word_objects`), for the real scenes of
    the prompts naming two different digits: each prompt's first rendering noised to t = strength x (T - 1) (where
    --from-real's trailing chain starts), read with its caption and its true CLIP embedding. Per task, strength and
    kind of word (digit, colour), the share of such a word's attention, over the pixels and averaged over the text
    levels' maps, on the boxes of the objects it names ("own"), on the scene's other objects' ("other"), and on its own
    boxes were it spread evenly ("even": their share of the image). A word each place reads alike scores own = even
    and other near own; TokenCompose's grounding loss aims at own 1, other 0."""
    m = pipe.decoder_config.model
    out: dict = {}
    for name in TWO_DIGIT_TASKS:
        captions, _, renderings, scenes = (list(x) for x in zip(*sets[name]))
        real = torch.stack([im[0] for im in renderings])
        _, features, mask = text_condition(pipe.clip, pipe.tokenizer, captions)
        boxes, names = SceneCaptions(scenes).groundings(torch.arange(len(scenes)), captions, pipe.tokenizer, features.shape[1])
        present = boxes.flatten(2).amax(-1)[:, None]  # (B, 1, N): the scene's objects
        others = (present - names).clamp(min=0) * names.amax(-1, keepdim=True)  # what a grounded word does not name
        colour = torch.zeros(names.shape[:2], dtype=torch.bool)  # (B, L): the tokens of colour words
        for b, text in enumerate(captions):
            for (start, end), word in zip(pipe.tokenizer.word_spans(text), text.split()):
                colour[b, start:end] = word.strip(",") in COLOURS
        emb = encode_images(pipe.clip, to_uint8(resize(to_float(real), pipe.clip_config.model.image_size)))
        cond = decoder_condition(pipe.decoder_config, emb, (features, mask))
        x0 = resize(to_float(real), m.image_size)
        generator = torch.Generator().manual_seed(0)
        out[name] = {}
        for strength in strengths:
            steps = torch.full((len(real),), round(strength * (len(pipe.decoder.ac) - 1)), dtype=torch.long)
            x_t = q_sample(x0, steps, torch.randn(x0.shape, generator=generator), pipe.decoder.ac)
            maps: list = []
            pipe.decoder.net(x_t, steps, *cond, drop=torch.zeros(len(real), dtype=torch.bool), maps=maps)
            own, defined = attention_shares(maps, boxes, names)
            other, _ = attention_shares(maps, boxes, others)
            even, _ = attention_shares([torch.ones_like(a) for a in maps], boxes, names)
            out[name][strength] = {}
            for kind, words in (("digit", defined & ~colour), ("colour", defined & colour)):
                if words.any():
                    out[name][strength][kind] = {k: float(v[words].mean()) for k, v in
                                                 (("own", own), ("other", other), ("even", even))}
    return out


@torch.no_grad()
def hard_negatives(clip: CLIP, tokenizer: Tokenizer, glyphs: GlyphPool, count: int) -> dict:
    """ARO-style: for real test scenes, does CLIP rank the true caption above the same caption of the scene
    changed in one way (colours swapped between digits, places swapped, one digit changed, the count changed)?
    And, the other way round, the true scene above that changed scene drawn with the same glyphs (where it can be
    drawn: not a third digit added on top of the first)?"""
    trues, negatives, images, twins, kinds = [], [], [], [], []
    for i in range(count):
        rng, r = np.random.default_rng([7, i]), random.Random(f"negative:{i}")
        scene = sample_scene(rng, True)
        picks = glyphs.picks(scene, rng)
        image = glyphs.render(scene, picks)
        for kind in NEGATIVES:
            seed = f"{i}:{kind}"
            text = caption(scene, random.Random(seed))
            other = perturb(scene, kind, r)
            if other is None or (kind == "relation" and not any(w in text for w in PLACE_TERMS)):
                continue
            negative = caption(other, random.Random(seed))
            if negative == text:  # the caption does not say what changed (no colours named, say)
                continue
            twin = None if stacks(scene, kind) else glyphs.render(other, twin_glyphs(scene, picks, other, glyphs,
                                                                                     np.random.default_rng([8, i])))
            trues.append(text), negatives.append(negative), images.append(image), twins.append(twin), kinds.append(kind)
    image_emb = encode_images(clip, torch.stack(images))
    true_emb = encode_texts(clip, tokenizer, trues)[0]
    negative_emb = encode_texts(clip, tokenizer, negatives)[0]
    drawn = [k for k, t in enumerate(twins) if t is not None]
    twin_emb = encode_images(clip, torch.stack([twins[k] for k in drawn]))
    won_text = ((image_emb * true_emb).sum(-1) > (image_emb * negative_emb).sum(-1)).tolist()
    won_image = dict(zip(drawn, ((image_emb[drawn] * true_emb[drawn]).sum(-1) > (twin_emb * true_emb[drawn]).sum(-1)).tolist()))
    report = {}
    for kind in NEGATIVES:
        mine = [k for k, kk in enumerate(kinds) if kk == kind]
        pictured = [won_image[k] for k in mine if k in won_image]
        report[kind] = {"accuracy": float(np.mean([won_text[k] for k in mine])), "pairs": len(mine),
                        "image_accuracy": float(np.mean(pictured)), "image_pairs": len(pictured),
                        "example": (trues[mine[0]], negatives[mine[0]])}
    return report


def table(report: dict) -> list[str]:
    lines = []
    if "generation" in report or "ceiling" in report or "layout" in report:
        gen, ceil, base = report.get("generation", {}), report.get("ceiling", {}), report.get("ceiling_base", {})
        side = f"{report['base_size']}x{report['base_size']}" if "base_size" in report else "the base's size"
        lay = report.get("layout", {})
        lines += [f"| task | generated | real scenes (ceiling) | real scenes at {side}, enlarged | the layout stage's "
                  "layouts drawn with real digits | prompts x images |", "| --- | --- | --- | --- | --- | --- |"]
        cell = lambda d, name: f"{d[name]:.3f}" if name in d else "-"  # noqa: E731
        for name in [*TASKS, "overall", "held-out pairs", "held-out phrasings"]:
            lines.append(f"| {name} | {cell(gen, name)} | {cell(ceil, name)} | {cell(base, name)} | {cell(lay, name)} | "
                         f"{report.get('counts', {}).get(name, '-')} |")
    if "digits" in report or "ceiling_digits" in report or "layout_digits" in report:
        lines += ["", "| two different digits named: what is drawn | " + " | ".join(OUTCOMES) + " | both / (both + one twice) |",
                  "| --- | --- | --- | --- | --- |"]
        for label, digits in (("generated", report.get("digits", {})), ("real scenes", report.get("ceiling_digits", {})),
                              ("layouts drawn", report.get("layout_digits", {}))):
            for name, shares in digits.items():
                pair = shares["both"] + shares["one twice"]
                lines.append(f"| {name}, {label} | " + " | ".join(f"{shares[o]:.3f}" for o in OUTCOMES) +
                             f" | {shares['both'] / pair if pair else float('nan'):.3f} |")
    if "phrasings" in report:
        p = report["phrasings"]
        kinds = [k for k in ("generated", "layouts drawn") if k in p]
        lines += ["", f"Held-out phrasings ({p['file']}, {p['prompts']} prompts x {p['per_prompt']} images): " +
                  ", ".join(f"{k} {p[k]['score']:.3f}" for k in kinds) + f"; without the {len(p['said_in_training'])} "
                  "prompts the caption generator also writes (4 captions of each training scene): " +
                  ", ".join(f"{k} {p[k]['unsaid_score']:.3f}" for k in kinds), "",
                  "Of the right images of prompts that leave the digits unnamed (\"four digits\"), those showing one "
                  "digit only: " + ", ".join(f"{k} {p[k]['same_digit']:.3f}" for k in kinds) +
                  " (real training scenes of 2-4 digits repeat one digit 0.35 of the time, by design)", "",
                  "| prompt | " + " | ".join(f"right, {k}" for k in kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        for text in p["generated"]["right"]:
            lines.append(f"| {text} | " + " | ".join(f"{p[k]['right'][text]}/{p['per_prompt']}" for k in kinds) + " |")
    if "relation_forms" in report:
        lines += ["", "| a relation said as | the layout stage's layouts put the two digits that way (200 test scenes) | "
                  "example |", "| --- | --- | --- |"]
        lines += [f"| {name} | {v['right']:.3f} | {v['example']} |" for name, v in report["relation_forms"].items()]
    if "relation_reading" in report:
        r = report["relation_reading"]
        lines += ["", f"Layout stage, position prompts: the real layout likelier under the prompt than under it with the "
                      f"relation reversed for {r['prompt_likelier']:.3f} of {r['prompts']}, mean log-likelihood ratio "
                      f"{r['log_ratio']:.2f} nats"]
    if "layout_spread" in report:
        lines += ["", "Layout stage, how far apart a prompt's layouts put the first object (mean distance between its "
                      "centres, px at 64x64): " + ", ".join(f"{k} {v:.1f}" for k, v in report["layout_spread"].items())]
    if "grounding" in report:
        lines += ["", "| the decoder's cross-attention of a word naming objects, on the real scene noised to | strength | "
                      "words | on its own objects | on the others | its own objects' share of the image |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, by_strength in report["grounding"].items():
            for strength, kinds in by_strength.items():
                for kind, v in kinds.items():
                    lines.append(f"| {name} | {strength} | {kind} | {v['own']:.3f} | {v['other']:.3f} | {v['even']:.3f} |")
    if "negatives" in report:
        lines += ["", "| CLIP hard negative | true caption ranked first | pairs | true scene ranked first (the caption "
                  "against the changed scene drawn) | pairs | example (true / negative) |", "| --- | --- | --- | --- | --- | --- |"]
        for kind, v in report["negatives"].items():
            lines.append(f"| {kind} | {v['accuracy']:.3f} | {v['pairs']} | {v['image_accuracy']:.3f} | {v['image_pairs']} | "
                         f"{v['example'][0]} / {v['example'][1]} |")
    if "prior" in report:
        p = report["prior"]
        lines += ["", f"Prior: cosine to the true image embedding {p['prior_cosine']:.4f}, "
                      f"the caption's text embedding {p['text_cosine']:.4f} (1,000 test scenes, one caption each)"]
    if "time_16" in report:
        others = "".join(f"; {name}: {t:.2f} s" for name, t in report["times_16"].items() if name != report["checkpoints"])
        lines += ["", f"`t2i generate -n 16`, from process start, median of {report['time_runs']}, the commands in turns: "
                      f"{report['time_16']:.2f} s{others}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="MNIST IDX files")
    ap.add_argument("--checkpoints", default="scenes", help="pipeline folder or shipped name")
    ap.add_argument("--clip", default=None, help="CLIP folder for the negatives (default: the pipeline's)")
    ap.add_argument("--prompts", type=int, default=50, help="prompts a task (GenEval: >= 50)")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=2000, help="test scenes for the hard-negative table")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a sampling option over the pipeline's defaults (guidance=2, steps=20, upsampler_steps=20, ...)")
    ap.add_argument("--base-only", action="store_true",
                    help="skip the upsampler: the decoder's images, enlarged bilinearly to 64x64, are scored")
    ap.add_argument("--base-size", type=int, default=32,
                    help="the ceiling also at this size: real scenes shrunk to it and enlarged (a base decoder's ceiling); 0: skip")
    ap.add_argument("--true-embeddings", action="store_true",
                    help="bypass the prior: decode the CLIP image embedding of each prompt's real scene (the prior's ceiling)")
    ap.add_argument("--caption-only", action="store_true",
                    help="bypass the prior: the decoder reads the caption alone, its CLIP embedding dropped (GLIDE's "
                         "condition; for a decoder trained with embed_drop)")
    ap.add_argument("--true-layouts", action="store_true",
                    help="a decoder that reads layouts gets each prompt's real scene's layout (a perfect layout stage's)")
    ap.add_argument("--no-layout", action="store_true",
                    help="leave the pipeline's layout stage out: a decoder that reads layouts is given none")
    ap.add_argument("--best-of", type=int, default=1, metavar="K",
                    help="draw K images a sample and keep the one the pipeline's CLIP scores nearest the prompt")
    ap.add_argument("--from-real", action="store_true",
                    help="start each sample from its prompt's real scene noised to --set strength=S (SDEdit; default 0.8)")
    ap.add_argument("--chain", type=int, default=0, metavar="N",
                    help="the decoder samples N DDIM steps of a trailing chain, as a distilled one does: with --from-real "
                         "from the strength's own timestep (1: its first x0 estimate of the noised scene)")
    ap.add_argument("--time-against", action="append", default=[], metavar="DIR",
                    help="another pipeline to time in turns with --checkpoints (repeatable)")
    ap.add_argument("--time-runs", type=int, default=3, help="timed runs of each command")
    ap.add_argument("--phrasings", type=Path, default=PHRASINGS, help="the phrasings file the part of that name scores")
    ap.add_argument("--phrasing-images", type=int, default=8, help="images a prompt of the phrasings file")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scenes")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if args.from_real and args.best_of > 1:
        ap.error("--from-real and --best-of do not combine")
    if parts - set(PARTS):
        ap.error(f"unknown parts {parts - set(PARTS)}; use {PARTS}")
    torch.manual_seed(0)
    glyphs = mnist_test_glyphs(args.data_dir)
    judge = load_judge(args.data_dir)
    sets = prompt_sets(glyphs, args.prompts, args.per_prompt)
    report: dict = {"checkpoints": args.checkpoints, "clip": args.clip or args.checkpoints, "counts": {}}
    real = {name: torch.cat([im for _, _, im, _ in items]) for name, items in sets.items()}  # per_prompt a prompt
    specs = {name: [spec for _, spec, im, _ in items for _ in im] for name, items in sets.items()}
    if "ceiling" in parts:
        report["ceiling"], report["ceiling_digits"] = task_scores(judge, real, specs)
        if args.base_size:  # the same real scenes shrunk to the base decoder's size and enlarged as --base-only does
            shrunk = {name: to_uint8(resize(resize(to_float(im), args.base_size), SIZE)) for name, im in real.items()}
            report["ceiling_base"], _ = task_scores(judge, shrunk, specs)
            report["base_size"] = args.base_size
    pipe = None
    if parts & {"generation", "grounding", "prior", "layout", "phrasings", "forms"}:
        pipe = Pipeline.load(args.checkpoints, "cpu")
        if args.base_only:
            pipe.upsampler = pipe.upsampler_config = None
        if args.no_layout:
            pipe.layout = pipe.layout_config = None
        options = sampling_options(pipe.defaults, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.overrides)})
        if args.chain:
            pipe.decoder = replace(pipe.decoder, distilled_steps=args.chain)
    if "generation" in parts:
        report["options"] = {**vars(options), "base_only": args.base_only, "true_embeddings": args.true_embeddings,
                             "caption_only": args.caption_only, "best_of": args.best_of, "from_real": args.from_real,
                             "chain": args.chain, "true_layouts": args.true_layouts,
                             "no_layout": args.no_layout}
        start = time.perf_counter()
        images = generate_sets(pipe, sets, args.per_prompt, options, true_embeddings=args.true_embeddings,
                               caption_only=args.caption_only, candidates=args.best_of, from_real=args.from_real,
                               true_layouts=args.true_layouts)
        report["generation_seconds"] = time.perf_counter() - start
        report["generation"], report["digits"] = task_scores(judge, images, specs)
        report["counts"] = {name: f"{len(items)} x {args.per_prompt}" for name, items in sets.items()}
        args.out.mkdir(parents=True, exist_ok=True)
        gallery = torch.cat([images[t][: 2 * args.per_prompt] for t in TASKS])  # two prompts a task
        save_png(grid(gallery, ncol=2 * args.per_prompt), args.out / "gallery.png", scale=2)
        report["gallery_prompts"] = {t: [text for text, *_ in sets[t][:2]] for t in TASKS}
    if "forms" in parts and pipe.layout is not None:
        report["relation_forms"] = relation_forms(pipe)
    if "phrasings" in parts:
        report["phrasings"] = phrasing_scores(pipe, judge, glyphs, options, args.phrasing_images, args.phrasings,
                                              args.data_dir)
    if "layout" in parts and pipe.layout is None and parts == {"layout"}:
        ap.error(f"--only layout: {args.checkpoints} has no layout stage its decoder reads")
    if "layout" in parts and pipe.layout is not None:  # (a pipeline without one skips the part)
        report["layout_temperature"] = options.layout_temperature
        drawn, report["layout_spread"] = draw_layouts(pipe, sets, args.per_prompt, glyphs, options)
        report["layout"], report["layout_digits"] = task_scores(judge, drawn, specs)
        report["relation_reading"] = relation_reading(pipe, sets["position"])
    if "grounding" in parts:
        if not pipe.decoder_config.model.text_levels:
            ap.error(f"--only grounding: {args.checkpoints}'s decoder has no cross-attention to the caption (text_levels)")
        report["grounding"] = attention_grounding(pipe, sets)
    if "negatives" in parts:
        clip, cfg = load_clip(args.clip or (Path(args.checkpoints) / "clip" if Path(args.checkpoints).is_dir()
                                            else args.checkpoints), "cpu")
        report["negatives"] = hard_negatives(clip, Tokenizer(cfg.model.text_context), glyphs, args.negatives)
    if "prior" in parts:
        test = load_dataset("scenes", "test", args.data_dir, 3, pipe.clip_config.model.image_size)
        idx = torch.arange(1000)
        report["prior"] = prior_cosine(pipe.clip, pipe.tokenizer, pipe.prior, test.images[idx], test.captions(idx, seed=0))
    if "time" in parts:
        report["times_16"] = time_generate([args.checkpoints, *args.time_against], "a red 3 to the left of a blue 7", args.time_runs)
        report["time_16"], report["time_runs"] = report["times_16"][args.checkpoints], args.time_runs
    lines = table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scenes.json").write_text(json.dumps(report, indent=2))
    (args.out / "scenes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
