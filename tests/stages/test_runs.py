"""Watching training: denoising sheets and the progress GIF, `t2i runs`, `t2i plot`, TensorBoard logging."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from t2i.stages.runs import read_metrics, smooth
from t2i.stages.samples import PAD, SCALE, first_final

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def cells(sheet: Path, size: int) -> np.ndarray:
    """A sheet cut back into its cells: (rows, columns, H, W[, C]) at native resolution."""
    a = np.asarray(Image.open(sheet))[::SCALE, ::SCALE]
    rows, cols = (a.shape[0] - PAD) // (size + PAD), (a.shape[1] - PAD) // (size + PAD)
    return np.stack([np.stack([a[PAD + r * (size + PAD): PAD + r * (size + PAD) + size,
                                 PAD + c * (size + PAD): PAD + c * (size + PAD) + size] for c in range(cols)])
                     for r in range(rows)])


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_each_diffusion_stage_writes_a_denoising_sheet_and_a_progress_gif(tiny_pipeline, stage):
    samples = tiny_pipeline / stage / "samples"
    sheets = sorted(samples.glob("sheet_*.png"))
    assert [p.name for p in sheets] == ["sheet_0000008.png"]  # the end of the 8-step stage (sample_every: 1000)
    grid = cells(sheets[0], 28)
    # ten prompts (the class names) a row; t2i generate's 10-step chain shows iterations 1 and 5, then the final
    assert grid.shape[:2] == (3, 10)
    assert not np.array_equal(grid[0], grid[-1])  # the chain's first prediction is not its end
    gif = Image.open(samples / "progress.gif")
    assert gif.n_frames >= 1
    final = np.asarray(first_final(sheets[0]).convert("L"))[::SCALE, ::SCALE]
    assert np.array_equal(final, grid[-1, 0])  # the GIF follows the first prompt's final sample
    frame = np.asarray(gif.convert("L"))
    assert np.array_equal(frame[: 28 * SCALE, (frame.shape[1] - 28 * SCALE) // 2:][:, : 28 * SCALE][::SCALE, ::SCALE], final)


def test_validation_is_logged_apart_from_training_steps(tiny_pipeline):
    train, val = read_metrics(tiny_pipeline / "decoder")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert val and all("val_loss" in r and r["val_loss"] > 0 for r in val) and val[-1]["step"] == 8
    assert all("time" in r for r in train + val)
    status = json.loads((tiny_pipeline / "decoder" / "run.json").read_text())
    assert status == {**status, "stage": "decoder", "step": 8, "saved": 8, "total": 8, "finished": True,
                      "objective": "val_loss", "direction": "minimize"}


def test_t2i_runs_tables_every_run_under_a_folder(tiny_pipeline, tmp_path):
    shutil.copytree(tiny_pipeline.parent, tmp_path / "runs")  # clip/ and pipe/ (whose clip/ is a copy, not a run)
    cut = tmp_path / "runs" / "pipe" / "decoder"
    status = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**status, "step": 6, "saved": 4, "finished": False}))
    r = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = {line.split("│")[1].strip(): line for line in r.output.splitlines() if line.count("│") > 3}
    assert set(lines) == {"clip", "pipe/prior", "pipe/decoder"}
    assert "finished" in lines["clip"] and "val_zero_shot" in lines["clip"] and "108/108" in lines["clip"]
    assert "prior_cosine" in lines["pipe/prior"] and "finished" in lines["pipe/prior"]
    assert "resumable from 4" in lines["pipe/decoder"] and "6/8" in lines["pipe/decoder"]
    assert "val_loss" in lines["pipe/decoder"]
    r = run("runs", tmp_path / "nothing")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no such folder" in r.output


def test_smoothing_is_tensorboards_debiased_average():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 0.5 * 10 / 0.75])
    assert smooth([3.0, 4.0], 0.0) == [3.0, 4.0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) is not installed")
@pytest.mark.slow
def test_t2i_plot_draws_runs_by_step_and_by_time(tiny_pipeline, tmp_path):
    out = tmp_path / "p.png"
    r = run("plot", tiny_pipeline / "prior", tiny_pipeline / "decoder", "--out", out)
    assert r.exit_code == 0, r.output
    image = Image.open(out)
    assert image.size == (1440, 540)  # two panels: training and validation
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # drawn curves, not a blank
    r = run("plot", tiny_pipeline, "--x", "time", "--metric", "grad_norm", "--out", tmp_path / "t.png")
    assert r.exit_code == 0, r.output
    r = run("plot", tiny_pipeline, "--metric", "nope", "--out", tmp_path / "n.png")
    assert r.exit_code == 1 and "no run logs 'nope'" in r.output and "loss" in r.output
    assert not (tmp_path / "n.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard (an extra) is not installed")
def test_tensorboard_logs_scalars_and_sheets(tiny_pipeline, tiny_config, mnist_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run("decoder-train", "--clip", tiny_pipeline / "clip", "--config", tiny_config, "--data-dir", mnist_dir,
            "--stage", "decoder", "--max-steps", 3, "--out", tmp_path, "--tensorboard")
    assert r.exit_code == 0, r.output
    events = EventAccumulator(str(tmp_path / "decoder" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("decoder/train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("decoder/val/val_loss")] == [3]
    assert [e.step for e in events.Images("decoder/samples")] == [3]
