"""`t2i clip-import`: a tiny open_clip model made here with random weights, imported as stage one and used by
every command that reads a CLIP; and every bad input refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from unclip.components.clip import load_clip
from unclip.tokenizer import Tokenizer

open_clip = pytest.importorskip("open_clip")
runner = CliRunner()
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_OPEN_CLIP).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "tiny.pt")
    return folder / "tiny.json", folder / "tiny.pt", model


@pytest.fixture(scope="module")
def imported(open_clip_files, tmp_path_factory) -> Path:
    config, weights, _ = open_clip_files
    out = tmp_path_factory.mktemp("imported") / "clip"
    r = run("clip-import", "--open-clip", config, "--weights", weights, "--out", out, "--image-size", 28,
            "--image-channels", 1, "--template", "a handwritten {}")
    assert r.exit_code == 0, r.output
    return out


def test_the_imported_model_computes_what_open_clip_computes(imported, open_clip_files):
    _, _, reference = open_clip_files
    model, cfg = load_clip(imported, "cpu")
    saved = yaml.safe_load((imported / "config.yaml").read_text())
    assert saved["open_clip"]["model"] == TINY_OPEN_CLIP and saved["open_clip"]["name"] == "tiny"
    assert (cfg.model.text_context, cfg.model.text_width, cfg.model.embed_dim) == (16, 32, 32)
    texts = ["a handwritten seven", "an ankle boot!", "3 red 7s to the left of a blue nine"]
    tokens = Tokenizer(cfg.model.text_context)(texts)
    assert torch.equal(tokens, open_clip.tokenize(texts, context_length=16))  # the same BPE ids
    with torch.no_grad():
        emb, features = model.encode_text(tokens)
        torch.testing.assert_close(emb, reference.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)
        assert features.shape == (3, 16, 32)
        rgb = torch.rand(2, 3, 32, 32) * 2 - 1  # at the tower's own size: only the scale and normalisation differ
        mean, std = torch.tensor(cfg.open_clip.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.open_clip.image_std).view(1, 3, 1, 1)
        torch.testing.assert_close(model.encode_image(rgb), reference.encode_image(((rgb + 1) / 2 - mean) / std, normalize=True),
                                   atol=1e-5, rtol=0)
        gray = model.encode_image(torch.rand(2, 1, 28, 28) * 2 - 1)  # the pipeline's images: grey, 28 px
        assert gray.shape == (2, 32) and torch.allclose(gray.norm(dim=-1), torch.ones(2))


def test_stage_two_trains_against_it_and_every_command_reads_it(imported, mnist_dir, tiny_config, tmp_path):
    r = run("decoder-train", "--clip", imported, "--config", tiny_config, "--data-dir", mnist_dir, "--out", tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    r = run("generate", "--checkpoints", tmp_path / "pipe", "--prompt", "a handwritten six", "-n", 2, "--steps", 2,
            "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    image = Image.open(tmp_path / "g" / "0000.png")
    assert image.size == (28, 28) and image.mode == "L"  # the decoder draws the pipeline's size, not CLIP's 32
    r = run("vary", tmp_path / "g" / "0000.png", "--checkpoints", tmp_path / "pipe", "-n", 1, "--steps", 2,
            "--out", tmp_path / "v")
    assert r.exit_code == 0, r.output
    r = run("clip-eval", "--clip", imported, "--data-dir", mnist_dir)
    assert r.exit_code == 0 and "zero-shot accuracy:" in r.output, r.output
    r = run("classify", tmp_path / "g" / "0000.png", "--clip", imported, "--labels", "six,seven")
    assert r.exit_code == 0 and "six" in r.output, r.output
    r = run("clip-train", "--config", imported / "config.yaml", "--data-dir", mnist_dir, "--out", tmp_path / "c")
    assert r.exit_code == 1 and "stays frozen" in r.output


def test_bad_imports_are_one_line_and_write_nothing(open_clip_files, tmp_path):
    config, weights, _ = open_clip_files
    other = {**TINY_OPEN_CLIP, "embed_dim": 48}
    torch.save(open_clip.model.CLIP(**other).state_dict(), tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8}))
    (tmp_path / "hf.json").write_text(json.dumps({**TINY_OPEN_CLIP, "text_cfg": {"hf_model_name": "roberta-base"}}))
    cases = [
        (("--open-clip", "ViT-Nope-99", "--weights", weights), "open_clip knows no such architecture"),
        (("--open-clip", tmp_path / "bad.json", "--weights", weights), "not a JSON model config"),
        (("--open-clip", tmp_path / "partial.json", "--weights", weights), "no vision_cfg, text_cfg"),
        (("--open-clip", tmp_path / "hf.json", "--weights", weights), "Hugging Face"),
        (("--open-clip", config, "--weights", tmp_path / "missing.pt"), "no such file"),
        (("--open-clip", config, "--weights", tmp_path / "other.pt"), "do not fit tiny"),
        (("--open-clip", config, "--weights", tmp_path / "garbage.pt"), "could not be loaded into tiny"),
    ]
    for args, message in cases:
        r = run("clip-import", *args, "--out", tmp_path / "out")
        assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, (args, r.output)
        assert not (tmp_path / "out").exists()
