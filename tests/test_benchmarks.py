"""The GPU benchmarks' scripts on the CPU, on tiny data: what they report is what they measured."""
from __future__ import annotations

import json
import sys

import pytest


def test_generation_throughput_reports_images_per_second_per_variant(tiny_pipeline, tmp_path, monkeypatch):
    from benchmarks import generation_throughput

    monkeypatch.setattr(sys, "argv", ["generation_throughput.py", "--checkpoints", str(tiny_pipeline), "--device", "cpu",
                                      "--batch", "4", "--runs", "2", "--variants", "fp32,bf16", "--out", str(tmp_path)])
    generation_throughput.main()
    report = json.loads((tmp_path / "generation_throughput.json").read_text())
    assert report["device"] == "cpu" and report["batch"] == 4
    assert [r["variant"] for r in report["in_process"]] == ["fp32", "bf16"]
    for row in report["in_process"]:
        assert len(row["seconds"]) == 2 and row["median_s"] == pytest.approx(sum(row["seconds"]) / 2)
        assert row["images_per_second"] == pytest.approx(4 / row["median_s"])
    assert "| bf16 |" in (tmp_path / "generation_throughput.md").read_text()
    monkeypatch.setattr(sys, "argv", ["generation_throughput.py", "--variants", "fp64"])
    with pytest.raises(SystemExit):
        generation_throughput.main()


def test_resume_benchmark_finds_a_resumed_run_equal_to_an_uninterrupted_one(mnist_dir, tiny_config, tmp_path,
                                                                            monkeypatch):
    """benchmarks/resume.py on the CPU, where a resumed run is exact: it reports no difference at all, and a run
    that really was stopped part-way."""
    from benchmarks import resume

    monkeypatch.setattr(sys, "argv", ["resume.py", "--config", str(tiny_config), "--data-dir", str(mnist_dir),
                                      "--device", "cpu", "--steps", "40", "--stop-after", "3", "--out", str(tmp_path)])
    resume.main()
    report = json.loads((tmp_path / "resume.json").read_text())
    for stage in ("clip", "decoder"):
        assert 3 <= report[stage]["stopped_at"] < 40, report[stage]
        for pair in ("resumed", "uninterrupted_twice"):
            assert report[stage][pair] == {"steps": 40, "max_loss_difference": 0.0, "max_weight_difference": 0.0}
