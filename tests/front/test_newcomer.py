"""A newcomer's first hour (issue 47): a finished run is never overwritten, exit codes say how a run ended, a word
or a setting a pipeline cannot honour is said, and the small things a first user trips on."""
from __future__ import annotations

import json
import os
import signal
import time
import warnings

import pytest
from PIL import Image
from typer.testing import CliRunner

import t2i.stages.clip as clip_recipe
from t2i.cli import app
from unclip.api import UnCLIPPipeline
from unclip.errors import SettingWarning, UnknownWordsWarning

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_and_resume_of_it_ends_at_once(tiny_config, mnist_dir, tmp_path):
    out = tmp_path / "clip"
    train = ["clip-train", "--config", tiny_config, "--data-dir", mnist_dir, "--max-steps", 3, "--out", out]
    assert run(*train).exit_code == 0
    weights = (out / "model.safetensors").read_bytes()
    again = run(*train)
    assert again.exit_code == 1 and "holds a finished clip run (step 3 of 3)" in again.output
    assert "--resume" in again.output and "--overwrite" in again.output and "--out" in again.output
    assert (out / "model.safetensors").read_bytes() == weights  # byte for byte
    t = time.perf_counter()
    resumed = run(*train, "--resume")
    assert resumed.exit_code == 0 and "is finished; nothing to resume" in resumed.output
    assert time.perf_counter() - t < 5 and (out / "model.safetensors").read_bytes() == weights
    replaced = run(*train[:-2], "--max-steps", 4, "--out", out, "--overwrite")
    assert replaced.exit_code == 0 and (out / "model.safetensors").read_bytes() != weights
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(lines) == 4  # the old run's metrics went with it
    assert run(*train, "--resume", "--overwrite").exit_code == 1


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_exits_130_or_143_saved_and_resumable(tiny_config, mnist_dir, tmp_path, monkeypatch, sig, code):
    stage = clip_recipe.clip_stage

    def stopped(cfg, *a, **k):
        built = stage(cfg, *a, **k)
        inner = built.loss

        def loss(batch, step, module):
            if step == 2:
                os.kill(os.getpid(), sig)
            return inner(batch, step, module)

        built.loss = loss
        return built

    monkeypatch.setattr(clip_recipe, "clip_stage", stopped)
    out = tmp_path / "clip"
    r = run("clip-train", "--config", tiny_config, "--data-dir", mnist_dir, "--max-steps", 5, "--out", out)
    assert r.exit_code == code and f"{sig.name}: saved step 3" in r.output
    assert (out / "train_state.pt").is_file()
    monkeypatch.setattr(clip_recipe, "clip_stage", stage)
    r = run("clip-train", "--config", tiny_config, "--data-dir", mnist_dir, "--max-steps", 5, "--out", out, "--resume")
    assert r.exit_code == 0 and json.loads((out / "run.json").read_text())["finished"]


def test_words_and_settings_a_pipeline_cannot_honour_are_said(tmp_path):
    pipe = UnCLIPPipeline.from_pretrained("mnist", "cpu")
    assert pipe.unknown_words("a cat and a six") == ["cat"] and pipe.unknown_words("a handwritten 6") == []
    with pytest.warns(UnknownWordsWarning, match="'cat' never appeared in this pipeline's training captions"):
        pipe("a cat", num_images_per_prompt=1)
    with pytest.warns(SettingWarning, match="distilled, so sampling their own DDIM steps"):
        pipe("six", num_images_per_prompt=1, num_inference_steps=10)  # the README's API snippet asked this
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about a prompt in its words at its defaults
        pipe("a handwritten six", num_images_per_prompt=1)
    r = run("generate", "--prompt", "a cat", "-n", 1, "--out", tmp_path / "cat")
    assert r.exit_code == 0 and "warning: 'cat' never appeared" in r.output
    fashion = UnCLIPPipeline.from_pretrained("fashion", "cpu")
    assert fashion.unknown_words("a red dress") == ["red"] and fashion.unknown_words("a cat") == ["cat"]
    scenes = UnCLIPPipeline.from_pretrained("scenes", "cpu")
    assert scenes.unknown_words("a red 3 to the left of a blue 7") == []


def test_a_large_run_says_its_size_and_where_it_writes(monkeypatch, tmp_path):
    import t2i.folders

    monkeypatch.setattr(t2i.folders, "LARGE_RUN", 2)
    r = run("generate", "--prompt", "six", "-n", 3, "--out", tmp_path / "big")
    assert r.exit_code == 0 and "drawing 3 images of 28x28 into" in r.output and "big" in r.output


@pytest.mark.slow
def test_the_small_things(tiny_pipeline, tmp_path):
    version = run("--version")
    assert version.exit_code == 0 and version.output.startswith("t2i ")
    (tmp_path / "c.yaml").write_text("train: {max_step: 3}\n")
    r = run("clip-train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "unknown config key train.max_step (did you mean max_steps?" in r.output
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1, 2\n  x: 3\n")
    r = run("clip-train", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "x")
    assert r.exit_code == 1 and r.output.count(str(tmp_path / "bad.yaml")) == 1 and "bad.yaml:3:4: not valid YAML" in r.output
    for name in ("a-rather-long-experiment-name-that-goes-on", "another-experiment-with-an-even-longer-name"):
        deep = tmp_path / "runs" / name / "pipeline-with-a-long-name" / "prior"  # a run as training writes one
        deep.mkdir(parents=True)
        (deep / "metrics.jsonl").write_text('{"step": 1, "time": 0.5, "loss": 1.0, "lr": 0.001}\n')
        (deep / "run.json").write_text('{"stage": "prior", "step": 1, "saved": 1, "total": 1, "time": 0.5, "finished": true}\n')
    table = run("runs", tmp_path / "runs")  # its labels whole, not cut at 80 columns ("pipe/dec...")
    assert table.exit_code == 0 and "another-experiment-with-an-even-longer-name/pipeline-with-a-long-name/prior" in table.output
    source = tmp_path / "six.png"
    Image.new("L", (28, 28)).save(source)
    r = run("vary", source, "-n", 4, "--steps", 2, "--checkpoints", tiny_pipeline, "--out", tmp_path / "v")
    assert r.exit_code == 0 and (tmp_path / "v" / "source.png").is_file()
    grid, cell = Image.open(tmp_path / "v" / "grid.png"), 2 * (28 + 2)  # 2x2 cells of 28 px and their borders
    assert grid.size == (2 * cell + 4, 2 * cell + 4)  # four variations, four cells


def test_the_page_shows_a_placeholder_that_is_not_a_value():
    from t2i.server.app import PAGE

    assert 'placeholder="what to draw, e.g. six"' in PAGE.read_text()
