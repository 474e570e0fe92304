"""The layout stage: caption -> objects and boxes, and the decoder reading the layout's map."""
import pytest
import torch

from unclip.config import DecoderModelConfig, LayoutModelConfig
from unclip.data.scene_captions import SceneCaptions, mention_order
from unclip.data.scenes import Obj, Scene
from unclip.errors import ConfigError
from unclip.layouts import GRID, layout_map, no_layout
from unclip.models.layout import LayoutModel
from unclip.models.unet import UNet

FIELDS = [10, 7]


def test_scene_layouts_hold_each_objects_digit_colour_and_box():
    scene = Scene((Obj(3, "blue", 20, 4, 10), Obj(7, "white", 30, 34, 30)), "row")
    layouts = SceneCaptions([scene]).layouts(torch.tensor([0]))
    assert layouts.tolist() == [[[3, 2, 2, 5, 12, 15], [7, 6, 17, 15, 32, 30], [-1] * 6, [-1] * 6]]
    named = SceneCaptions([scene] * 3).layouts(torch.tensor([0, 0, 0]), ["a white 7 right of a blue three",
                                                                         "a 3 in blue and a seven", "two digits"])
    assert named[0].tolist() == layouts[0, [1, 0, 2, 3]].tolist()  # in the order the caption names them
    assert torch.equal(named[1], layouts[0]) and torch.equal(named[2], layouts[0])  # unnamed: the scene's order


def test_the_layout_stage_learns_an_unnamed_digit_or_colour_as_any():
    """What the layout stage is taught to write: a digit or a colour its caption leaves unnamed is drawn uniformly (so
    neither says which the other is, as the training scenes, short of the held-out pairs, would teach), a named one
    kept."""
    scene = Scene((Obj(3, "green", 20, 4, 10), Obj(7, "green", 30, 34, 30)), "row")
    captions = SceneCaptions([scene] * 200)
    true = captions.layouts(torch.zeros(200, dtype=torch.long))
    kept = captions.layouts(torch.zeros(200, dtype=torch.long), ["a green 3 and a 7 in green"] * 200, torch.Generator())
    assert torch.equal(kept, true)
    some = captions.layouts(torch.zeros(200, dtype=torch.long), ["a 7 and a green digit"] * 200, torch.Generator())
    assert (some[:, 0, 0] == 7).all() and torch.equal(some[:, :, 1:], true[:, [1, 0, 2, 3], 1:])
    assert set(some[:, 1, 0].tolist()) == set(range(10))  # the unnamed 3: every digit, its colour and box kept
    none = captions.layouts(torch.zeros(200, dtype=torch.long), ["two green digits"] * 200, torch.Generator())
    assert set(none[:, :2, 0].flatten().tolist()) == set(range(10)) and (none[:, 2:] == -1).all()
    plain = captions.layouts(torch.zeros(200, dtype=torch.long), ["a 3 and a 7"] * 200, torch.Generator())
    assert torch.equal(plain[:, :, [0, 2, 3, 4, 5]], true[:, :, [0, 2, 3, 4, 5]])
    assert set(plain[:, :2, 1].flatten().tolist()) == set(range(7))  # every colour, digits and boxes kept


def test_objects_are_ordered_by_the_words_that_name_them_in_turn():
    scene = Scene((Obj(7, "red", 20, 4, 10), Obj(3, "red", 20, 34, 10), Obj(7, "blue", 20, 4, 40)), "list")
    assert mention_order(scene, "a red 3 and a red 7 and a blue 7") == [1, 0, 2]  # 'red' names both reds first
    assert mention_order(scene, "a 7 in blue, a seven in red and a 3") == [2, 0, 1]  # '7' both sevens, 'blue' one
    assert mention_order(scene, "two sevens and a three") == [0, 2, 1]  # a count names its digit's objects together


def test_a_layouts_map_paints_each_objects_labels_over_its_box():
    layouts = torch.tensor([[[3, 2, 2, 5, 12, 15], [7, 6, 16, 16, 32, 32]], [[1, 0, 0, 0, 8, 8], [-1] * 6]])
    m = layout_map(layouts, FIELDS, 32)
    assert m.shape == (2, 18, 32, 32) and (m[:, 0] == 1).all()  # a layout is given, everywhere
    assert m[0, 1 + 3, 5:15, 2:12].eq(1).all() and m[0, 1 + 3].sum() == 100  # digit 3 over its box only
    assert m[0, 11 + 2].sum() == 100 and m[0, 1 + 7].sum() == 256 and m[0, 11 + 6, 16:, 16:].eq(1).all()
    assert m[1, 1 + 1].sum() == 64 and m[1, 11 + 0].sum() == 64 and m[1, 1:].sum() == 128  # the absent slot paints nothing
    half = layout_map(layouts, FIELDS, 16)  # the same boxes at another size
    assert half[0, 1 + 3].sum() == 25 and no_layout(2, FIELDS, 16, torch.device("cpu")).abs().sum() == 0


def test_the_layout_model_learns_layouts_for_captions_and_draws_them():
    """A tiny model told two captions apart (their token features) learns each one's layout, and draws it back
    token by token: a whole object at a time, boxes in order, nothing past the end."""
    torch.manual_seed(0)
    model = LayoutModel(LayoutModelConfig(width=32, layers=1, heads=2, fields=FIELDS), text_width=8)
    layouts = torch.tensor([[[3, 2, 2, 5, 12, 15], [7, 6, 16, 16, 32, 32], [-1] * 6, [-1] * 6],
                            [[1, 0, 0, 0, 8, 8], [-1] * 6, [-1] * 6, [-1] * 6]])
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    assert model.sequence(layouts)[1].tolist()[:8] == [1, 10 + 0, 17, 17, 25, 25, model.stop, -100]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(layouts, text, mask).item()
    assert first == pytest.approx(model.token_nll(layouts, text, mask)[model.sequence(layouts) != -100].mean().item())
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(layouts, text, mask)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    drawn = model.sample(text, mask, torch.Generator().manual_seed(0), temperature=0)
    assert torch.equal(drawn, layouts)
    wild = model.sample(torch.randn(16, 3, 8), torch.ones(16, 3, dtype=torch.bool), torch.Generator().manual_seed(1),
                        temperature=3.0)  # anything it may write is still a layout
    present = wild[..., 0] >= 0
    assert present[:, 0].all() and (present[:, :-1] >= present[:, 1:]).all()  # objects first, at least one
    real = wild[present]
    assert (real[:, 0] < 10).all() and (real[:, 1] < 7).all() and (real[:, 2:] <= GRID).all() and (real >= 0).all()
    assert (real[:, 2:4] <= real[:, 4:6]).all() and (wild[~present] == -1).all()


def test_the_boxes_have_a_temperature_of_their_own():
    torch.manual_seed(0)
    model = LayoutModel(LayoutModelConfig(width=32, layers=1, heads=2, fields=FIELDS), text_width=8).eval()
    text, mask = torch.randn(1, 3, 8).expand(256, 3, 8), torch.ones(256, 3, dtype=torch.bool)
    free_boxes = model.sample(text, mask, torch.Generator().manual_seed(0), temperature=0, box_temperature=5.0)
    assert (free_boxes[:, 0, :2] == free_boxes[0, 0, :2]).all()  # the first object's labels: the likeliest, always
    assert len({tuple(b) for b in free_boxes[:, 0, 2:].tolist()}) > 100
    free_labels = model.sample(text, mask, torch.Generator().manual_seed(0), temperature=5.0, box_temperature=0)
    labels = [tuple(row) for row in free_labels[:, 0, :2].tolist()]
    assert len(set(labels)) > 20
    boxes = {}  # the same labels, the same (likeliest) first box
    assert all(boxes.setdefault(k, tuple(b)) == tuple(b) for k, b in zip(labels, free_labels[:, 0, 2:].tolist()))


def test_an_objects_colour_is_drawn_without_seeing_its_digit_and_its_box_with_both():
    """Fields drawn apart: changing an object's digit leaves what the model says of its colour alone, and changes what
    it says of the box and of the next object."""
    torch.manual_seed(0)
    model = LayoutModel(LayoutModelConfig(width=32, layers=2, heads=2, fields=FIELDS), text_width=8).eval()
    with torch.no_grad():
        model.unseen.normal_()  # as if trained
    text, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    first = model.sequence(torch.tensor([[[3, 2, 2, 5, 12, 15], [7, 6, 16, 16, 32, 32]]]))[:, :-1]
    other = first.clone()
    other[0, 6] = 1  # the second object's digit: 7 -> 1
    a, b = model(first, text, mask), model(other, text, mask)
    assert torch.equal(a[0, :8], b[0, :8])  # up to and including the second object's colour
    assert not torch.allclose(a[0, 8], b[0, 8]) and not torch.allclose(a[0, 12], b[0, 12])  # its box, the next object


def test_a_layout_decoder_starts_as_the_decoder_without_and_reads_the_map():
    cfg = dict(image_channels=3, image_size=16, widths=[8, 16], heads=2, context_tokens=2, timesteps=50, text_tokens=True)
    torch.manual_seed(0)
    plain = UNet(DecoderModelConfig(**cfg), 32, text_width=8)
    torch.manual_seed(0)
    read = UNet(DecoderModelConfig(**cfg, layout=True, layout_fields=FIELDS), 32, text_width=8)
    new = set(read.state_dict()) - set(plain.state_dict())  # the layout's encoder, and each block's modulation by it
    assert {k.split(".")[0] for k in new} == {"layout_in", "down", "mid1", "mid2", "up"}
    assert all(k.startswith("layout_in.") or ".layout." in k for k in new) and len(new) == 4 + 2 * (2 * 2 + 2 + 2 * 3)
    with torch.no_grad():  # as if trained: no layer left at its zero start
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    read.load_state_dict(plain.state_dict(), strict=False)  # what --init from a decoder without it does
    x, t, emb = torch.randn(2, 3, 16, 16), torch.tensor([10, 40]), torch.randn(2, 32)
    tokens, mask, keep = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    layouts = layout_map(torch.tensor([[[3, 2, 2, 5, 12, 15]], [[1, 0, 0, 0, 8, 8]]]), FIELDS, 16)
    with torch.no_grad():
        base = plain(x, t, emb, tokens, mask, drop=keep)
        assert torch.allclose(read(x, t, emb, tokens, mask, None, layouts, drop=keep), base)
        torch.nn.init.normal_(read.mid1.layout.weight)
        assert not torch.allclose(read(x, t, emb, tokens, mask, None, layouts, drop=keep), base)
        blank = read(x, t, emb, tokens, mask, None, torch.zeros_like(layouts), drop=keep)
        dropped = read(x, t, emb, tokens, mask, None, layouts, drop=~keep)  # every condition dropped: the layout too
        assert torch.allclose(dropped, read(x, t, emb, tokens, mask, None, torch.zeros_like(layouts), drop=~keep))
        assert not torch.allclose(blank, read(x, t, emb, tokens, mask, None, layouts, drop=keep))
    with pytest.raises(ConfigError, match="layout needs text_tokens"):
        UNet(DecoderModelConfig(**{**cfg, "text_tokens": False}, layout=True, layout_fields=FIELDS), 32, text_width=8)


@pytest.mark.slow
def test_a_layout_stage_trained_on_scenes_draws_the_named_digits(mnist_dir, tmp_path):
    """The stage end to end from the CLI: trained on scenes' captions and layouts (no pixels), saved beside CLIP,
    and its validation's sampled layouts scored against the true ones (`val_digits`)."""
    from typer.testing import CliRunner

    from t2i.cli import app
    from t2i.stages.layout import digits_agree
    from t2i.stages.runs import read_metrics
    from unclip.components.clip import load_clip
    from unclip.components import STAGES
    from tests.conftest import TINY

    import yaml
    config = {"clip": {**TINY["clip"], "model": {**TINY["clip"]["model"], "image_channels": 3, "image_size": 32},
                       "train": {**TINY["clip"]["train"], "data": "scenes", "epochs": 1}},
              "layout": {"model": {"width": 32, "layers": 1, "heads": 2},
                         "train": {"max_steps": 60, "batch_size": 64, "lr": 3e-3, "val_size": 100, "warmup_steps": 5}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    assert run("clip-train", "--config", tmp_path / "c.yaml", "--data-dir", mnist_dir, "--out", tmp_path / "p" / "clip").exit_code == 0
    r = run("layout-train", "--pipeline", tmp_path / "p", "--config", tmp_path / "c.yaml", "--data-dir", mnist_dir)
    assert r.exit_code == 0, r.output
    validations = read_metrics(tmp_path / "p" / "layout")[1]
    assert validations and 0 <= validations[-1]["val_digits"] <= 1
    _, clip_cfg = load_clip(tmp_path / "p" / "clip", "cpu")
    model, cfg = STAGES["layout"].load(tmp_path / "p" / "layout", clip_cfg, torch.device("cpu"))
    assert cfg.model.fields == FIELDS and cfg.model.field_names == ["digit", "colour"] and cfg.model.max_objects == 4
    assert digits_agree(torch.tensor([[[3, 0], [7, 1], [-1, -1]]]), torch.tensor([[[7, 5], [-1, -1], [3, 2]]])).all()
    assert not digits_agree(torch.tensor([[[3, 0], [3, 1], [-1, -1]]]), torch.tensor([[[7, 5], [-1, -1], [3, 2]]])).any()
    r = run("layout-train", "--pipeline", tmp_path / "p", "--data", "mnist", "--data-dir", mnist_dir, "--overwrite")
    assert r.exit_code != 0 and "needs data whose scenes say" in r.output and "Traceback" not in r.output


def test_a_layout_decoder_needs_data_that_says_where_each_object_is(tiny_pipeline, tmp_path):
    """MNIST's captions name no boxes: a decoder configured to read layouts is a one-line error, not a traceback."""
    import yaml
    from typer.testing import CliRunner

    from t2i.cli import app
    from tests.conftest import TINY

    config = {"decoder": {**TINY["decoder"], "model": {**TINY["decoder"]["model"], "text_tokens": True, "layout": True}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = CliRunner().invoke(app, ["decoder-train", "--clip", str(tiny_pipeline / "clip"), "--config", str(tmp_path / "c.yaml"),
                                 "--stage", "decoder", "--out", str(tmp_path / "pipe")])
    assert r.exit_code != 0 and "decoder layout needs data whose scenes say" in r.output and "Traceback" not in r.output
