"""The data layer: IDX files, MNIST splits and captions, caption folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.data import load_dataset
from unclip.data.idx import read_idx, write_idx
from unclip.errors import UserError


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(array))


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "a.idx", np.zeros((4, 4), np.uint8))
    (tmp_path / "a.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "a.idx")
    (tmp_path / "b.idx").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(UserError, match="not an IDX"):
        read_idx(tmp_path / "b.idx")


def test_mnist_splits_and_random_captions(mnist_dir):
    train = load_dataset("mnist", "train", mnist_dir, val_size=100)
    val = load_dataset("mnist", "val", mnist_dir, val_size=100)
    test = load_dataset("mnist", "test", mnist_dir)
    assert (len(train), len(val), len(test)) == (900, 100, 200)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    idx = torch.arange(50)
    a = train.captions(idx, seed=0)
    b = train.captions(idx, seed=1)
    assert a != b and len(set(a)) > 20  # fresh templates and names per draw
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for caption, label in zip(a, train.labels[idx].tolist()):
        assert names[label] in caption or str(label) in caption
    pixels = train.pixels(idx)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_mnist_resized_to_the_configured_shape(mnist_dir):
    data = load_dataset("mnist", "test", mnist_dir, channels=3, size=16)
    assert data.images.shape == (200, 3, 16, 16)


def test_missing_mnist_files_name_what_is_expected(tmp_path, monkeypatch):
    monkeypatch.setattr("unclip.data.mnist._download", lambda name, folder: None)  # offline
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*data_dir"):
        load_dataset("mnist", "train", tmp_path)


def test_caption_folder_skips_a_corrupt_image(caption_folder, tmp_path, caplog):
    for p in caption_folder.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "000.png").write_bytes(b"not a png")
    Image.new("RGBA", (50, 20), (255, 0, 0, 128)).save(tmp_path / "odd.png")
    with (tmp_path / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "odd.png", "text": "a red bar"}) + "\n")
    data = load_dataset(f"folder:{tmp_path}", "train", channels=1, size=28, val_size=5)
    assert "skipped 1 unreadable" in caplog.text
    test = load_dataset(f"folder:{tmp_path}", "test", channels=1, size=28, val_size=5)
    assert len(data) + len(test) == 60  # 59 glyphs + the odd one; the test split is the validation slice
    assert data.images.shape[1:] == (1, 28, 28)
    same = data.groups(data.texts)
    for i in range(len(data)):
        for j in range(len(data)):
            assert (same[i] == same[j]) == (data.texts[i] == data.texts[j])


def test_caption_csv_and_bad_folders(tmp_path):
    Image.new("L", (10, 10), 255).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("file_name,text\na.png,a white square\n")
    data = load_dataset(f"folder:{tmp_path}", "train", val_size=1)
    assert data.texts == ["a white square"]  # too small to hold out a validation slice: all of it trains
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(UserError, match="no usable image"):
        load_dataset(f"folder:{tmp_path}", "train")
    with pytest.raises(UserError, match="neither metadata.jsonl nor captions.csv"):
        load_dataset(f"folder:{tmp_path.parent}", "train")
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("cifar", "train")


def test_fashion_mnist_is_found_where_debian_installs_it(mnist_dir, tmp_path, monkeypatch):
    """Without --data-dir: $T2I_DATA_DIR, then the per-user cache, then /usr/share/datasets/fashion-mnist."""
    import shutil

    import unclip.data as data

    system, env = tmp_path / "usr-share", tmp_path / "env"
    shutil.copytree(mnist_dir, system)  # the glyph files stand in for Fashion-MNIST's
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", system)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("T2I_DATA_DIR", str(env))
    assert data.default_data_dir("fashion-mnist") == system
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 200 and test.class_names[0] == "t-shirt"
    shutil.copytree(mnist_dir, env / "fashion-mnist")  # a copy of one's own comes first
    assert data.default_data_dir("fashion-mnist") == env / "fashion-mnist"
    assert data.default_data_dir("mnist") == env / "mnist"  # held nowhere: where a download would go
