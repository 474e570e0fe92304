"""`t2i tune`: a search of a tiny stage with Optuna, resumed after an interruption, and every bad space refused."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from t2i.cli import app
from t2i.stages.runs import read_metrics
from unclip.config import ClipConfig, PriorConfig, load_config

pytest.importorskip("optuna", reason="Optuna (the tune extra) is not installed")
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
SPACE = {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "model.embed_dim": {"choices": [16, 32]},
         "model.image_widths": {"choices": [[8, 16], [16, 32]]}}


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def trials(out: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(out / "study.db") as db:  # a real database: read it as anyone would
        return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


@pytest.mark.slow
def test_a_three_trial_study_writes_its_best_config_and_scores_it_on_test(space, tiny_config, mnist_dir, tmp_path):
    space.write_text(space.read_text().replace("0.001", "1e-3").replace("0.01", "1e-2"))  # as the issue writes them
    assert "1e-3" in space.read_text()
    out = tmp_path / "study"
    r = run("tune", "clip", "--space", space, "--trials", 3, "--out", out, "--config", tiny_config,
            "--data-dir", mnist_dir, "--max-steps", 10, "--evaluate-best")
    assert r.exit_code == 0, r.output
    found = trials(out)
    assert len(found) == 3 and {state for _, state in found} <= {"COMPLETE", "PRUNED"}
    assert all((out / f"trial_{n:03d}" / "metrics.jsonl").is_file() for n, _ in found)
    assert all((out / f"trial_{n:03d}" / "model.safetensors").is_file() for n, state in found if state == "COMPLETE")
    best = load_config(ClipConfig, out / "best.yaml")  # ready for --config
    assert 1e-3 <= best.train.lr <= 1e-2 and best.model.embed_dim in (16, 32)
    assert best.model.image_widths in ([8, 16], [16, 32]) and best.train.max_steps == 10
    n = int(next(line for line in r.output.splitlines() if line.startswith("best: trial")).split()[2].rstrip(","))
    trained = load_config(ClipConfig, out / f"trial_{n:03d}" / "config.yaml")
    assert (trained.train.lr, trained.model.embed_dim) == (best.train.lr, best.model.embed_dim)
    assert "on the test split: zero_shot" in r.output and (out / "best" / "model.safetensors").is_file()
    # the same command again has nothing left to do
    r = run("tune", "clip", "--space", space, "--trials", 3, "--out", out, "--config", tiny_config,
            "--data-dir", mnist_dir, "--max-steps", 10)
    assert r.exit_code == 0, r.output
    assert len(trials(out)) == 3
    (out / "study.db").unlink()  # trial folders without their study are not taken for a new one's
    r = run("tune", "clip", "--space", space, "--trials", 3, "--out", out, "--config", tiny_config, "--data-dir", mnist_dir)
    assert r.exit_code == 1 and "holds trial folders but no study.db" in r.output


@pytest.mark.slow
def test_an_interrupted_study_resumes_when_the_command_is_run_again(space, tiny_config, mnist_dir, tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "t2i.cli", "tune", "clip", "--space", str(space), "--trials", "2", "--out", str(out),
               "--config", str(tiny_config), "--data-dir", str(mnist_dir), "--max-steps", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = out / "trial_000"
    deadline = time.time() + 120
    while not (first / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first checkpoint (step 20, `ckpt_every` of the tiny config) is written
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "run the same command again" in output and "Traceback" not in output
    assert trials(out) == [(0, "FAIL")]
    cut = read_metrics(first)[0][-1]["step"]
    assert 20 <= cut < 60
    r = run(*command[3:])
    assert r.exit_code == 0, r.output
    assert trials(out) == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")] or \
        [s for _, s in trials(out)][1:] in (["COMPLETE", "PRUNED"], ["PRUNED", "COMPLETE"])
    # trial 1 took up trial 0's parameters and folder, and went on from its checkpoint: every step logged once
    assert [r["step"] for r in read_metrics(first)[0]] == list(range(1, 61))
    assert not (out / "trial_001").exists() and (out / "trial_002").is_dir()


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"low": 1, "high": 2}}, "no field 'lrr' in train"),
    ({"model.widths.x": {"low": 1, "high": 2}}, "no field 'widths' in model"),
    ({"train.lr": {"low": 1e-2, "high": 1e-3}}, "low 0.01 is above high 0.001"),
    ({"model.embed_dim": {"choices": []}}, "choices must be a non-empty list"),
    ({"model.embed_dim": {"choices": ["big"]}}, "expected an integer"),
    ({"train.data": {"choices": ["mnist"]}}, "cannot be searched"),
    ({"train.lr": {"low": 0, "high": 1e-3, "log": True}}, "a log range needs low > 0"),
    ({"train.lr": 0.01}, "give {low: .., high: ..}"),
    ({}, "the search space is empty"),
])
def test_a_bad_space_is_one_line_before_any_trial(space, message, tiny_config, mnist_dir, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    r = run("tune", "clip", "--space", path, "--trials", 2, "--out", tmp_path / "study", "--config", tiny_config,
            "--data-dir", mnist_dir)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output
    assert not (tmp_path / "study").exists()


def test_stage_two_needs_its_clip(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"model.width": {"choices": [16, 32]}}))
    r = run("tune", "prior", "--space", path, "--out", tmp_path / "study")
    assert r.exit_code == 1 and "--clip DIR" in r.output
    r = run("tune", "prior", "--space", path, "--out", tmp_path / "study", "--clip", tmp_path)
    assert r.exit_code == 1 and "not a CLIP checkpoint folder" in r.output


def test_the_prior_is_tuned_against_a_frozen_clip(tiny_pipeline, tiny_config, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"model.width": {"choices": [16, 32]}, "train.lr": {"low": 1e-3, "high": 3e-3}}))
    r = run("tune", "prior", "--clip", tiny_pipeline / "clip", "--space", path, "--trials", 2, "--out", tmp_path / "s",
            "--config", tiny_config, "--max-steps", 4)
    assert r.exit_code == 0, r.output
    assert "prior_cosine" in r.output and load_config(PriorConfig, tmp_path / "s" / "best.yaml").model.width in (16, 32)
