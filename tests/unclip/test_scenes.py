"""Scenes: the rendering contract an outside evaluator relies on, held-out pairs, captions that are true."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
import torch

from pathlib import Path

from unclip.data import load_dataset
from benchmarks.geneval import TASKS, Spec, task_prompt, task_scene_args
from unclip.data.scene_captions import CAPTION_WORDS, SceneCaptions, caption, caption_with_negative, perturb
from unclip.data.scenes import GAP, HELD_OUT, PALETTE, GlyphPool, make_scenes, relation_holds, sample_scene
from unclip.errors import UserError


def glyph_pool(n: int = 200):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_scenes_keep_the_contract():
    images, labels = glyph_pool()
    scenes, pixels, _ = make_scenes(GlyphPool(images, labels), 300, seed=1, allow_held_out=False)
    assert pixels.shape == (300, 3, 64, 64) and pixels.dtype == torch.uint8
    for scene, image in zip(scenes, pixels):
        assert 1 <= len(scene.objects) <= 4
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for o in scene.objects:
            assert 18 <= o.size <= 32 and 0 <= o.x <= 64 - o.size and 0 <= o.y <= 64 - o.size
            assert (o.colour, o.digit) not in HELD_OUT
            inside[o.y : o.y + o.size, o.x : o.x + o.size] = True
        for a in scene.objects:  # boxes at least GAP px apart on one axis
            for b in scene.objects:
                if a is not b:
                    gap_x = max(b.x - (a.x + a.size), a.x - (b.x + b.size))
                    gap_y = max(b.y - (a.y + a.size), a.y - (b.y + b.size))
                    assert max(gap_x, gap_y) >= GAP
        assert image[:, ~inside].sum() == 0  # black outside the boxes
        if scene.layout == "row":
            assert relation_holds(scene.objects[0].centre, scene.objects[1].centre, "left")
        if scene.layout == "column":
            assert relation_holds(scene.objects[0].centre, scene.objects[1].centre, "above")
    # a digit's pixels are its glyph times its palette colour: channel ratios follow the colour
    o, image = scenes[0].objects[0], pixels[0]
    box = image[:, o.y : o.y + o.size, o.x : o.x + o.size].float()
    bright = box.max(0).values > 100
    rgb = torch.tensor(PALETTE[o.colour]).float()
    ratio = box[:, bright] / box[:, bright].max(0).values
    torch.testing.assert_close(ratio.mean(1), rgb / rgb.max(), atol=0.03, rtol=0)


def test_scenes_are_deterministic_and_test_holds_the_held_out_pairs():
    images, labels = glyph_pool()
    a, pa, _ = make_scenes(GlyphPool(images, labels), 50, seed=3, allow_held_out=False)
    b, pb, _ = make_scenes(GlyphPool(images, labels), 50, seed=3, allow_held_out=False)
    assert a == b and torch.equal(pa, pb)
    rng = np.random.default_rng(0)
    pairs = {(o.colour, o.digit) for _ in range(2000) for o in sample_scene(rng, allow_held_out=True).objects}
    assert HELD_OUT <= pairs


def test_training_captions_vary_and_hard_negatives_change_the_meaning():
    images, labels = glyph_pool()
    scenes, _, _ = make_scenes(GlyphPool(images, labels), 200, seed=1, allow_held_out=False)
    captioner = SceneCaptions(scenes)
    idx = torch.arange(200)
    a = captioner.sample(idx, [f"0:{i}" for i in range(200)])
    assert a == captioner.sample(idx, [f"0:{i}" for i in range(200)])  # a pure function of the key
    assert len(set(a)) > 150 and a != captioner.sample(idx, [f"1:{i}" for i in range(200)])
    from unclip.data.scene_captions import is_count, misspelt, pronoun

    unnamed = 0
    for scene, text in zip(scenes, a):  # every digit is named, as a word or a numeral, or none is ("three digits")
        words = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
        tokens = [misspelt().get(w, w) for w in text.lower().replace(",", " ").replace("!", "").replace(".", "").split()]
        tokens = [w for i, w in enumerate(tokens) if not (is_count(tokens, i) or pronoun(tokens, i))]  # "two 7s", "one above"
        named = {words.get(w.rstrip("s").replace("sixe", "six")) for w in tokens} | {int(w[0]) for w in tokens if w[0].isdigit()}
        if {"digit", "digits", "number", "numbers"} & set(tokens) and named <= {None}:
            unnamed += 1  # "three digits", "a digit in red"
            continue
        assert {o.digit for o in scene.objects} <= named, text
    assert 0 < unnamed < 30
    positives, negatives = captioner.sample_with_negatives(idx, [f"0:{i}" for i in range(200)])
    assert sum(p == q for p, q in zip(positives, a)) >= 200 - unnamed and all(p != n for p, n in zip(positives, negatives))


def test_each_kind_of_negative_changes_what_it_should():
    r = random.Random(0)
    scene = sample_scene(np.random.default_rng(5), True, n=2, layout="row", digits=[3, 7])
    swapped = perturb(scene, "relation", r)
    assert [o.digit for o in swapped.objects] == [7, 3] and swapped.objects[0].x == scene.objects[0].x
    three = sample_scene(np.random.default_rng(5), True, n=3, digits=[4, 4, 4])
    assert len(perturb(three, "count", r).objects) == 2 and perturb(scene, "count", r) is None
    changed = perturb(scene, "digit", r)
    assert sum(a.digit != b.digit for a, b in zip(scene.objects, changed.objects)) == 1
    text, negative, other = caption_with_negative(scene, "k")
    assert text != negative and other != scene
    pair = sample_scene(np.random.default_rng(5), True, n=2, digits=[4, 4])  # two 4s: a third can only be added
    assert all(len(caption_with_negative(pair, f"k{i}", drawable=True)[2].objects) == 2 for i in range(20))


def test_twins_draw_each_hard_negative_scene_with_the_glyphs_it_kept():
    """NegCLIP's hard negative images: the twin image shows the perturbed scene (every object found with its colour
    at its place, nothing on top of another), and an object that only moved or changed colour keeps its glyph."""
    from benchmarks.scene_eval import detect
    from tests.conftest import draw_glyphs

    glyphs, labels = draw_glyphs(300, 3)
    images, labels = torch.from_numpy(glyphs)[:, None], torch.from_numpy(labels).long()
    pool = GlyphPool(images, labels)
    scenes, pixels, picks = make_scenes(pool, 60, seed=4, allow_held_out=False)
    captioner = SceneCaptions(scenes, pool, picks)
    idx, keys = torch.arange(60), [f"0:{i}" for i in range(60)]
    texts, negatives, twins = captioner.twins(idx, keys)
    same = [t == s for t, s in zip(texts, captioner.sample(idx, keys))]  # but where sample's names no digit
    assert sum(same) >= 55 and twins.shape == pixels.shape and twins.dtype == torch.uint8
    torch.testing.assert_close(captioner.twins(idx, keys)[2], twins)  # a pure function of the key
    for scene, key, negative, twin, found in zip(scenes, keys, negatives, twins, detect(twins)):
        _, expected, other = caption_with_negative(scene, key, drawable=True)
        assert negative == expected and len(found) == len(other.objects)
        for obj in other.objects:
            near = [c for _, c, xy in found if abs(xy[0] - obj.centre[0]) < obj.size / 2 and abs(xy[1] - obj.centre[1]) < obj.size / 2]
            assert near == [obj.colour]
            was = [o for o in scene.objects if o.digit == obj.digit and o.size == obj.size]
            if len(was) == 1:  # the same glyph at the same size: the same grey, whatever the colour
                box = lambda img, o: img[:, o.y : o.y + o.size, o.x : o.x + o.size].float().max(0).values / max(PALETTE[o.colour])
                src = pixels[scenes.index(scene)]
                assert (box(twin, obj) - box(src, was[0])).abs().max() < 0.02


@pytest.mark.parametrize("held_out", [False, True])
def test_task_prompts_are_met_by_the_scenes_they_describe(held_out):
    rng, r = np.random.default_rng(0), random.Random(0)
    for task in TASKS:
        for _ in range(20):
            scene = sample_scene(rng, True, **task_scene_args(task, r))
            prompt, spec = task_prompt(task, scene, r, held_out)
            found = [(o.digit, o.colour, o.centre) for o in scene.objects]
            assert spec.met_by(found), (task, prompt)
            assert not spec.met_by(found[:-1]) and not spec.met_by(found + found[:1])  # counts are exact
            if spec.relation:  # the mirror image breaks the relation
                assert not spec.met_by([(d, c, (64 - x, 64 - y)) for d, c, (x, y) in found])


def test_scenes_need_the_mnist_files(tmp_path):
    with pytest.raises(UserError, match="scenes are drawn from MNIST digits.*train-images-idx3-ubyte"):
        load_dataset("scenes", "train", tmp_path / "empty")


def test_scenes_from_the_mnist_files(mnist_dir):
    train = load_dataset("scenes", "train", mnist_dir, channels=3, size=32, val_size=100)
    test = load_dataset("scenes", "test", mnist_dir, channels=3, size=64)
    assert train.images.shape == (900, 3, 32, 32) and test.images.shape == (200, 3, 64, 64)
    assert train.class_names is None and len(set(train.captions(torch.arange(100), seed=0))) > 80


def test_the_evaluator_finds_every_object_its_colour_and_centre():
    """benchmarks/scene_eval.py on rendered scenes (the digit reading needs MNIST's judge; the rest does not)."""
    from benchmarks.scene_eval import components, detect
    from tests.conftest import draw_glyphs

    glyphs, labels = draw_glyphs(300, 3)
    scenes, pixels, _ = make_scenes(GlyphPool(torch.from_numpy(glyphs)[:, None], torch.from_numpy(labels).long()), 100, seed=4,
                                    allow_held_out=True)
    for scene, found in zip(scenes, detect(pixels)):
        assert len(found) == len(scene.objects)
        for obj in scene.objects:  # each object has one detection of its colour, centred within its box
            near = [(c, xy) for _, c, xy in found if abs(xy[0] - obj.centre[0]) < obj.size / 2
                    and abs(xy[1] - obj.centre[1]) < obj.size / 2]
            assert [c for c, _ in near] == [obj.colour]
        assert all(crop.shape == (1, 28, 28) and crop.dtype == torch.uint8 for crop, _, _ in found)
    ring = torch.zeros(1, 9, 9, dtype=torch.bool)
    ring[0, 1, 1:8] = ring[0, 7, 1:8] = ring[0, 1:8, 1] = ring[0, 1:8, 7] = True
    ring[0, 4, 4] = True  # a separate dot inside
    labels = components(ring)
    assert len(labels[ring].unique()) == 2 and (labels[~ring] == 0).all()


def test_two_digit_outcomes_tell_a_copied_digit_from_the_two_named():
    """benchmarks/scenes.py's breakdown of a two-digit prompt's image by its digits alone."""
    from benchmarks.scenes import digit_outcome
    from benchmarks.geneval import Spec

    spec = Spec([(3, "red"), (7, "blue")], relation=(0, "left", 1))
    read = lambda *digits: [(d, "white", (10.0 * i, 0.0)) for i, d in enumerate(digits)]  # noqa: E731
    assert digit_outcome(spec, read(7, 3)) == "both"  # colours and places are the score's business, not this
    assert not spec.met_by(read(7, 3))
    assert digit_outcome(spec, read(3, 3)) == digit_outcome(spec, read(7, 7)) == "one twice"
    assert digit_outcome(spec, read(3, 5)) == digit_outcome(spec, read(3)) == digit_outcome(spec, read(5, 5)) == "other"
    assert digit_outcome(spec, read(3, 7, 7)) == "other"


def test_every_relation_phrase_reverses_to_one_of_the_opposite_relation():
    """benchmarks/scenes.py's check that the layout stage reads the relation word scores each position prompt
    against the same prompt with only its relation reversed."""
    from benchmarks.scenes import OPPOSITE, reverse_relation
    from unclip.data.scene_captions import REL_WORDS

    for rel, phrases in REL_WORDS.items():
        for phrase in phrases:
            reversed_ = reverse_relation(f"a digit 3 {phrase} a seven")
            assert reversed_.startswith("a digit 3 ") and reversed_.endswith(" a seven")
            assert reversed_[len("a digit 3 "): -len(" a seven")] in REL_WORDS[OPPOSITE[rel]], (phrase, reversed_)
    assert reverse_relation("a 3 to the left of a 7") == "a 3 to the right of a 7"  # the whole phrase, not "left of"


def test_each_word_names_the_objects_it_describes_and_its_tokens_are_found():
    """The grounding the decoder's cross-attention is taught: digits and colours name objects, counts do not."""
    from unclip.data.scene_captions import word_objects
    from unclip.data.scenes import Obj, Scene
    from unclip.tokenizer import Tokenizer

    two = lambda x, colour: Obj(2, colour, 20, x, 0)  # noqa: E731
    scene = Scene((Obj(7, "red", 20, 0, 30), two(30, "red"), Obj(7, "blue", 20, 40, 40)), "list")
    text = "two 7s and a red two, a pair of red sevens and an 8"
    # "two 7s" is a count, "a red two," the digit; "red" names both red objects, whichever it describes
    assert word_objects(scene, text) == [0, 0b101, 0, 0, 0b011, 0b010, 0, 0, 0, 0b011, 0b101, 0, 0, 0]
    assert word_objects(scene, "three red 7s") == [0, 0b011, 0b101] and word_objects(scene, "a 2 and two 7s")[3] == 0

    tokenizer = Tokenizer(16)
    text = "a small cyan 7 coloured red at the top left and a 22"
    spans, ids = tokenizer.word_spans(text), tokenizer.ids(text)
    assert spans[0][0] == 1 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # they tile the tokens
    assert spans[-1][1] == tokenizer.context - 1 and ids[tokenizer.context - 1] != 0  # cut where ids is: before the end token
    assert spans[2][1] - spans[2][0] == 2  # "cyan" is two BPE tokens
    scenes = [Scene((Obj(7, "cyan", 20, 0, 0),), "single")]
    boxes, names = SceneCaptions(scenes).groundings(torch.tensor([0]), ["a cyan digit 7"], tokenizer, 8)
    assert boxes.shape == (1, 4, 64, 64) and boxes[0, 0].sum() == 400 and boxes[0, 1:].sum() == 0
    assert names.shape == (1, 8, 4) and names[0, :, 0].tolist() == [0, 0, 1, 1, 0, 1, 0, 0]  # cy an, 7; not a, digit


def test_sample_grid_prompts_come_from_scene_captions(mnist_dir):
    """Scenes have neither classes nor fixed texts: the training grids take validation captions."""
    from t2i.stages.samples import fixed_captions

    val = load_dataset("scenes", "val", mnist_dir, channels=3, size=32, val_size=100)
    prompts = fixed_captions(SimpleNamespace(data=val, val=val))
    assert len(prompts) == 10 and len(set(prompts)) == 10 and all(isinstance(p, str) and p for p in prompts)


@pytest.mark.slow
def test_a_scenes_pipeline_trains_with_hard_negatives_and_draws_from_the_cli(mnist_dir, tmp_path):
    """--data scenes end to end on tiny models: NegCLIP with twin images and their changes' directions, then prior and a text-reading decoder, its
    cross-attention grounded and reading layouts, with sample grids; a layout stage; the benchmark's grounding measure
    on what it drew."""
    import yaml
    from typer.testing import CliRunner

    from benchmarks.scenes import attention_grounding, mnist_test_glyphs, prompt_sets
    from t2i.cli import app
    from t2i.stages.runs import read_metrics
    from unclip.pipeline import Pipeline
    from tests.conftest import TINY

    config = {
        "clip": {**TINY["clip"], "model": {**TINY["clip"]["model"], "image_channels": 3, "image_size": 32,
                                           "image_pool": "attention", "image_layers": 1, "text_context": 32},
                 "train": {**TINY["clip"]["train"], "data": "scenes", "epochs": 1}, "hard_negatives": True,
                 "hard_negative_images": True, "twin_direction": 1.0},
        "prior": TINY["prior"],
        "decoder": {**TINY["decoder"], "model": {**TINY["decoder"]["model"], "text_tokens": True, "embed_drop": 0.5, "attn_levels": [1],
                                                 "text_levels": [0], "ground_weight": 1.0, "layout": True},
                    "train": {**TINY["decoder"]["train"], "sample_every": 4}},
        "layout": {"model": {"width": 32, "layers": 1, "heads": 2}, "train": {"max_steps": 4, "batch_size": 16},
                   "stray_words": 0.5},
    }
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump(config))
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("clip-train", "--config", tmp_path / "scenes.yaml", "--data-dir", mnist_dir, "--out", tmp_path / "clip")
    assert r.exit_code == 0, r.output
    directions = [r["direction"] for r in read_metrics(tmp_path / "clip")[0] if "loss" in r]
    assert directions and all(d > 0 for d in directions)  # each scene's change from its twin against its caption's
    r = run("decoder-train", "--clip", tmp_path / "clip", "--config", tmp_path / "scenes.yaml", "--out", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    grounded = [r["ground"] for r in read_metrics(tmp_path / "pipe" / "decoder")[0] if "ground" in r]
    assert len(grounded) == 8 and all(0 < g < 1 for g in grounded)  # TokenCompose's loss, every step
    samples = tmp_path / "pipe" / "decoder" / "samples"
    assert sorted(p.name for p in samples.glob("sheet_*.png")) == ["sheet_0000004.png", "sheet_0000008.png"]
    assert Image.open(samples / "progress.gif").n_frames >= 2
    r = run("layout-train", "--pipeline", tmp_path / "pipe", "--config", tmp_path / "scenes.yaml")
    assert r.exit_code == 0, r.output  # the decoder reads layouts: generate now draws one first
    assert Pipeline.load(tmp_path / "pipe", "cpu").layout is not None
    r = run("generate", "--checkpoints", tmp_path / "pipe", "--prompt", "a red blue seven left of a 3", "-n", 2,
            "--steps", 2, "--out", tmp_path / "g", "--layout-temperature", 0.5, "--box-temperature", 0)
    assert r.exit_code == 0, r.output  # a contradictory prompt still draws
    assert Image.open(tmp_path / "g" / "0000.png").size == (32, 32) and Image.open(tmp_path / "g" / "0000.png").mode == "RGB"
    shares = attention_grounding(Pipeline.load(tmp_path / "pipe", "cpu"), prompt_sets(mnist_test_glyphs(mnist_dir), 3, 1))
    assert list(shares) == ["two", "position", "attribution"] and all(list(v) == [0.7, 0.5, 0.3] for v in shares.values())
    assert [list(kinds) for kinds in shares["attribution"].values()] == [["digit", "colour"]] * 3
    assert all(list(kinds) == ["digit"] for kinds in shares["two"].values())  # "a 3 and a 7" names no colour
    for v in (v for by_strength in shares.values() for kinds in by_strength.values() for v in kinds.values()):
        assert 0 < v["own"] < 1 and 0 <= v["other"] < 1 and 0.05 < v["even"] < 0.5  # a digit's box: 18-32 px of 64


def test_stray_words_are_words_no_caption_uses_and_leave_what_a_caption_names_alone():
    from t2i.stages.layout import stray_vocabulary, with_stray_words

    used = set()
    for i in range(300):  # training captions and held-out phrasings: every word is a caption word
        rng, r = np.random.default_rng(i), random.Random(i)
        task = TASKS[i % len(TASKS)]
        held_out = task_prompt(task, sample_scene(rng, False, **task_scene_args(task, r)), r, held_out=True)[0]
        used |= {w.strip(",") for w in f"{caption(sample_scene(rng, True), r)} {held_out}".split()}
    from unclip.data.scene_captions import typos

    misspelt = set().union(*(typos(w) for w in CAPTION_WORDS))  # a caption may misspell a word ("numbeer")
    used = {w for w in used if w.isalpha()} - misspelt  # numerals and their plurals ("7s") are no vocabulary word
    assert used <= CAPTION_WORDS and {"painted", "exactly", "higher"} <= used
    stray = stray_vocabulary(SceneCaptions([]))
    assert len(stray) > 30_000 and not CAPTION_WORDS & set(stray)
    scene = sample_scene(np.random.default_rng(3), False, n=2, layout="row")
    text, r = caption(scene, random.Random(3)), random.Random(0)
    drawn = [with_stray_words(text, r, 0.5, stray) for _ in range(400)]
    added = [len(d.split()) - len(text.split()) for d in drawn]
    assert set(added) == {0, 1, 2} and 0.4 < np.mean([a > 0 for a in added]) < 0.6
    assert all([w for w in d.split() if w not in set(stray)] == text.split() for d in drawn)  # only put in
    captions = SceneCaptions([scene] * 8)
    assert torch.equal(captions.layouts(torch.zeros(8, dtype=torch.long), drawn[:8]),
                       captions.layouts(torch.zeros(8, dtype=torch.long), [text] * 8))
    assert with_stray_words(text, r, 0.0, stray) == text


def test_noised_digits_benchmark_cuts_each_box_and_reports_every_strength(mnist_dir, tmp_path, monkeypatch):
    """benchmarks/noised_digits.py: a crop is the box it names, resized (a box filled with one value reads back as that
    value but for the edge's bilinear blend, and the same box of another scene reads that scene), and the script
    reports an accuracy for each noise level asked."""
    import json
    import sys

    from benchmarks import noised_digits

    images = -torch.ones(2, 3, 32, 32)
    images[1, :, 8:16, 4:12] = 0.5  # scene 1: an 8 px box at x 4, y 8
    cut = noised_digits.crops(images, torch.tensor([[1, 4, 8, 8], [0, 4, 8, 8], [1, 20, 20, 8]]))
    assert cut.shape == (3, 3, noised_digits.CROP, noised_digits.CROP)
    inner = cut[0][:, 1:-1, 1:-1]  # bilinear: the outer ring of samples sits a quarter pixel from the box's edge
    assert torch.equal(inner, torch.full_like(inner, 0.5)) and ((cut[0] > -1) & (cut[0] <= 0.5)).all()
    assert torch.equal(cut[1], -torch.ones_like(cut[1]))
    assert torch.equal(cut[2], -torch.ones_like(cut[2]))
    monkeypatch.setattr(sys, "argv", ["noised_digits.py", "--data-dir", str(mnist_dir), "--strengths", "0,0.9",
                                      "--train-scenes", "64", "--test-scenes", "16", "--epochs", "1", "--out",
                                      str(tmp_path / "out")])
    noised_digits.main()
    report = json.loads((tmp_path / "out" / "noised_digits.json").read_text())
    assert (report["train_objects"], report["test_objects"]) == (128, 32)
    assert list(report["accuracy"]) == ["0.0", "0.9"] and all(0 <= a <= 1 for a in report["accuracy"].values())


def test_no_training_code_reads_the_held_out_phrasings():
    """benchmarks/phrasings/scenes.yaml is text written apart from the caption generator: nothing that trains sees it."""
    root = Path(__file__).resolve().parents[2]
    for path in [*root.glob("unclip/**/*.py"), *root.glob("stages/**/*.py"), root / "cli.py"]:
        assert "phrasings/" not in path.read_text(), path


def test_speech_says_what_each_word_names_counts_typos_and_unnamed_digits_included():
    from unclip.data.scene_captions import misspelt, mention_order, word_objects
    from unclip.data.scenes import Obj, Scene

    six, zero = Obj(6, "magenta", 20, 0, 0), Obj(0, "yellow", 20, 40, 0)
    scene = Scene((six, zero), "row")
    # "one" counts here, as "two" in "two 7s": it names nothing; "six" and "zero" name their objects
    assert word_objects(scene, "one magenta six and one yellow zero") == [0, 0b01, 0b01, 0, 0, 0b10, 0b10]
    assert word_objects(scene, "a one") == [0, 0]  # the digit one: no object of it here
    assert word_objects(scene, "a yelow zero") == [0, 0b10, 0b10] and misspelt()["yelow"] == "yellow"
    assert word_objects(Scene((Obj(6, "cyan", 20, 0, 0),), "single"), "can you draw a six") == [0, 0, 0, 0, 1]
    assert word_objects(scene, "a magenta-coloured 6!") == [0, 0b01, 0b01]
    assert mention_order(scene, "a 0 with a 6 to its left") == [1, 0]
    fives = Scene((Obj(5, "green", 20, 0, 0), Obj(5, "green", 20, 40, 0), Obj(1, "yellow", 20, 20, 40)), "grid")
    assert word_objects(fives, "two green 5s above a yellow 1") == [0, 0b011, 0b011, 0, 0, 0b100, 0b100]
    assert word_objects(fives, "three digits") == [0, 0]


def test_articles_are_left_out_only_where_every_word_still_names_what_it_did():
    from unclip.data.scene_captions import caption, without_articles
    from unclip.data.scenes import Obj, Scene

    assert without_articles("a red 4 and a blue 3", random.Random(0), p=1.0) == "red 4 and blue 3"
    assert without_articles("a 2 above the 3", random.Random(0), p=1.0) == "2 above 3"
    # "one" after "a" is the digit; bare before "left" it would stand for an object: the article stays
    assert without_articles("a 5 with a one left of it", random.Random(0), p=1.0) == "a 5 with a one left of it"
    scene = Scene((Obj(4, "red", 20, 0, 0), Obj(3, "blue", 20, 40, 0)), "row")
    texts = [caption(scene, random.Random(i)) for i in range(400)]
    bare = [t for t in texts if not {"a", "an", "the"} & set(t.split())]
    assert 0.03 < len(bare) / len(texts) < 0.3, len(bare)


def test_a_relation_between_two_alike_objects_is_taught_the_right_way_round():
    """Two objects no word tells apart (two yellow 0s) are written in the scene's order (`mention_order`): captions of
    them name them in that order, so the second written object lies where the relation puts it ('a 0 with a 0 left of
    it': the second left of the first), never backwards."""
    from unclip.data.scene_captions import IT_REL, SceneCaptions, caption
    from unclip.data.scenes import Obj, Scene
    from unclip.layouts import GRID

    for scene in [Scene((Obj(0, "yellow", 20, 0, 20), Obj(0, "yellow", 20, 40, 20)), "row"),
                  Scene((Obj(0, "yellow", 20, 20, 0), Obj(0, "yellow", 20, 20, 40)), "column")]:
        seen = set()
        for key in range(400):
            text = caption(scene, random.Random(key))
            rel = next((rel for rel, ends in IT_REL.items() for end in ends if end in text and " with " in text), None)
            if rel is None:
                continue
            first, second = (((x0 + x1) / 2, (y0 + y1) / 2) for *_, x0, y0, x1, y1 in SceneCaptions.scene_layout(scene, text)[:2].tolist())
            assert relation_holds(second, first, rel, GRID), text
            seen.add(rel)
        assert seen  # one way: 'with' names the scene's first object first, as the other forms' may


def test_training_captions_stay_true_and_within_the_context():
    """Many random training captions of random training scenes: every digit or colour word names an object of the
    scene, every digit of a scene whose caption names digits is named, and (with the layout stage's stray words) the
    captions fit scenes' 48-token context but for a rare few."""
    from t2i.stages.layout import stray_vocabulary, with_stray_words
    from unclip.data.scene_captions import is_count, misspelt, object_word, pronoun, word_objects
    from unclip.data.scenes import TRAIN_SHARES
    from unclip.tokenizer import Tokenizer

    pool = GlyphPool(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10))
    scenes = make_scenes(pool, 3000, 5, False, render=False, shares=TRAIN_SHARES)[0]
    stray, r = stray_vocabulary(SceneCaptions([])), random.Random(0)
    texts = [caption(s, random.Random(i)) for i, s in enumerate(scenes)]
    for scene, text in zip(scenes, texts):
        words = [misspelt().get(w, w) for w in (w.strip(",.!").lower() for w in text.split())]
        for i, bits in enumerate(word_objects(scene, text)):  # a word naming a digit or a colour names an object of it
            digit, colour = object_word(words[i])
            if colour is not None or (digit is not None and not is_count(words, i) and not pronoun(words, i)):
                assert bits, (text, words[i], scene)
    lengths = (Tokenizer(100)([with_stray_words(t, r, 0.5, stray) for t in texts]) > 0).sum(1)
    assert (lengths > 48).sum() == 0 and (lengths > 46).float().mean() < 0.002


def test_training_scenes_share_colours_where_asked_and_never_show_a_held_out_pair():
    from unclip.data.scenes import HELD_OUT, TRAIN_SHARES

    pool = GlyphPool(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10))
    plain = make_scenes(pool, 2000, 3, False, render=False)[0]
    shared = make_scenes(pool, 2000, 3, False, render=False, shares=(1.0, 0.0))[0]
    every = make_scenes(pool, 2000, 3, False, render=False, shares=(0.0, 1.0))[0]
    for a, b, c in zip(plain, shared, every):  # the same scenes, only their colours made to agree
        assert [(o.digit, o.x, o.y) for o in a.objects] == [(o.digit, o.x, o.y) for o in b.objects]
        assert all(len({o.colour for o in b.objects if o.digit == d}) == 1 for d in {o.digit for o in b.objects})
        assert len({o.colour for o in c.objects}) == 1
        assert not any((o.colour, o.digit) in HELD_OUT for s in (b, c) for o in s.objects)
    mixed = make_scenes(pool, 4000, 4, False, render=False, shares=TRAIN_SHARES)[0]
    same = [len({o.colour for o in s.objects}) == 1 for s in mixed if len(s.objects) > 2]
    assert 0.1 < sum(same) / len(same) < 0.3  # about TRAIN_SHARES[1], and a few by chance


def test_a_spec_may_leave_digits_open_and_ask_several_relations():
    spec = Spec([(5, "green"), (5, "green"), (None, "yellow")], relations=[(0, "above", 2), (1, "above", 2)])
    top, bottom = (16, 16), (48, 48)
    assert spec.met_by([(5, "green", top), (5, "green", (48, 16)), (1, "yellow", bottom)])
    assert not spec.met_by([(5, "green", top), (5, "green", (48, 48)), (1, "yellow", (16, 48))])  # one 5 not above
    assert not spec.met_by([(5, "green", top), (5, "red", (48, 16)), (1, "yellow", bottom)])


def test_a_later_stage_adds_its_captions_words_to_the_pipelines_vocabulary(tmp_path):
    from unclip.vocabulary import extend_vocabulary, load_vocabulary, save_vocabulary

    save_vocabulary(tmp_path, ["a", "seven"])
    extend_vocabulary(tmp_path, SceneCaptions([]))
    known = load_vocabulary(tmp_path)
    assert {"a", "seven", "beside", "couple", "digits"} <= known and known == {"a", "seven"} | SceneCaptions.vocabulary()
    extend_vocabulary(tmp_path / "none", SceneCaptions([]))  # a CLIP that saved none: none is started
    assert load_vocabulary(tmp_path / "none") is None
