"""The GPU benchmarks' scripts on the CPU, on tiny data: what they report is what they measured."""
from __future__ import annotations

import json
import sys

import pytest


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_cascade_benchmark_gives_both_arms_the_same_minutes_and_configs_the_cli_accepts():
    """benchmarks/cascade.py's plan: steps that fill each arm's minutes at the timed step costs, and arm configs that
    the stages' strict config loading takes; the 64x64 decoder differs from the base only by its resolution and the
    level that comes with it."""
    import copy
    from pathlib import Path

    import torch
    import yaml
    from benchmarks import cascade
    from unclip.config import DecoderConfig, UpsamplerConfig, merge, stage_section

    steps = cascade.planned_steps({"base": 2.0, "upsampler": 1.0, "single": 4.0}, minutes=30, base_share=0.8)
    assert steps == {"base": 720, "upsampler": 360, "single": 450}  # 24 + 6 minutes against 30
    raw = yaml.safe_load((Path(cascade.ROOT) / "configs" / "scenes.yaml").read_text())
    arms = {arm: cascade.arm_config(copy.deepcopy(raw), arm, steps) for arm in ("cascade", "single")}
    base, single = (merge(DecoderConfig(), stage_section(arms[a], "decoder")) for a in ("cascade", "single"))
    assert (base.train.max_steps, single.train.max_steps) == (720, 450)
    assert base.model == merge(DecoderConfig(), stage_section(raw, "decoder")).model  # the shipped recipe's
    assert single.model.image_size == 64 and base.model.image_size == 32
    assert single.model.widths[1:] == base.model.widths and single.model.text_levels == [i + 1 for i in base.model.text_levels]
    kept = {k: v for k, v in vars(single.model).items() if k not in ("image_size", "widths", "text_levels")}
    assert kept == {k: v for k, v in vars(base.model).items() if k not in ("image_size", "widths", "text_levels")}
    for arm in arms.values():
        assert merge(UpsamplerConfig(), stage_section(arm, "upsampler")).train.max_steps == 360
    # each model's step is timed as built by the stages, at a small batch here
    for section in ("decoder", "upsampler"):
        raw[section]["train"]["batch_size"] = 2
    for kind, model in (("decoder", {}), ("upsampler", {}), ("decoder", cascade.SINGLE_64)):
        assert 0 < cascade.step_seconds(kind, raw, model, torch.device("cpu"), repeats=1) < 60


@pytest.mark.slow
def test_emoji_clip_benchmark_ranks_each_image_name_among_every_things(tmp_path, monkeypatch, request):
    pytest.importorskip("cairosvg", reason="OpenMoji's SVGs need the emoji extra")
    from benchmarks import emoji_clip

    folder = request.getfixturevalue("emoji_dir")
    config = tmp_path / "c.yaml"
    config.write_text("clip:\n  model: {image_channels: 3, image_size: 32, image_widths: [8, 16], text_context: 24,\n"
                      "          text_width: 32, text_layers: 1, text_heads: 2, embed_dim: 16}\n"
                      "  train: {batch_size: 8, val_size: 4, warmup_steps: 1}\n")
    monkeypatch.setattr(sys, "argv", ["emoji_clip.py", "--data-dir", str(folder), "--config", str(config), "--steps", "2",
                                      "--run", str(tmp_path / "clip"), "--out", str(tmp_path / "out")])
    emoji_clip.main()
    report = json.loads((tmp_path / "out" / "emoji_clip.json").read_text())
    assert report["things"] == 5 and report["train"]["steps"] == 2  # four things and the OpenMoji extra
    for split in ("seen (val)", "held out (test)"):
        for per in report[split].values():
            for r in per.values():
                assert 0 <= r["top1"] <= r["top5"] <= 1 and r["images"] > 0
    assert "| held out (test) | name, style |" in (tmp_path / "out" / "emoji_clip.md").read_text()


@pytest.mark.slow
def test_emoji_evaluator_asks_what_the_contract_holds_out_and_judges_real_and_drawn_images(
        emoji_dir, tiny_pipeline, tmp_path, monkeypatch):
    pytest.importorskip("cairosvg", reason="OpenMoji's SVGs need the emoji extra")
    from benchmarks import emoji as bench
    import numpy as np
    from PIL import Image
    from unclip.data.emoji import STYLES, digest, held_out, rendered

    records, _ = rendered(emoji_dir, 64)
    toned = {e.identity for e in records if e.tone}
    sets = bench.prompt_sets(records, per_kind=50)
    assert set(sets) == set(bench.KINDS)
    for p in sets["seen"]:
        assert all(held_out(records[i], toned) is None and not records[i].extra for i in p.real)
        assert p.text == f"{records[p.real[0]].names['en']}, {p.style} style"
    assert sets["held-out styles"] and all(held_out(records[p.real[0]], toned) == "style" for p in sets["held-out styles"])
    assert sets["held-out tones"] and all(p.tone == digest(p.identity) % 5 + 1 for p in sets["held-out tones"])
    assert "roter Apfel" in [p.text for p in sets["german"]]  # the same things, named in each language
    assert [p.identity for p in sets["german"]] == [p.identity for p in sets["english"]] == [p.identity for p in sets["french"]]
    assert all(len(p.real) == 3 and not p.style for p in sets["english"])  # a name alone: each style's image

    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(sys, "argv", ["emoji.py", "--data-dir", str(emoji_dir), "--checkpoints", str(tiny_pipeline),
                                      "--prompts", "3", "--images", "2", "--judge-epochs", "40", "--time-runs", "1",
                                      "--out", str(tmp_path / "out")])
    bench.main()
    report = json.loads((tmp_path / "out" / "emoji.json").read_text())
    assert report["things"] == 5 and len(list((tmp_path / "cache").glob("emoji-judge-*.safetensors"))) == 1
    assert report["real"]["seen"]["thing"] >= 0.6 and report["real"]["seen"]["style"] >= 0.6  # the judge learnt them
    for kind in bench.KINDS:  # a grey-digit pipeline draws no emoji; the rates are still rates of what it drew
        assert all(0 <= v <= 1 for v in report["generated"][kind].values())
    assert report["fd"] > report["fd_floor"] > 0 and report["generated"]["diversity"] >= 0
    text = (tmp_path / "out" / "emoji.md").read_text()
    assert "| held-out tones |" in text and "| Frechet distance / floor |" in text
    assert report["time_16"] > report["import_torch"] > 0 and "| `t2i generate -n 16` from process start" in text
    tones = report["gallery"]["tones"]  # waving hand in its five tones, the one the contract holds out framed
    assert [t for t, _ in tones][0] == "waving hand: light skin tone, noto style" and len(tones) == 5
    assert sum(held for _, held in tones) == 1 and "**waving hand: " in text
    assert [t for t, _ in report["gallery"]["styles"]][:3] == [f"red apple, {s} style" for s in STYLES]
    sheet = np.asarray(Image.open(tmp_path / "out" / "gallery-tones.png"))  # enlarged 2x: images 128 px, 4 apart
    assert [tuple(sheet[4, 4 + i * 132]) == (220, 30, 30) for i in range(5)] == [held for _, held in tones]


def test_latent_benchmark_measures_reconstructions_of_the_test_split_and_each_routes_cost(emoji_dir, tiny_pipeline,
                                                                                          tmp_path, monkeypatch):
    pytest.importorskip("cairosvg", reason="OpenMoji's SVGs need the emoji extra")
    import yaml

    from benchmarks import emoji as bench
    from benchmarks import latent
    from unclip.checkpoint import save_checkpoint
    from unclip.config import AutoencoderConfig, AutoencoderModelConfig
    from unclip.data.emoji import held_out_rules, rendered
    from unclip.models.autoencoder import Autoencoder

    cfg = AutoencoderConfig(model=AutoencoderModelConfig(widths=[8, 16]))
    save_checkpoint(tmp_path / "ae", Autoencoder(cfg.model), cfg)
    recipe = {"decoder": {"model": {"widths": [8, 16], "heads": 2, "context_tokens": 2}},
              "autoencoder": {"model": {"widths": [8, 16]}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    latent.main(["--data-dir", str(emoji_dir), "--autoencoder", str(tmp_path / "ae"), "--arms", "--config",
                 str(tmp_path / "tiny.yaml"), "--repeats", "1", "--judge-epochs", "2", "--steps-sweep", str(tiny_pipeline),
                 "--steps", "1,3", "--prompts", "2", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "latent.json").read_text())
    records, _ = rendered(emoji_dir, 64)
    a = report["autoencoder"]
    assert a["test_images"] == sum(rule is not None for rule in held_out_rules(records)) > 0
    assert a["latent"] == [4, 16, 16] and 0 < a["psnr_p10"] <= a["psnr"] < 40  # an untrained autoencoder blurs
    assert set(a["judge"]) == {"originals", "reconstructions"}
    assert all(0 <= v <= 1 for rates in a["judge"].values() for v in rates.values())
    assert [r["route"] for r in report["arms"]] == ["pixel 64", "cascade 32 -> 64", "latent 16x16x4"]
    assert all(r["train_step_s"] > 0 and r["sample_16_s"] > 0 for r in report["arms"])
    assert [(r["pipeline"], r["steps"]) for r in report["steps_sweep"]] == [(str(tiny_pipeline), 1), (str(tiny_pipeline), 3)]
    assert all(0 <= r["thing"] <= 1 and 0 <= r["style"] <= 1 and r["fd"] > 0 for r in report["steps_sweep"])
    text = (tmp_path / "out" / "latent.md").read_text()
    assert "| latent 16x16x4 | 4x16x16, patch 1 |" in text and "| reconstructions |" in text
    assert f"| {tiny_pipeline} | 3 |" in text
