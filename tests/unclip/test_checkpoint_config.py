"""Configs load strictly; checkpoints round-trip exactly; fingerprints ignore storage precision."""
from __future__ import annotations

import pytest
import torch

from unclip.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from unclip.config import ClipConfig, DecoderConfig, PriorConfig, load_config, merge, to_yaml
from unclip.errors import CheckpointError, ConfigError
from unclip.models.clip import CLIP
from tests.conftest import TINY


def test_config_yaml_round_trip(tmp_path):
    for cls in (ClipConfig, PriorConfig, DecoderConfig):
        cfg = merge(cls(), {"train": {"lr": 0.123, "max_steps": 7}})
        (tmp_path / "c.yaml").write_text(to_yaml(cfg))
        assert load_config(cls, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("text,message", [
    ("model: {widthz: 3}", "unknown config key model.widthz"),
    ("bogus: 1", "unknown config key bogus"),
    ("model: {width: three}", "model.width: expected an integer"),
    ("train: {lr: [1]}", "train.lr: expected a number"),
    ("model: [1, 2]", "model: expected a mapping"),
    ("model: {width: 3", "not valid YAML"),
    ("model: {prediction: V}", "model.prediction: 'V' is not one of v, x0, eps"),
    ("model: {schedule: cosin}", "model.schedule: 'cosin' is not one of cosine, linear"),
    ("train: {device: gpu}", "train.device: 'gpu' is not one of auto, cpu, cuda"),
])
def test_bad_config_is_rejected_with_the_key_named(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(PriorConfig, tmp_path / "c.yaml")


def test_pipeline_file_sections_are_picked_per_stage(tmp_path):
    (tmp_path / "p.yaml").write_text("prior: {model: {width: 64}}\ndecoder: {model: {widths: [8, 16]}}\n")
    assert load_config(PriorConfig, tmp_path / "p.yaml").model.width == 64
    assert load_config(DecoderConfig, tmp_path / "p.yaml").model.widths == [8, 16]
    assert load_config(ClipConfig, tmp_path / "p.yaml") == ClipConfig()


def tiny_clip() -> tuple[CLIP, ClipConfig]:
    cfg = merge(ClipConfig(), TINY["clip"])
    return CLIP(cfg.model), cfg


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, cfg = tiny_clip()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
    save_checkpoint(tmp_path, model, cfg)
    loaded, loaded_cfg = load_checkpoint(tmp_path, ClipConfig, lambda c: CLIP(c.model))
    assert loaded_cfg == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "model.safetensors"]  # no temp files left


def test_half_precision_storage_keeps_the_fingerprint(tmp_path):
    model, cfg = tiny_clip()
    save_checkpoint(tmp_path, model, cfg, dtype=torch.float16)
    loaded, _ = load_checkpoint(tmp_path, ClipConfig, lambda c: CLIP(c.model))
    assert next(loaded.parameters()).dtype == torch.float32
    assert fingerprint(loaded.state_dict()) == fingerprint(model.state_dict())
    with torch.no_grad():
        next(loaded.parameters()).add_(0.1)
    assert fingerprint(loaded.state_dict()) != fingerprint(model.state_dict())


def test_truncated_or_mismatched_weights_are_clear_errors(tmp_path):
    model, cfg = tiny_clip()
    save_checkpoint(tmp_path, model, cfg)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path, ClipConfig, lambda c: CLIP(c.model))
    save_checkpoint(tmp_path, model, cfg)
    (tmp_path / "config.yaml").write_text(to_yaml(merge(cfg, {"model": {"embed_dim": 48}})))
    with pytest.raises(CheckpointError, match="do not match config.yaml: .*of another shape"):
        load_checkpoint(tmp_path, ClipConfig, lambda c: CLIP(c.model))


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    from unclip.checkpoint import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1); a float field takes it as the number it means."""
    from unclip.config import ClipConfig, load_config

    (tmp_path / "c.yaml").write_text("clip: {train: {lr: 1e-4}}\n")
    assert load_config(ClipConfig, tmp_path / "c.yaml").train.lr == 1e-4
    (tmp_path / "c.yaml").write_text("clip: {train: {lr: fast}}\n")
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(ClipConfig, tmp_path / "c.yaml")


def test_a_shipped_pipelines_stage_resolves_by_name(tmp_path, monkeypatch, tiny_pipeline, tiny_config, mnist_dir):
    """`--clip NAME` is the CLIP of the shipped pipeline NAME (stage two trains against it), while a folder of
    shipped weights that is no pipeline is not offered by name."""
    from typer.testing import CliRunner

    import unclip.checkpoint as checkpoint
    from t2i.cli import app
    from unclip.checkpoint import copy_stage, resolve_folder, shipped_pipelines

    monkeypatch.setattr(checkpoint, "shipped_root", lambda: tmp_path / "shipped")
    copy_stage(tiny_pipeline / "clip", tmp_path / "shipped" / "pipe" / "clip")
    copy_stage(tiny_pipeline / "clip", tmp_path / "shipped" / "alone")
    assert resolve_folder("pipe", "clip") == tmp_path / "shipped" / "pipe" / "clip" and shipped_pipelines() == ["pipe"]
    for name in ("nothing", "alone"):
        with pytest.raises(CheckpointError, match=f"checkpoint folder not found: {name}"):
            resolve_folder(name)
    r = CliRunner().invoke(app, ["decoder-train", "--clip", "pipe", "--config", str(tiny_config), "--data-dir",
                                 str(mnist_dir), "--stage", "prior", "--max-steps", "1", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "the pipeline needs its decoder: t2i decoder-train --clip pipe --stage decoder" in " ".join(r.output.split())
    assert (tmp_path / "p" / "clip" / "model.safetensors").read_bytes() == (tiny_pipeline / "clip" / "model.safetensors").read_bytes()
