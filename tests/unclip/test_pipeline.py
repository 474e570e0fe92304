"""unCLIP's own abilities: variations, interpolation (slerp), through the CLI on tiny weights."""
from __future__ import annotations

import math

import torch
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from tests.conftest import draw_glyphs
from unclip.pipeline import slerp

runner = CliRunner()


def test_slerp_endpoints_norm_and_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    path = slerp(a, b, torch.linspace(0, 1, 9))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(9))
    steps = torch.arccos((path[1:] * path[:-1]).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(steps, torch.full((8,), float(torch.arccos(a @ b)) / 8), atol=1e-4, rtol=0)
    same = slerp(a, a, torch.linspace(0, 1, 3))
    torch.testing.assert_close(same, a.expand(3, -1))
    assert math.isfinite(float(slerp(a, -a + 1e-3, torch.tensor([0.5])).sum()))


def test_vary_from_any_image(tiny_pipeline, tmp_path):
    images, _ = draw_glyphs(1, 7)
    src = tmp_path / "big.jpg"
    Image.fromarray(images[0]).resize((90, 70)).convert("RGB").save(src)
    r = runner.invoke(app, ["vary", str(src), "-n", "3", "--steps", "3", "--checkpoints", str(tiny_pipeline),
                            "--out", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png", "source.png"]
    a = runner.invoke(app, ["vary", str(tmp_path / "nothing.png"), "--checkpoints", str(tiny_pipeline)])
    assert a.exit_code == 1 and "image not found" in a.output


def test_interpolate_prompt_to_image_with_shared_noise(tiny_pipeline, tmp_path):
    images, _ = draw_glyphs(1, 8)
    Image.fromarray(images[0]).save(tmp_path / "b.png")
    r = runner.invoke(app, ["interpolate", "--from", "two", "--to", str(tmp_path / "b.png"), "--frames", "4",
                            "--steps", "3", "--checkpoints", str(tiny_pipeline), "--out", str(tmp_path / "i")])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "i").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "interpolation.gif", "strip.png"]
    r2 = runner.invoke(app, ["interpolate", "--from", "two", "--to", str(tmp_path / "b.png"), "--frames", "4",
                             "--steps", "3", "--checkpoints", str(tiny_pipeline), "--out", str(tmp_path / "j")])
    assert r2.exit_code == 0
    assert (tmp_path / "i" / "0002.png").read_bytes() == (tmp_path / "j" / "0002.png").read_bytes()
