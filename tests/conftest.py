"""Tiny data the tests draw themselves (digit glyphs rendered with PIL) and tiny stage configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from unclip.data.idx import write_idx



def draw_glyphs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28x28 white-on-black digits in a few sizes and positions: (images (n, 28, 28) uint8, labels (n,))."""
    rng = np.random.default_rng(seed)
    fonts = {s: ImageFont.load_default(size=s) for s in (18, 20, 22)}
    images, labels = np.zeros((n, 28, 28), np.uint8), rng.integers(0, 10, n)
    for i, label in enumerate(labels):
        im = Image.new("L", (28, 28))
        ImageDraw.Draw(im).text((6 + rng.integers(-2, 3), 1 + rng.integers(-2, 3)), str(label),
                                fill=int(rng.integers(180, 256)), font=fonts[int(rng.choice(list(fonts)))])
        images[i] = np.asarray(im)
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The four MNIST IDX files (gzipped), filled with glyphs: 1000 train, 200 test."""
    folder = tmp_path_factory.mktemp("mnist")
    for stem, n, seed in (("train", 1000, 0), ("t10k", 200, 1)):
        images, labels = draw_glyphs(n, seed)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory) -> Path:
    """A caption folder of 60 RGB glyph images of mixed sizes with `metadata.jsonl`."""
    folder = tmp_path_factory.mktemp("captions")
    images, labels = draw_glyphs(60, 2)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).convert("RGB").resize((40 + i % 3 * 10,) * 2).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {words[label]}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


TINY = {
    "clip": {
        "model": {"image_widths": [16, 32], "text_context": 12, "text_width": 32, "text_layers": 1, "text_heads": 2,
                  "embed_dim": 32},
        "train": {"epochs": 12, "batch_size": 100, "lr": 3e-3, "warmup_steps": 5, "val_size": 100, "ckpt_every": 20},
    },
    "prior": {
        "model": {"width": 32, "layers": 1, "heads": 2, "timesteps": 50},
        "train": {"max_steps": 8, "batch_size": 50, "val_size": 100, "warmup_steps": 2, "ckpt_every": 4},
    },
    "decoder": {
        "model": {"widths": [8, 16], "heads": 2, "context_tokens": 2, "timesteps": 50},
        "train": {"max_steps": 8, "batch_size": 20, "val_size": 100, "warmup_steps": 2, "ckpt_every": 4},
    },
}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, mnist_dir, tiny_config) -> Path:
    """CLIP, prior and decoder trained for a few steps through the CLI: a complete pipeline folder."""
    from typer.testing import CliRunner

    from t2i.cli import app

    root = tmp_path_factory.mktemp("pipeline")
    runner = CliRunner()
    r = runner.invoke(app, ["clip-train", "--config", str(tiny_config), "--data-dir", str(mnist_dir),
                            "--out", str(root / "clip")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["decoder-train", "--clip", str(root / "clip"), "--config", str(tiny_config),
                            "--out", str(root / "pipe")])
    assert r.exit_code == 0, r.output
    return root / "pipe"


@pytest.fixture(scope="module")  # each module its own: the loader renders a folder once per process
def emoji_dir(tmp_path_factory) -> Path:
    from tests.emoji_folder import write_emoji_folder
    return write_emoji_folder(tmp_path_factory.mktemp("emoji"))
