"""Negative prompts and image-to-image, measured with the shipped weights and judged by benchmarks/judge.py.

- Image-to-image (SDEdit, `t2i generate --init-image --strength`): real MNIST test threes redrawn with the
  prompt "eight" at strengths 0.2 to 1.0: how often the result is judged an 8 (and still a 3), and how far
  it moved from the source (mean absolute pixel difference, 0 to 1).
- Negative prompts (`--negative-prompt`): on the scenes pipeline, "a seven" with and without the negative
  prompt "red": the share of images showing a red object, and a red seven, read by benchmarks/scene_eval.py;
  the colour mix is reported too, to show what the images moved to.

    python benchmarks/editing.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.judge import load_judge, predict  # noqa: E402
from benchmarks.scene_eval import read_scenes  # noqa: E402
from unclip.api import UnCLIPPipeline  # noqa: E402
from unclip.data import load_dataset  # noqa: E402
from unclip.images import grid, save_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COLOURS = ("red", "cyan")  # red 7 is a held-out pair (never trained on); cyan is the colour drawn most for a seven


def image_to_image(pipe: UnCLIPPipeline, judge, sources: torch.Tensor, prompt: str, target: int, source_digit: int) -> tuple:
    """Rows of the table (one per strength) and a strip: per source, the source then one result per strength."""
    rows, columns = [], []
    for strength in STRENGTHS:
        out = []
        for i, image in enumerate(sources):  # each source is its own init image; one seed per source
            out.append(pipe(prompt, image=image, strength=strength, generator=pipe.generator(seed=i),
                            output_type="uint8").images)
        out = torch.cat(out)
        digits = predict(judge, out)
        moved = (out.float() - sources.float()).abs().mean().item() / 255
        rows.append({"strength": strength, "judged_target": (digits == target).float().mean().item(),
                     "judged_source": (digits == source_digit).float().mean().item(), "pixel_change": moved})
        columns.append(out[:8])
        print(f"  strength {strength}: {rows[-1]}", flush=True)
    strip = torch.stack([sources[:8]] + columns, 1).flatten(0, 1)  # (8 x (1 + strengths), C, H, W)
    return rows, strip


def negative_prompt(pipe: UnCLIPPipeline, judge, prompt: str, colours: tuple, digit: int, n: int) -> list[dict]:
    """The scenes drawn for `prompt` with no negative prompt and with each colour of `colours` as one: per
    setting, the share of images with an object of each colour, and with a `digit` of each colour."""
    rows = []
    for neg in (None, *colours):
        images = pipe(prompt, negative_prompt=neg, num_images_per_prompt=n, generator=pipe.generator(seed=0),
                      output_type="uint8").images
        scenes = read_scenes(judge, images)
        mix = Counter(c for objects in scenes for _, c, _ in objects)
        total = sum(mix.values()) or 1
        row = {"negative_prompt": neg, "images": n, "with_digit": sum(any(d == digit for d, _, _ in s) for s in scenes) / n,
               "colour_mix": {c: round(k / total, 3) for c, k in mix.most_common()}}
        for c in colours:
            row[f"with_{c}"] = sum(any(col == c for _, col, _ in s) for s in scenes) / n
            row[f"with_{c}_digit"] = sum(any(col == c and d == digit for d, col, _ in s) for s in scenes) / n
        rows.append(row)
        print(f"  negative {neg!r}: {row}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sources", type=int, default=100, help="real test threes to redraw")
    ap.add_argument("--scenes", type=int, default=256, help="images per setting for the negative prompt")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "editing")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    judge = load_judge(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)

    mnist = UnCLIPPipeline.from_pretrained("mnist", "cpu")
    test = load_dataset("mnist", "test", args.data_dir)
    threes = test.images[test.labels == 3][: args.sources]
    print("image-to-image: threes -> 'eight'", flush=True)
    i2i, strip = image_to_image(mnist, judge, threes, "eight", 8, 3)
    save_png(grid(strip, ncol=1 + len(STRENGTHS)), args.out / "img2img.png", scale=2)

    print("negative prompt: scenes 'a seven' minus a colour", flush=True)
    scenes = UnCLIPPipeline.from_pretrained("scenes", "cpu")
    neg = negative_prompt(scenes, judge, "a seven", COLOURS, 7, args.scenes)
    mnist_neg, _ = negative_prompt_mnist(mnist, judge, args.scenes)

    report = {"image_to_image": i2i, "negative_scenes": neg, "negative_mnist": mnist_neg, "sources": len(threes)}
    (args.out / "editing.json").write_text(json.dumps(report, indent=2))
    lines = [f"Image-to-image: {len(threes)} real test threes, prompt \"eight\", default settings, one seed per source.", "",
             "| strength | judged 8 | still judged 3 | pixel change (0-1) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['strength']:.1f} | {r['judged_target']:.2f} | {r['judged_source']:.2f} | {r['pixel_change']:.3f} |" for r in i2i]
    lines += ["", f"Negative prompt on scenes: \"a seven\", {args.scenes} images each, seed 0.", "",
              "| negative prompt | " + " | ".join(f"with a {c} object | with a {c} 7" for c in COLOURS)
              + " | with a 7 | colour mix of all objects |", "| --- " * (3 + 2 * len(COLOURS)) + "|"]
    lines += [f"| {r['negative_prompt'] or '(none)'} | " + " | ".join(f"{r[f'with_{c}']:.3f} | {r[f'with_{c}_digit']:.3f}" for c in COLOURS)
              + f" | {r['with_digit']:.3f} | {', '.join(f'{c} {v:.2f}' for c, v in r['colour_mix'].items())} |" for r in neg]
    lines += ["", f"Negative prompt on MNIST: the ambiguous prompt \"four or nine\", {args.scenes} images each, seed 0.", "",
              "| prior guidance | negative prompt | judged 4 | judged 9 | other |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['prior_guidance']} | {r['negative_prompt'] or '(none)'} | {r['four']:.3f} | {r['nine']:.3f} | "
              f"{r['other']:.3f} |" for r in mnist_neg]
    (args.out / "editing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def negative_prompt_mnist(pipe: UnCLIPPipeline, judge, n: int) -> tuple:
    """MNIST's comparable case: an ambiguous prompt, "four or nine", with the negative prompt "nine" and "four", at
    the pipeline's prior guidance and, where that is 1 (a distilled prior's, its guidance learnt: no unconditional
    branch for a negative prompt to take), at 1.5 on top."""
    rows = []
    default = pipe.pipeline.defaults.prior_guidance
    for scale in [default] + ([1.5] if default == 1 else []):
        for neg in (None, "nine", "four"):
            images = pipe("four or nine", negative_prompt=neg, num_images_per_prompt=n, prior_guidance_scale=scale,
                          generator=pipe.generator(seed=0), output_type="uint8").images
            d = predict(judge, images)
            rows.append({"prior_guidance": scale, "negative_prompt": neg, "four": (d == 4).float().mean().item(),
                         "nine": (d == 9).float().mean().item(), "other": ((d != 4) & (d != 9)).float().mean().item()})
            print(f"  mnist negative {neg!r}: {rows[-1]}", flush=True)
    return rows, images


if __name__ == "__main__":
    main()
