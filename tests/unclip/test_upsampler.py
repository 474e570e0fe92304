"""DALL-E 2's cascade: a base decoder smaller than CLIP's images that also reads the caption (GLIDE's text
conditioning), and a diffusion upsampler after it."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2i.cli import app
from tests.conftest import TINY
from unclip.diffusion.schedule import alphas_cumprod
from unclip.images import resize
from unclip.components.upsampler import degrade
from t2i.stages.runs import read_metrics

runner = CliRunner()
# CLIP sees 28x28; the decoder draws 16x16 and reads the caption's tokens, the upsampler draws 28x28.
CASCADE = {
    **TINY,
    "decoder": {**TINY["decoder"], "model": {**TINY["decoder"]["model"], "image_size": 16, "text_tokens": True}},
    "upsampler": {"model": {"image_size": 28, "patch": 2, "widths": [8, 16], "heads": 2, "context_tokens": 2,
                            "timesteps": 50},
                  "train": {"max_steps": 60, "batch_size": 20, "lr": 3e-3, "val_size": 100, "warmup_steps": 5,
                            "ckpt_every": 30}},
}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cascade(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline's CLIP with a 16x16 prior + decoder and an upsampler to 28x28, through the CLI."""
    root = tmp_path_factory.mktemp("cascade")
    config = root / "cascade.yaml"
    config.write_text(yaml.safe_dump(CASCADE))
    r = run("decoder-train", "--clip", tiny_pipeline / "clip", "--config", config, "--out", root / "pipe")
    assert r.exit_code == 0, r.output
    r = run("upsampler-train", "--pipeline", root / "pipe", "--config", config)
    assert r.exit_code == 0, r.output
    return root / "pipe"


def test_degrade_is_the_upsampled_image_at_level_zero_and_noise_at_the_top():
    ac = alphas_cumprod("cosine", 1000)
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    clean = degrade(low, 16, torch.zeros(4, dtype=torch.long), ac, generator=g)
    assert clean.shape == (4, 3, 16, 16)
    torch.testing.assert_close(clean, resize(low, 16), atol=0.05, rtol=0)  # sqrt(1 - ab_0) is about 0.01
    noised = degrade(low, 16, torch.full((4,), 999), ac, generator=g)
    corr = torch.corrcoef(torch.stack([noised.flatten(), resize(low, 16).flatten()]))[0, 1]
    assert abs(corr) < 0.1 and 0.9 < noised.std() < 1.1
    blurred = degrade(low, 16, torch.zeros(4, dtype=torch.long), ac, sigma=1.0, generator=g)
    assert blurred.std() < clean.std() * 0.9  # a blur removes the high frequencies


@pytest.mark.parametrize("glide", [{}, {"text_layers": 1, "text_levels": [0, 1]}], ids=["clip-tokens", "own-encoder"])
def test_the_decoder_reads_the_caption_tokens_it_is_shown_and_none_when_dropped(glide):
    from unclip.config import DecoderModelConfig
    from unclip.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, text_tokens=True, **glide), 8, text_width=12)
    for p in net.parameters():  # the output layers start at zero: give every weight a say
        torch.nn.init.normal_(p, std=0.2)
    x, t, emb = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8)
    a, b = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    shown, hidden = torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    assert not torch.allclose(net(x, t, emb, a, shown, drop=keep), net(x, t, emb, b, shown, drop=keep))
    torch.testing.assert_close(net(x, t, emb, a, hidden, drop=keep), net(x, t, emb, b, hidden, drop=keep))
    torch.testing.assert_close(net(x, t, emb, a, shown, drop=drop), net(x, t, emb, b, shown, drop=drop))
    # the embedding alone dropped (embed_drop): the caption still read, the embedding not
    alone, kept = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(net(x, t, emb, a, shown, alone, drop=keep), net(x, t, -emb, a, shown, alone, drop=keep))
    assert not torch.allclose(net(x, t, emb, a, shown, alone, drop=keep), net(x, t, emb, b, shown, alone, drop=keep))
    assert not torch.allclose(net(x, t, emb, a, shown, alone, drop=keep), net(x, t, emb, a, shown, drop=keep))
    torch.testing.assert_close(net(x, t, emb, a, shown, kept, drop=keep), net(x, t, emb, a, shown, drop=keep))


def test_the_grounding_loss_measures_where_each_word_is_read_and_teaches_the_cross_attention_to_read_it_there():
    """TokenCompose's token loss over the maps every cross-attention records (the same output as the fused kernel)."""
    from unclip.config import DecoderModelConfig
    from unclip.models.unet import UNet, attention_shares, grounding_loss

    torch.manual_seed(0)
    net = UNet(DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, text_tokens=True, text_layers=1,
                                  text_levels=[0, 1]), 8, text_width=12)
    x, t, emb, text = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # the first caption's last two unread
    keep = torch.zeros(2, dtype=torch.bool)
    maps: list = []
    torch.testing.assert_close(net(x, t, emb, text, mask, drop=keep, maps=maps), net(x, t, emb, text, mask, drop=keep))
    assert [m.shape for m in maps] == [(2, 64, 9)] * 2 + [(2, 16, 9)] * 5 + [(2, 64, 9)] * 3  # 8x8, 4x4; 4 + 5 tokens
    assert all(torch.allclose(m.sum(-1), torch.ones(2, m.shape[1])) for m in maps)
    boxes = torch.zeros(2, 4, 64, 64)
    boxes[:, 0, :32, :32] = boxes[:, 1, 32:, 32:] = 1  # two objects, a quarter of the image each
    names = torch.zeros(2, 5, 4)
    names[:, 1, 0] = names[:, 3, 1] = 1  # token 1 names the first, token 3 the second
    even = [torch.ones(2, 64, 9), torch.ones(2, 16, 9)]
    shares, defined = attention_shares(even, boxes, names)
    torch.testing.assert_close(shares[defined], torch.full((8,), 0.25))  # 2 maps x 2 captions x 2 words
    assert defined[:, 0].tolist() == [[False, True, False, True, False]] * 2  # ungrounded tokens do not count
    unread = [m.clone() for m in even]
    for m in unread:
        m[0, :, 4 + 3] = 0  # a masked token has no weight anywhere: the first caption's token 3 was not read
    assert attention_shares(unread, boxes, names)[1][:, 0].tolist() == [[False, True, False, False, False]] * 2
    torch.testing.assert_close(grounding_loss(even, boxes, names), torch.tensor(0.75**2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)  # the loss reaches the attention it measures
    for _ in range(30):
        maps = []
        net(x, t, emb, text, mask, drop=keep, maps=maps)
        loss = grounding_loss(maps, boxes, names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.05 and attention_shares(maps, boxes, names)[0][..., 1].min() > 0.8


def test_new_text_layers_start_as_the_identity_so_a_fine_tuned_decoder_starts_where_it_was():
    from dataclasses import replace

    from unclip.config import DecoderModelConfig
    from unclip.models.unet import UNet

    torch.manual_seed(0)
    cfg = DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, text_tokens=True)
    old = UNet(cfg, 8, text_width=12)
    new = UNet(replace(cfg, text_layers=2, text_levels=[0, 1], attn_levels=[1]), 8, text_width=12)
    for p in old.parameters():
        torch.nn.init.normal_(p, std=0.2)
    missing = new.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert {k.split(".")[0] for k in missing} == {"reads", "attends", "text_encoder"}
    assert sorted(new.attends) == ["down1_0", "down1_1", "up1_0", "up1_1", "up1_2"]
    x, t, emb, text = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900]), torch.randn(3, 8), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # the last one dropped
    out = new(x, t, emb, text, mask, drop=torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, old(x, t, emb, text, mask, drop=torch.zeros(3, dtype=torch.bool)))


def test_text_layers_and_levels_are_checked_when_the_decoder_is_built():
    from unclip.config import DecoderModelConfig
    from unclip.errors import ConfigError
    from unclip.models.unet import UNet

    with pytest.raises(ConfigError, match="need text_tokens: true"):
        UNet(DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, text_layers=1), 8)
    with pytest.raises(ConfigError, match=r"text_levels \[2\] must be levels 0 to 1"):
        UNet(DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, text_tokens=True, text_levels=[2]), 8, text_width=12)
    with pytest.raises(ConfigError, match=r"attn_levels \[-1\] must be levels 0 to 1"):
        UNet(DecoderModelConfig(image_size=16, widths=[8, 16], heads=2, attn_levels=[-1]), 8)


@pytest.mark.slow
def test_grounding_needs_cross_attention_and_captions_that_say_what_each_word_names(cascade, tmp_path):
    config = tmp_path / "ground.yaml"
    for extra in ({}, {"text_levels": [0]}):  # the tiny data is MNIST's: its captions name no objects
        model = {**CASCADE["decoder"]["model"], "ground_weight": 0.01, **extra}
        config.write_text(yaml.safe_dump({**CASCADE, "decoder": {**CASCADE["decoder"], "model": model}}))
        r = run("decoder-train", "--clip", cascade / "clip", "--config", config, "--stage", "decoder", "--out", tmp_path / "g")
        assert r.exit_code == 1 and "ground_weight needs text_levels" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_init_fine_tunes_a_stage_from_saved_weights_and_new_layers_start_fresh(cascade, tmp_path):
    from safetensors.torch import load_file, save_file

    config = tmp_path / "glide.yaml"
    glide = {**CASCADE["decoder"]["model"], "text_layers": 1, "text_levels": [0]}
    config.write_text(yaml.safe_dump({**CASCADE, "decoder": {**CASCADE["decoder"], "model": glide}}))
    r = run("decoder-train", "--clip", cascade / "clip", "--config", config, "--stage", "decoder", "--init", cascade,
            "--max-steps", 1, "--lr", 0, "--out", tmp_path / "tuned")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps long lines
    assert "decoder: starting from" in said and "new: reads, text_encoder" in said
    before, after = load_file(cascade / "decoder" / "model.safetensors"), load_file(tmp_path / "tuned" / "decoder" / "model.safetensors")
    assert set(before) < set(after)
    for k, v in before.items():  # at lr 0 the step leaves the loaded weights as they were
        torch.testing.assert_close(after[k], v)
    r = run("decoder-train", "--clip", cascade / "clip", "--config", config, "--stage", "decoder",
            "--init", cascade / "upsampler", "--max-steps", 1, "--out", tmp_path / "wrong")
    assert r.exit_code == 1 and "does not fit this decoder" in r.output and "Traceback" not in r.output
    other = tmp_path / "other-clip"  # a retrained CLIP: the decoder still starts from its weights, with a note
    shutil.copytree(cascade / "clip", other)
    weights = load_file(other / "model.safetensors")
    save_file({**weights, "logit_scale": weights["logit_scale"] + 1}, other / "model.safetensors")
    r = run("decoder-train", "--clip", other, "--config", config, "--stage", "decoder", "--init", cascade,
            "--max-steps", 1, "--lr", 0, "--out", tmp_path / "moved")
    assert r.exit_code == 0, r.output
    assert "was trained against another CLIP" in " ".join(r.output.split())


def test_the_cascade_draws_at_the_upsampler_size_reproducibly(cascade, tmp_path):
    saved = yaml.safe_load((cascade / "upsampler" / "config.yaml").read_text())
    assert saved["model"]["low_size"] == 16 and saved["model"]["image_channels"] == 1  # from the decoder
    for name in ("a", "b"):
        r = run("generate", "--checkpoints", cascade, "--prompt", "six", "-n", 3, "--steps", 3, "--upsampler-steps", 2,
                "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    a = [Image.open(tmp_path / "a" / f"{i:04d}.png") for i in range(3)]
    assert all(im.size == (28, 28) for im in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(Image.open(tmp_path / "b" / f"{i:04d}.png"))) for i, x in enumerate(a))
    r = run("vary", tmp_path / "a" / "0000.png", "--checkpoints", cascade, "-n", 2, "--steps", 2, "--upsampler-steps", 2,
            "--out", tmp_path / "v")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "v" / "0000.png").size == (28, 28)
    r = run("interpolate", "--from", "one", "--to", "seven", "--frames", 3, "--checkpoints", cascade, "--steps", 2,
            "--upsampler-steps", 2, "--out", tmp_path / "i")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "i" / "0002.png").size == (28, 28)


def test_text_guidance_scales_the_caption_apart_from_the_image_embedding(cascade, tiny_pipeline, tmp_path):
    from unclip.api import UnCLIPPipeline
    from unclip.pipeline import draw as chain

    def draw(pipeline=cascade, **settings):  # the chain's floats: a tiny decoder reads its caption too faintly for uint8
        pipe = UnCLIPPipeline.from_pretrained(pipeline, "cpu")
        options = pipe.options(steps=3, upsampler_steps=1, guidance=2.0, **settings)
        return chain(pipe.pipeline, ["a six", "a six"], options, torch.Generator().manual_seed(0))

    plain, same, apart = draw(), draw(text_guidance=2.0), draw(text_guidance=5.0)
    assert torch.equal(plain, same)  # one scale for both: plain guidance
    assert not torch.equal(plain, apart)
    defaults = tmp_path / "defaults"  # a pipeline's default, as the setting sets it
    shutil.copytree(cascade, defaults)
    (defaults / "sampling.yaml").write_text("text_guidance: 5\n")
    assert torch.equal(apart, draw(defaults))
    r = run("generate", "--checkpoints", tiny_pipeline, "--prompt", "six", "--text-guidance", 3, "--out", tmp_path / "x")
    assert r.exit_code == 1 and "--text-guidance is for decoders that read the caption" in r.output
    assert "Traceback" not in r.output
    from unclip.components.clip import prompt_conditions
    from unclip.components.decoder import decode

    p = UnCLIPPipeline.from_pretrained(cascade, "cpu").pipeline  # the caption alone (the embedding dropped, embed_kept):
    cond, _ = prompt_conditions(p.clip, p.tokenizer, ["a six", "a one"])  # its inner condition reads nothing, so the
    text = (*cond[1:], torch.zeros(2, dtype=torch.bool))  # caption's own scale is plain guidance at that scale
    draw = lambda g, tg: decode(p.decoder, p.decoder_config, cond[0], "ddim", 2, g, torch.Generator().manual_seed(0),  # noqa: E731
                                text=text, text_guidance=tg)
    torch.testing.assert_close(draw(2.0, 5.0), draw(5.0, None))
    assert not torch.allclose(draw(2.0, 5.0), draw(2.0, None))


def test_upsampler_strength_refines_the_enlarged_base_image_in_part_of_the_chain(cascade, tmp_path):
    from unclip.api import UnCLIPPipeline
    from unclip.components.decoder import decode
    from unclip.pipeline import decode_and_upsample

    pipe = UnCLIPPipeline.from_pretrained(cascade, "cpu")
    p, emb = pipe.pipeline, torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    draw = lambda s: decode_and_upsample(p, emb, pipe.options(steps=2, upsampler_steps=4, upsampler_strength=s),  # noqa: E731
                                         torch.Generator().manual_seed(0))
    base = decode(p.decoder, p.decoder_config, emb, "dpmpp", 2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(draw(0.0), resize(base, 28))  # strength 0: the base image enlarged, untouched
    half, full = draw(0.5), draw(1.0)
    assert not torch.equal(half, full) and not torch.equal(half, draw(0.0))
    copy = tmp_path / "half"  # a pipeline's default; the progress bar counts the calls the shorter chain makes
    shutil.copytree(cascade, copy)
    (copy / "sampling.yaml").write_text("upsampler_strength: 0.5\n")
    calls = []
    UnCLIPPipeline.from_pretrained(copy, "cpu")("six", num_images_per_prompt=2, num_inference_steps=2, upsampler_steps=4,
                                                callback=lambda step, total, x0: calls.append(total))
    assert len(calls) == calls[0] == 2 + len(p.upsampler.timesteps("dpmpp", 4, 0.5)) < 2 + 4
    r = run("generate", "--checkpoints", cascade, "--prompt", "six", "--upsampler-strength", 1.5, "--out", tmp_path / "g")
    assert r.exit_code == 1 and "--upsampler-strength must be between 0 and 1, got 1.5" in r.output


def test_the_upsampler_loss_falls_and_samples_are_drawn(cascade):
    losses = [r["loss"] for r in read_metrics(cascade / "upsampler")[0]]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, (losses[:10], losses[-10:])
    assert list((cascade / "upsampler" / "samples").glob("sheet_*.png"))


def test_without_the_upsampler_the_base_size_is_drawn(cascade, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(cascade, base, ignore=shutil.ignore_patterns("upsampler"))
    r = run("generate", "--checkpoints", base, "--prompt", "six", "-n", 1, "--steps", 2, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "g" / "0000.png").size == (16, 16)


def test_cascade_errors_are_one_line(cascade, tiny_pipeline, tmp_path):
    r = run("generate", "--checkpoints", cascade, "--prompt", "six", "--upsampler-steps", 0, "--out", tmp_path / "g")
    assert r.exit_code == 1 and "--upsampler-steps must be at least 1" in r.output
    r = run("generate", "--checkpoints", cascade, "--prompt", "six", "--upsampler-steps", 51, "--out", tmp_path / "g")
    assert r.exit_code == 1 and "more than the upsampler's 50" in r.output
    mixed = tmp_path / "mixed"  # a 28x28 decoder beside an upsampler of 16x16 images
    shutil.copytree(tiny_pipeline, mixed, ignore=shutil.ignore_patterns("*.pt"))
    shutil.copytree(cascade / "upsampler", mixed / "upsampler")
    r = run("generate", "--checkpoints", mixed, "--prompt", "six", "--out", tmp_path / "g")
    assert r.exit_code == 1 and "upsamples 16x16 images, but the decoder draws 28x28" in r.output
    r = run("upsampler-train", "--pipeline", tmp_path / "nowhere")
    assert r.exit_code == 1 and "no clip/config.yaml" in r.output
    assert "Traceback" not in r.output


def test_our_gaussian_blur_is_torchvisions():
    from torchvision.transforms.functional import gaussian_blur as torchvision_blur

    from unclip.images import gaussian_blur

    x = torch.rand(2, 3, 16, 16)
    for sigma in (0.3, 0.7, 1.0):
        kernel = 2 * int(3 * sigma + 0.5) + 1
        torch.testing.assert_close(gaussian_blur(x, sigma), torchvision_blur(x, [kernel, kernel], [sigma, sigma]))
