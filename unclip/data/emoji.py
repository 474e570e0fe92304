"""Emoji drawn by people, named in their own words: `--data emoji:DIR` (issue 43).

DIR is laid out as the npm packages ship it (`../shared/data/README.md`; `npm pack emoji-datasource-google
emoji-datasource-twitter openmoji cldr-annotations-full cldr-annotations-derived-full`, then `tar xzf`): `noto/` and
`twemoji/` (64x64 RGBA PNGs), `openmoji/` (SVGs, rendered at the training size with cairosvg, the `emoji` extra),
`emoji.json`, `openmoji.json`, `cldr/{annotations,derived}/LANG.json`. Every image is composited on white.

One record per image: its **identity** (code points in lower-case hex joined by `-`, every `fe0f` and skin-tone
modifier `1f3fb`-`1f3ff` removed), its style, its skin tone (0: none; 1-5) and its captions, drawn one per sample:
the English CLDR name ("woman firefighter: dark skin tone" for a variant), the name with its style ("red apple,
twemoji style"), its keywords ("an emoji of apple, fruit, red") and its names in de, fr, es, ja and zh. Phrasings in
`HELD_OUT_TEMPLATES` never appear in training.

Held out of training and validation (the test split), with h = int(sha1(identity).hexdigest(), 16): every image of
an identity in style `noto` where h % 20 == 0, `twemoji` where h % 20 == 1, `openmoji` where h % 20 == 2; and, for an
identity that comes in skin tones, every image carrying tone (h % 5) + 1. OpenMoji's own extras (group
`extras-openmoji`) train but are never in the test split.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from unclip.data.captions import TextCaptions
from unclip.data.files import Skipped, open_image, read_regular
from unclip.errors import UserError

log = logging.getLogger(__name__)
STYLES = ("noto", "twemoji", "openmoji")
TONES = {"1f3fb": 1, "1f3fc": 2, "1f3fd": 3, "1f3fe": 4, "1f3ff": 5}
LANGUAGES = ("de", "fr", "es", "ja", "zh")  # besides English
EXPECTED = ("emoji.json", "openmoji.json", "noto", "twemoji", "openmoji",
            *(f"cldr/{kind}/{lang}.json" for kind in ("annotations", "derived") for lang in ("en", *LANGUAGES)))
# Training phrasings; {name}, {style}, {keywords}. HELD_OUT_TEMPLATES are written apart and never trained on.
TEMPLATES = ("{name}", "{name}, {style} style", "{name} in {style} style", "a {style} emoji of {name}",
             "an emoji of {keywords}")
HELD_OUT_TEMPLATES = ("{name} as drawn by {style}", "the {style} version of {name}", "{name}, {style}-styled")


@dataclass(frozen=True)
class Emoji:
    identity: str  # code points, fe0f and skin tones removed: the thing drawn
    style: str
    tone: int  # 0: none; 1-5: the first skin-tone modifier
    file: Path
    names: dict  # language -> CLDR name of this exact sequence (tone included)
    keywords: tuple[str, ...]  # English CLDR keywords
    extra: bool = False  # OpenMoji's own extras: trained on, never evaluated


def parse(codepoints: str) -> tuple[str, int]:
    """(identity, tone) of a file name's or a hexcode's code points: `1F468-1F3FF-200D-1F692` -> ('1f468-200d-1f692', 5)."""
    points = [p for p in codepoints.lower().split("-") if p and p != "fe0f"]
    tones = [TONES[p] for p in points if p in TONES]
    return "-".join(p for p in points if p not in TONES), tones[0] if tones else 0


def digest(identity: str) -> int:
    return int(hashlib.sha1(identity.encode("utf-8")).hexdigest(), 16)


def held_out(e: Emoji, toned: set[str]) -> Optional[str]:
    """Which of the contract's rules holds `e` out, if any: "style" (a style pair of the identity) or "tone" (a skin
    tone of an identity in `toned`, those that come in tones)."""
    h = digest(e.identity)
    if h % 20 == STYLES.index(e.style):
        return "style"
    return "tone" if e.identity in toned and e.tone == h % 5 + 1 else None


def held_out_rules(emoji: list[Emoji]) -> list[Optional[str]]:
    """`held_out` of each record, against the identities of `emoji` that come in skin tones; None for OpenMoji's
    extras, which train and are never evaluated."""
    toned = {e.identity for e in emoji if e.tone}
    return [None if e.extra else held_out(e, toned) for e in emoji]


def character(codepoints: str) -> str:
    """The emoji itself, without variation selectors (as CLDR's keys are, once their fe0f is dropped)."""
    return "".join(chr(int(p, 16)) for p in codepoints.lower().split("-") if p and p != "fe0f")


def cldr(folder: Path) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """language -> {emoji characters without fe0f: (name, keywords)} from CLDR's annotations and derived ones."""
    out: dict[str, dict] = {}
    for lang in ("en", *LANGUAGES):
        table: dict = {}
        for kind, key in (("annotations", "annotations"), ("derived", "annotationsDerived")):
            path = folder / "cldr" / kind / f"{lang}.json"
            try:
                data = json.loads(read_regular(path).decode("utf-8"))[key]["annotations"]
            except (Skipped, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{path}: not a CLDR annotations file ({type(e).__name__})") from None
            for chars, entry in data.items():
                names = entry.get("tts") or []
                if names:
                    table[chars.replace("\ufe0f", "")] = (names[0], entry.get("default") or [])
        out[lang] = table
    return out


def records(folder: Path) -> list[Emoji]:
    """Every image of the three styles, named; an image whose sequence CLDR does not name keeps the package's name."""
    missing = [name for name in EXPECTED if not (folder / name).exists()]
    if missing:
        raise UserError(f"emoji:{folder}: missing {', '.join(missing)}; expected the layout of the npm packages "
                        "(see unclip/data/emoji.py)", param="data")
    names = cldr(folder)
    try:
        listed = json.loads(read_regular(folder / "emoji.json").decode("utf-8"))
        openmoji = json.loads(read_regular(folder / "openmoji.json").decode("utf-8"))
    except (Skipped, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"emoji:{folder}: emoji.json or openmoji.json does not read ({e})") from None

    def named(points: str, fallback: str) -> tuple[dict, tuple[str, ...]]:
        key = character(points)
        each = {lang: table[key][0] for lang, table in names.items() if key in table}
        each.setdefault("en", fallback.lower())
        return each, tuple(names["en"].get(key, ("", []))[1])

    out = []
    for entry in listed:
        variants = [(entry["unified"], entry["image"])]
        variants += [(v["unified"], v["image"]) for v in (entry.get("skin_variations") or {}).values()]
        for points, image in variants:
            identity, tone = parse(points)
            each, keywords = named(points, entry.get("name") or entry.get("short_name") or identity)
            for style in ("noto", "twemoji"):
                if entry.get(f"has_img_{'google' if style == 'noto' else 'twitter'}", True):
                    out.append(Emoji(identity, style, tone, folder / style / image, each, keywords))
    for entry in openmoji:
        identity, tone = parse(entry["hexcode"])
        each, keywords = named(entry["hexcode"], entry.get("annotation") or identity)
        if not keywords and entry.get("tags"):
            keywords = tuple(t.strip() for t in entry["tags"].split(",") if t.strip())
        out.append(Emoji(identity, "openmoji", tone, folder / "openmoji" / f"{entry['hexcode']}.svg", each, keywords,
                         extra=entry.get("group") == "extras-openmoji"))
    return out


def captions(e: Emoji, templates=TEMPLATES) -> list[str]:
    """A record's captions: its phrasings in English (with its style, and of its keywords), and its other names."""
    name = e.names["en"]
    keywords = ", ".join(e.keywords[:4]) or name
    out = [t.format(name=name, style=e.style, keywords=keywords) for t in templates]
    return out + [e.names[lang] for lang in LANGUAGES if lang in e.names]


def render(e: Emoji, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the image composited on white; Skipped where it cannot be read or rendered."""
    data = read_regular(e.file)
    if e.file.suffix == ".svg":
        try:
            import cairosvg
        except (ImportError, OSError):
            raise UserError("openmoji's SVGs need the emoji extra (cairosvg and the cairo library): "
                            "pip install -e '.[emoji]'") from None
        try:
            data = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size, unsafe=False)
        except Exception:  # cairosvg's errors for a broken SVG are many (XML, CSS, paths)
            raise Skipped("SVG does not render") from None
    try:
        with open_image(data) as im:
            im = im.convert("RGBA")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            rgb = np.asarray(Image.alpha_composite(white, im).convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        raise Skipped("unreadable image") from None
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


class EmojiCaptions(TextCaptions):
    """The captions of emoji records (one drawn per sample), keeping each record's identity, style and tone."""

    def __init__(self, emoji: list[Emoji], held_out_phrasings: bool = False):
        super().__init__([captions(e, HELD_OUT_TEMPLATES if held_out_phrasings else TEMPLATES) for e in emoji])
        self.emoji = emoji


_LOADED: dict[tuple, tuple] = {}  # (folder, size) -> (records, images): rendered once per process


def rendered(folder: Path, size: int) -> tuple[list[Emoji], torch.Tensor]:
    """Every usable record of an emoji folder and its image, uint8 (N, 3, size, size); what does not render is
    skipped and counted in one warning."""
    from unclip.data.sources import count_skip, skip_summary

    key = (str(Path(folder).resolve()), size)
    if key not in _LOADED:
        emoji, images, skips = [], [], {}
        for e in records(Path(folder)):
            try:
                images.append(render(e, size))
                emoji.append(e)
            except Skipped as why:
                count_skip(skips, f"{e.file}: {why}")
        if skips:
            log.warning("emoji:%s: %d images, skipped %s", folder, len(emoji), skip_summary(skips))
        if not emoji:
            raise UserError(f"emoji:{folder}: no usable image (skipped: {skip_summary(skips)})")
        _LOADED[key] = (emoji, torch.stack(images))
    return _LOADED[key]


def load_emoji(folder: Path, split: str, size: int, val_size: int, carve):
    """The `split` of an emoji folder at size x size: test is every held-out image (the contract above, extras
    left out), val and train the rest (`carve`: the fixed held-out slice)."""
    from unclip.data import CaptionedImages

    emoji, images = rendered(folder, size)
    held = torch.tensor([rule is not None for rule in held_out_rules(emoji)])
    idx = (held if split == "test" else ~held).nonzero()[:, 0]
    kept = [emoji[i] for i in idx.tolist()]
    data = CaptionedImages(images=images[idx], labels=torch.arange(len(kept)), captioner=EmojiCaptions(kept))
    return data if split == "test" else carve(data, split, val_size)

