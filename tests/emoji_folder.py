"""A tiny emoji folder the tests write in the npm packages' layout (`--data emoji:DIR`, issue 43)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

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


def write_emoji_folder(root: Path) -> Path:
    """A tiny emoji folder in the npm packages' layout: four things (two in skin tones), three styles, one OpenMoji
    extra and one SVG that does not render."""
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
