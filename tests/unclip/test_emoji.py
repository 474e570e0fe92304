"""`--data emoji:DIR` (issue 43's data contract), on a tiny emoji folder the test writes in the packages' layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from unclip.data import load_dataset
from unclip.data.emoji import HELD_OUT_TEMPLATES, TEMPLATES, digest, parse, records
from unclip.errors import UserError

try:
    import cairosvg  # noqa: F401
    SVG = None
except (ImportError, OSError) as e:  # the emoji extra, or the cairo library under it, is missing
    SVG = f"OpenMoji's SVGs need the emoji extra: {e}"

LANGS = ("en", "de", "fr", "es", "ja", "zh")
THINGS = [  # (code points, English name, German name, keywords, skin tones)
    ("1F34E", "red apple", "roter Apfel", ["apple", "fruit", "red"], False),
    ("2764-FE0F", "red heart", "rotes Herz", ["heart", "love"], False),
    ("1F44B", "waving hand", "winkende Hand", ["hand", "wave"], True),
    ("1F468-200D-1F692", "man firefighter", "Feuerwehrmann", ["firefighter", "man"], True),
]
TONE_NAMES = {1: "light skin tone", 2: "medium-light skin tone", 3: "medium skin tone", 4: "medium-dark skin tone",
              5: "dark skin tone"}
SVG_TEXT = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="20" fill="#{c}"/></svg>'


def chars(points: str) -> str:
    return "".join(chr(int(p, 16)) for p in points.split("-"))


def toned(points: str, tone: int) -> str:
    first, *rest = points.split("-")
    return "-".join([first, f"1F3F{'BCDEF'[tone - 1]}", *rest])


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji")
    for d in ("noto", "twemoji", "openmoji", "cldr/annotations", "cldr/derived"):
        (root / d).mkdir(parents=True)
    listed, openmoji = [], []
    annotations = {lang: {} for lang in LANGS}
    derived = {lang: {} for lang in LANGS}
    for n, (points, name, german, keywords, tones) in enumerate(THINGS):
        variants = [(points, 0)] + ([(toned(points, t), t) for t in range(1, 6)] if tones else [])
        entry = {"unified": points, "name": name.upper(), "image": f"{points.lower()}.png", "has_img_google": True,
                 "has_img_twitter": True, "skin_variations": {}}
        for p, t in variants:
            for style in ("noto", "twemoji"):
                im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
                im.paste((40 * n, 30 * t, 200 if style == "noto" else 50, 255), (16, 16, 48, 48))
                im.save(root / style / f"{p.lower()}.png")
            svg_name = p.replace("-FE0F", "") if p.endswith("-FE0F") else p
            (root / "openmoji" / f"{svg_name}.svg").write_text(SVG_TEXT.format(c=f"{40 * n:02x}{30 * t:02x}80"))
            openmoji.append({"hexcode": svg_name, "annotation": name, "tags": ", ".join(keywords), "group": "x"})
            if t:
                entry["skin_variations"][f"1F3F{'BCDEF'[t - 1]}"] = {"unified": p, "image": f"{p.lower()}.png"}
            key = chars(p).replace("\ufe0f", "")
            for lang in LANGS:
                base = german if lang == "de" else f"{name} [{lang}]" if lang != "en" else name
                table = derived if t else annotations
                table[lang][key] = {"tts": [f"{base}: {TONE_NAMES[t]}" if t else base], "default": keywords}
        listed.append(entry)
    (root / "openmoji" / "E000.svg").write_text(SVG_TEXT.format(c="00aa00"))  # an OpenMoji extra
    openmoji.append({"hexcode": "E000", "annotation": "goldfish", "tags": "fish", "group": "extras-openmoji"})
    (root / "openmoji" / "1F4A9.svg").write_text("<svg><not closed")  # one that does not render
    openmoji.append({"hexcode": "1F4A9", "annotation": "pile of poo", "tags": "", "group": "smileys-emotion"})
    (root / "emoji.json").write_text(json.dumps(listed))
    (root / "openmoji.json").write_text(json.dumps(openmoji))
    for kind, tables, key in (("annotations", annotations, "annotations"), ("derived", derived, "annotationsDerived")):
        for lang in LANGS:
            (root / "cldr" / kind / f"{lang}.json").write_text(json.dumps({key: {"annotations": tables[lang]}}))
    return root


def test_identity_drops_variation_selectors_and_skin_tones():
    assert parse("1F468-1F3FF-200D-1F692") == ("1f468-200d-1f692", 5)
    assert parse("2764-FE0F") == ("2764", 0) and parse("1f44b-1f3fb") == ("1f44b", 1)


@pytest.mark.skipif(SVG is not None, reason=SVG or "")
def test_records_follow_the_contract(emoji_dir, caplog):
    every = records(emoji_dir)
    assert {e.style for e in every} == {"noto", "twemoji", "openmoji"}
    firefighter = [e for e in every if e.identity == "1f468-200d-1f692" and e.tone == 5 and e.style == "twemoji"]
    assert firefighter and firefighter[0].names["en"] == "man firefighter: dark skin tone"
    assert firefighter[0].names["de"] == "Feuerwehrmann: dark skin tone"  # the derived name of the whole sequence
    train, val, test = (load_dataset(f"emoji:{emoji_dir}", s, channels=3, size=32, val_size=4) for s in ("train", "val", "test"))
    assert "1 SVG does not render" in caplog.text  # skipped and counted, no traceback
    usable = len(every) - 1
    assert len(train) + len(val) + len(test) == usable
    toned = {e.identity for e in every if e.tone}
    for e in test.captioner.emoji:  # exactly the held-out images, and no extra
        h = digest(e.identity)
        assert not e.extra and (h % 20 == ("noto", "twemoji", "openmoji").index(e.style)
                                or (e.identity in toned and e.tone == h % 5 + 1))
    for e in train.captioner.emoji + val.captioner.emoji:
        h = digest(e.identity)
        assert e.extra or not (h % 20 == ("noto", "twemoji", "openmoji").index(e.style)
                               or (e.identity in toned and e.tone == h % 5 + 1))
    assert any(e.extra for e in train.captioner.emoji + val.captioner.emoji)  # the extras train
    apple = next(i for i, e in enumerate(train.captioner.emoji) if e.identity == "1f34e" and e.style == "twemoji")
    options = train.captioner.options[apple]
    assert "red apple, twemoji style" in options and "roter Apfel" in options and "an emoji of apple, fruit, red" in options
    assert not any(t.split("{")[0] and t.format(name="red apple", style="twemoji", keywords="") in options
                   for t in HELD_OUT_TEMPLATES)  # held-out phrasings never train
    assert len(TEMPLATES) + 5 == len(options)
    image = train.images[(train.labels == apple).nonzero()[0, 0]] if (train.labels == apple).any() else \
        val.images[(val.labels == apple).nonzero()[0, 0]]  # labels index the captioner's records
    assert image.shape == (3, 32, 32) and int(image[:, 0, 0].min()) == 255  # transparent corners on white
    assert image[:, 16, 16].tolist() == [0, 0, 50]  # and the drawing itself, twemoji's apple, as drawn


def test_a_missing_or_half_copied_folder_says_what_it_expected(emoji_dir, tmp_path):
    with pytest.raises(UserError, match="missing emoji.json, openmoji.json, noto, twemoji, openmoji") as e:
        load_dataset(f"emoji:{tmp_path}", "train", channels=3, size=32)
    assert "\n" not in str(e.value)
    half = tmp_path / "half"
    half.mkdir()
    for item in emoji_dir.iterdir():
        if item.name != "twemoji":
            (half / item.name).symlink_to(item)
    with pytest.raises(UserError, match=r"missing twemoji;"):
        load_dataset(f"emoji:{half}", "train", channels=3, size=32)


@pytest.mark.slow
@pytest.mark.skipif(SVG is not None, reason=SVG or "")
def test_clip_trains_on_emoji_from_the_cli(emoji_dir, tmp_path):
    from t2i.cli import app

    config = tmp_path / "c.yaml"
    config.write_text("clip:\n  model: {image_channels: 3, image_size: 32, image_widths: [8, 16], text_context: 24,\n"
                      "          text_width: 32, text_layers: 1, text_heads: 2, embed_dim: 16}\n"
                      "  train: {max_steps: 2, batch_size: 8, val_size: 4, warmup_steps: 1}\n")
    r = CliRunner().invoke(app, ["clip-train", "--config", str(config), "--data", f"emoji:{emoji_dir}",
                                 "--out", str(tmp_path / "clip")])
    assert r.exit_code == 0, r.output
    vocabulary = (tmp_path / "clip" / "vocabulary.txt").read_text().split()
    assert {"apple", "twemoji", "style", "feuerwehrmann"} <= set(vocabulary)
