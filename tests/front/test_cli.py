"""The CLI end to end on a tiny pipeline trained in the test session, and every bad input it must refuse."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from t2i.stages.runs import read_metrics

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_pngs_grid_and_gif_reproducibly(tiny_pipeline, tmp_path):
    args = ["generate", "--checkpoints", tiny_pipeline, "--prompt", "six", "--num-samples", 5, "--steps", 4,
            "--batch-size", 3]
    r = run(*args, "--out", tmp_path / "a", "--animate")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "denoise.gif", "grid.png"]
    with Image.open(tmp_path / "a" / "0000.png") as im:
        assert im.size == (28, 28) and im.mode == "L"
    with Image.open(tmp_path / "a" / "denoise.gif") as gif:
        assert gif.n_frames >= 4
    assert run(*args, "--out", tmp_path / "b").exit_code == 0
    assert run(*args, "--out", tmp_path / "c", "--seed", 1).exit_code == 0
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files if f.endswith("png")]
    assert all(same)
    assert (tmp_path / "a" / "0000.png").read_bytes() != (tmp_path / "c" / "0000.png").read_bytes()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_every_sampler_runs_from_the_cli(tiny_pipeline, tmp_path, sampler):
    r = run("generate", "--checkpoints", tiny_pipeline, "--prompt", "a handwritten 3", "-n", 2, "--sampler", sampler,
            "--steps", 3, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "0001.png").exists()


def test_odd_but_valid_prompts(tiny_pipeline, tmp_path):
    long = " ".join(["a very long caption about a handwritten seven"] * 5)
    for i, prompt in enumerate([long, "七 seven ñ"]):
        r = run("generate", "--checkpoints", tiny_pipeline, "--prompt", prompt, "-n", 1, "--steps", 2,
                "--out", tmp_path / str(i))
        assert r.exit_code == 0, r.output
    assert "truncated" in run("generate", "--checkpoints", tiny_pipeline, "--prompt", long, "-n", 1, "--steps", 2,
                              "--out", tmp_path / "x").output


def test_clip_eval_and_classify(tiny_pipeline, mnist_dir, tmp_path):
    r = run("clip-eval", "--clip", tiny_pipeline / "clip", "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    assert re.fullmatch(r"zero-shot accuracy: [01]\.\d{4}", r.output.strip().splitlines()[-1])
    image = tmp_path / "seven.png"
    from tests.conftest import draw_glyphs

    images, labels = draw_glyphs(1, 5)
    Image.fromarray(images[0]).resize((64, 64)).convert("RGB").save(image)
    r = run("classify", image, "--clip", tiny_pipeline / "clip", "--labels", "zero,one,two,three,four,five,six,seven,eight,nine")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{image}: ")


def broken_pipeline(tiny_pipeline: Path, tmp_path: Path, damage: str) -> Path:
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, pipe)
    if damage == "no-prior":
        shutil.rmtree(pipe / "prior")
    elif damage == "truncated":
        w = pipe / "decoder" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "garbage":
        (pipe / "decoder" / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage in ("unknown-key", "wrong-type", "fingerprint", "bad-choice"):
        path = pipe / "prior" / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        if damage == "bad-choice":
            cfg["model"]["prediction"] = "V"
        elif damage == "unknown-key":
            cfg["model"]["widht"] = 3
        elif damage == "wrong-type":
            cfg["model"]["layers"] = "two"
        else:
            cfg["clip_fingerprint"] = "0123456789abcdef"
        path.write_text(yaml.safe_dump(cfg))
    return pipe


BAD_GENERATE = [
    # (extra args, damage to the pipeline, expected message)
    (["--prompt", ""], None, "prompt is empty"),
    (["--prompt", "   "], None, "prompt is empty"),
    (["--num-samples", "0"], None, "Invalid value for '--num-samples'"),
    (["--num-samples", "-3"], None, "Invalid value for '--num-samples'"),
    (["--num-samples", "many"], None, "Invalid value for '--num-samples'"),
    (["--steps", "0"], None, "--steps must be at least 1"),
    (["--guidance", "-1"], None, "--guidance must be a finite number >= 0"),
    (["--sampler", "euler"], None, "Invalid value for '--sampler'"),
    (["--device", "cuda"], None, "--device 'cuda' was asked for, but PyTorch sees no CUDA GPU"),
    (["--steps", "60"], None, "more than the 50 diffusion steps of the prior"),
    ([], "bad-choice", "model.prediction: 'V' is not one of v, x0, eps"),
    ([], "no-prior", "lacks prior/"),
    ([], "truncated", "truncated or corrupt"),
    ([], "garbage", "truncated or corrupt"),
    ([], "unknown-key", "unknown config key model.widht"),
    ([], "wrong-type", "model.layers: expected an integer"),
    ([], "fingerprint", "trained against a different CLIP"),
]


@pytest.mark.parametrize("extra,damage,message", BAD_GENERATE)
def test_generate_refuses_bad_input_in_one_line(tiny_pipeline, tmp_path, extra, damage, message):
    pipe = broken_pipeline(tiny_pipeline, tmp_path, damage) if damage else tiny_pipeline
    args = {"--prompt": "six", "--num-samples": "1", "--steps": "2", "--checkpoints": str(pipe), "--out": str(tmp_path / "o")}
    args.update(zip(extra[::2], extra[1::2]))
    r = run("generate", *[x for kv in args.items() for x in kv])
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_the_t2i_command_ends_a_sampling_run_with_its_status_and_its_output_written(tiny_pipeline, tmp_path):
    """`t2i` (cli:run) skips Python's teardown after generate: nothing it printed or wrote may be lost."""
    def t2i(*args):
        return subprocess.run([sys.executable, "-c", "import t2i.cli as cli; cli.run()", *map(str, args)], capture_output=True,
                              text=True, cwd=Path(__file__).parents[2])

    ok = t2i("generate", "--checkpoints", tiny_pipeline, "--prompt", "six", "-n", 2, "--steps", 2, "--out", tmp_path / "g")
    assert ok.returncode == 0 and "wrote 2 image(s) and grid.png" in ok.stderr, ok.stderr
    assert sorted(f.name for f in (tmp_path / "g").iterdir()) == ["0000.png", "0001.png", "grid.png"]
    assert Image.open(tmp_path / "g" / "grid.png").size[0] > 0
    bad = t2i("generate", "--checkpoints", tiny_pipeline, "--prompt", "six", "--steps", 0, "--out", tmp_path / "b")
    assert bad.returncode == 1 and "--steps must be at least 1 (a whole number), got 0" in bad.stderr and "Traceback" not in bad.stderr
    assert t2i("vary", "--help").returncode == 0 and t2i("--help").returncode == 0


def test_missing_pipeline_and_unwritable_output(tiny_pipeline, tmp_path):
    r = run("generate", "--prompt", "six", "--checkpoints", tmp_path / "nowhere")
    assert r.exit_code == 1 and "checkpoint folder not found" in r.output
    assert re.search(r"shipped pipeline: [a-z, ]*mnist", r.output), r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("generate", "--prompt", "six", "-n", 1, "--checkpoints", tiny_pipeline, "--out", blocker / "sub")
    assert r.exit_code == 1 and "cannot create the output folder" in r.output and "Traceback" not in r.output


def test_classify_refuses_a_non_image(tiny_pipeline, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("hello")
    r = run("classify", fake, "--clip", tiny_pipeline / "clip")
    assert r.exit_code == 1 and "is not an image" in r.output and "Traceback" not in r.output


def test_training_refuses_missing_data(tmp_path):
    r = run("clip-train", "--data", "folder:" + str(tmp_path), "--out", tmp_path / "run")
    assert r.exit_code == 1 and "neither metadata.jsonl nor captions.csv" in r.output


def test_many_samples_are_drawn_in_batches(tiny_pipeline, tmp_path):
    r = run("generate", "--checkpoints", tiny_pipeline, "--prompt", "one", "-n", 150, "--batch-size", 64,
            "--steps", 1, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert len(list(tmp_path.glob("[0-9][0-9][0-9][0-9].png"))) == 150


def test_flags_override_the_config_file_and_the_resolved_config_is_saved(mnist_dir, tiny_config, tmp_path):
    r = run("clip-train", "--config", tiny_config, "--data-dir", mnist_dir, "--max-steps", 3, "--lr", 0.01,
            "--batch-size", 50, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["lr"] == 0.01 and saved["train"]["batch_size"] == 50
    assert saved["model"]["text_width"] == 32 and saved["train"]["data_dir"] == str(mnist_dir)  # from the file / flag
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == [1, 2, 3]


def test_export_stores_half_precision_and_still_generates(tiny_pipeline, tmp_path):
    import torch
    from safetensors.torch import load_file

    r = run("export", "--checkpoints", tiny_pipeline, "--out", tmp_path / "ship")
    assert r.exit_code == 0, r.output
    for stage in ("clip", "prior", "decoder"):  # CLIP keeps the vocabulary of the captions it was trained on
        extra = ["vocabulary.txt"] if stage == "clip" else []
        assert sorted(p.name for p in (tmp_path / "ship" / stage).iterdir()) == ["config.yaml", "model.safetensors", *extra]
        weights = load_file(tmp_path / "ship" / stage / "model.safetensors")
        assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    r = run("generate", "--checkpoints", tmp_path / "ship", "--prompt", "six", "-n", 2, "--steps", 2, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output  # the fingerprints still match across precisions
    r = run("export", "--checkpoints", tiny_pipeline / "clip", "--out", tmp_path / "clip")  # one stage: a CLIP to train on
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "clip").iterdir()) == \
        ["config.yaml", "model.safetensors", "vocabulary.txt"]
    assert (tmp_path / "clip" / "model.safetensors").read_bytes() == (tmp_path / "ship" / "clip" / "model.safetensors").read_bytes()
    (tmp_path / "empty").mkdir()
    r = run("export", "--checkpoints", tmp_path / "empty", "--out", tmp_path / "nothing")
    assert r.exit_code == 1 and "lacks clip/model.safetensors (and is no stage folder" in r.output


def test_a_pipeline_folder_carries_its_own_sampling_defaults(tiny_pipeline, tmp_path):
    """sampling.yaml beside the stages sets what generate, the API and the server draw with when no flag says
    otherwise; flags still win; export keeps it; a bad key is one line."""
    from unclip.api import UnCLIPPipeline

    folder = tmp_path / "own"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "sampling.yaml").write_text("steps: 3\nprior_guidance: 2.5\n")
    options = UnCLIPPipeline.from_pretrained(folder).options()
    assert (options.steps, options.prior_guidance, options.guidance) == (3, 2.5, 1.0)
    assert UnCLIPPipeline.from_pretrained(folder).options(num_inference_steps=5).steps == 5
    prompt = ["--prompt", "six", "-n", 2]
    assert run("generate", "--checkpoints", folder, *prompt, "--out", tmp_path / "a").exit_code == 0
    r = run("generate", "--checkpoints", tiny_pipeline, *prompt, "--steps", 3, "--prior-guidance", 2.5,
            "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    assert run("export", "--checkpoints", folder, "--out", tmp_path / "ship").exit_code == 0
    assert (tmp_path / "ship" / "sampling.yaml").read_text() == "steps: 3\nprior_guidance: 2.5\n"
    (folder / "sampling.yaml").write_text("stpes: 3\n")
    r = run("generate", "--checkpoints", folder, *prompt, "--out", tmp_path / "c")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "sampling.yaml: unknown config key stpes" in r.output


def test_a_pipeline_config_may_carry_the_sampling_defaults_its_recipe_was_judged_with(tiny_pipeline, mnist_dir,
                                                                                       tiny_config, tmp_path):
    """A `sampling:` section of a pipeline config becomes OUT/sampling.yaml of `t2i decoder-train`; a bad key there
    is a one-line error before anything trains."""
    config = yaml.safe_load(tiny_config.read_text())
    config["prior"]["model"]["whiten"] = True
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**config, "sampling": {"guidance": 1.5}}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "sampling": {"guidence": 1.5}}))
    common = ["--clip", tiny_pipeline / "clip", "--data-dir", mnist_dir, "--stage", "prior", "--max-steps", 2]
    r = run("decoder-train", *common, "--config", tmp_path / "bad.yaml", "--out", tmp_path / "bad")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "bad.yaml, sampling: unknown config key guidence" in r.output and not (tmp_path / "bad").exists()
    r = run("decoder-train", *common, "--config", tmp_path / "good.yaml", "--out", tmp_path / "good")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "good" / "sampling.yaml").read_text()) == {"guidance": 1.5}
    (tmp_path / "good" / "sampling.yaml").write_text("guidance: 2.0\n")  # set by hand (or by distill): kept
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**config, "sampling": {"guidance": 3.0}}))
    r = run("decoder-train", *common, "--config", tmp_path / "good.yaml", "--out", tmp_path / "good", "--overwrite")
    assert r.exit_code == 0 and "sampling.yaml kept" in r.output, r.output
    assert (tmp_path / "good" / "sampling.yaml").read_text() == "guidance: 2.0\n"
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**config, "sampling": {"guidance": 1.5}}))
    shutil.copytree(tiny_pipeline / "decoder", tmp_path / "good" / "decoder")  # the whitened prior in a pipeline
    r = run("generate", "--checkpoints", tmp_path / "good", "--prompt", "six", "-n", 2, "--steps", 2, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
