"""Stage one: tokenizer, the multi-positive contrastive loss, and a tiny CLIP that learns glyphs."""
from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from t2i.stages.clip import clip_stage
from t2i.stages.trainer import fit
from unclip.config import ClipConfig, merge
from unclip.models.clip import CLIP, contrastive_loss, twin_direction_loss
from unclip.tokenizer import Tokenizer
from tests.conftest import TINY


def test_tokenizer_pads_truncates_and_handles_any_text(caplog):
    tok = Tokenizer(8)
    ids = tok(["six", "a handwritten six", "ñandú 六"])
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, 2] == 49407 and ids[0, 3:].eq(0).all()  # start, "six", end, padding
    assert ids[1].argmax() == 4  # the end token has the largest id: the text encoder pools there
    with caplog.at_level(logging.WARNING):
        long = tok(["one two three four five six seven eight nine ten"])
    assert long[0, -1] == 49407 and "truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the first few cut captions are shown, the rest counted
        tok([f"{n} two three four five six seven eight nine ten" for n in range(10)])
    assert caplog.text.count("truncated") == Tokenizer.SHOWN - 1 and "counted, not shown" in caplog.text
    assert tok.truncated == 11


def test_tokens_are_open_clips():
    """The ids are open_clip.tokenize's (ours reuses the tokenizer its module builds, without the model zoo)."""
    import open_clip

    texts = ["a red 3 to the left of a blue 7", "six!", "Café &amp; déjà vu", "ñandú 六", "THREE  sevens\n"]
    assert torch.equal(Tokenizer(16)(texts), open_clip.tokenize(texts, context_length=16))


def test_loss_does_not_push_apart_captions_of_the_same_class():
    """Two images and two identical captions per class, classes well separated: nothing should move.

    One-hot targets (plain CLIP) still pull each copy of a caption towards "its" image and away from the
    other image of the same class, a gradient that can never vanish; multi-positive targets are at rest.
    """
    groups = torch.tensor([0, 0, 1, 1])
    base = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    images = torch.nn.functional.normalize(base + torch.tensor([[0, 0, 0.1], [0, 0, -0.1], [0, 0, 0.1], [0, 0, -0.1]]), dim=-1)

    def grad(targets):
        text = base.clone().requires_grad_(True)
        contrastive_loss(images, text, torch.tensor(20.0), targets).backward()
        return text.grad.norm().item()

    assert grad(groups) < 1e-6
    assert grad(torch.arange(4)) > 1e-2
    # At rest the loss is the targets' entropy: log 2 for two positives each.
    torch.testing.assert_close(contrastive_loss(base, base, torch.tensor(100.0), groups), torch.tensor(math.log(2)),
                               atol=1e-4, rtol=0)


def test_loss_equals_clip_loss_when_every_caption_is_distinct():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    logits = 2.0 * img @ txt.T
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(5)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(2.0), torch.arange(5)), ref)


def test_twin_direction_loss_asks_each_change_to_match_its_captions_change_whatever_its_size():
    """A scene and its twin 0.01 apart weigh as much as 1 apart: the loss sees each change's direction only, and it is
    low where each image change points the way of its own caption's change, high where the changes are shuffled."""
    g = torch.Generator().manual_seed(0)
    image, text, change = torch.randn(3, 8, 16, generator=g)
    scale = torch.tensor(10.0)
    for size in (0.01, 1.0):
        matched = twin_direction_loss(image, image - size * change, text, text - size * change, scale)
        shuffled = twin_direction_loss(image, image - size * change, text, text - size * change.roll(1, 0), scale)
        assert matched < 0.1 < math.log(8) < shuffled
    twin = image.clone().requires_grad_()
    twin_direction_loss(image, twin, text, text - 0.01 * change, scale).backward()
    assert twin.grad.abs().sum() > 0


def test_twin_losses_need_the_twins_they_compare(mnist_dir):
    import pytest

    from unclip.errors import UserError

    base = {**TINY["clip"], "train": {**TINY["clip"]["train"], "data_dir": str(mnist_dir)}}
    for asked, said in (({"hard_negatives": True}, "hard_negatives needs captions that can be perturbed (--data scenes)"),
                        ({"twin_direction": 1.0}, "twin_direction compares each scene with its drawn twin")):
        with pytest.raises(UserError, match=re.escape(said)):
            clip_stage(merge(ClipConfig(), {**base, **asked}))


def test_text_encoder_ignores_padding_after_the_end_token():
    model = CLIP(merge(ClipConfig(), TINY["clip"]).model).eval()
    tokens = Tokenizer(12)(["a six"])
    noisy = tokens.clone()
    noisy[0, 5:] = 123  # garbage after the end token
    noisy[0, 3] = 49407
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens)[0], model.encode_text(noisy)[0])


@pytest.mark.slow
def test_tiny_clip_learns_glyphs(mnist_dir, tmp_path):
    cfg = merge(ClipConfig(), {**TINY["clip"], "train": {**TINY["clip"]["train"], "data_dir": str(mnist_dir)}})
    last = fit(clip_stage(cfg), cfg.train, tmp_path)
    assert last["val_zero_shot"] >= 0.9, last


def test_precise_batchnorm_recomputes_the_statistics_of_the_current_weights():
    from t2i.stages.clip import precise_batchnorm

    model = CLIP(merge(ClipConfig(), TINY["clip"]).model).eval()
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    stem_conv, stem_norm = model.visual.stem[0], model.visual.stem[1]
    stem_norm.running_mean.fill_(5.0)  # stale
    precise_batchnorm(model, lambda: iter([x[:16], x[16:]]))
    with torch.no_grad():
        h = stem_conv(x)
    torch.testing.assert_close(stem_norm.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)  # both batches, equally
    assert stem_norm.momentum == 0.1 and not model.training  # left as it was found


def test_image_layers_start_as_the_identity():
    """CLIP's image_layers added to a trained tower (--init) change nothing until trained, then they do."""
    cfg = merge(ClipConfig(), TINY["clip"]).model
    plain = CLIP(cfg).eval()
    cfg.image_layers = 1
    layered = CLIP(cfg).eval()
    missing, unexpected = layered.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[1] for k in missing} == {"layers", "layer_pos"}
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(layered.encode_image(x), plain.encode_image(x))
        for p in [*layered.visual.layers.parameters(), layered.visual.layer_pos]:  # as if trained
            p.add_(torch.randn_like(p) * 0.1)
        assert (layered.encode_image(x) - plain.encode_image(x)).abs().max() > 1e-3
