"""`--data emoji:DIR` (issue 43's data contract), on a tiny emoji folder the test writes in the packages' layout."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from unclip.data import load_dataset
from unclip.data.emoji import HELD_OUT_TEMPLATES, TEMPLATES, digest, parse, records
from unclip.errors import UserError
from tests.emoji_folder import SVG


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
