"""Issue 43's stage-one measure: zero-shot retrieval of an emoji's name among all names, per style.

    python benchmarks/emoji_clip.py --data-dir ../shared/data/emoji --steps 300   # train configs/emoji.yaml's CLIP, then score
    python benchmarks/emoji_clip.py --data-dir ../shared/data/emoji --clip DIR    # score a trained CLIP

For every image of the validation split (things and styles training saw, other images) and of the test split (the
held-out style pairs and skin tones), the English CLDR name of its thing (skin tone left out) is ranked among the
names of every thing in the data; top-1 and top-5 per style, and with its style named ("NAME, twemoji style").
Writes OUT/emoji_clip.json and OUT/emoji_clip.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unclip.components.clip import encode_images, encode_texts, load_clip  # noqa: E402
from unclip.data import load_dataset  # noqa: E402
from unclip.data.emoji import STYLES  # noqa: E402
from unclip.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def base_name(e) -> str:
    """A thing's English name without its skin tone ("waving hand: dark skin tone" -> "waving hand")."""
    name = e.names["en"]
    return name.split(":")[0] if e.tone else name


def score(clip, cfg, data, names: list[str], index: dict[str, int], styled: bool) -> dict:
    tokenizer = Tokenizer(cfg.model.text_context)
    emoji = [data.captioner.emoji[i] for i in data.labels.tolist()]
    images = encode_images(clip, data.images)
    out = {}
    for style in STYLES:
        rows = [i for i, e in enumerate(emoji) if e.style == style]
        if not rows:
            continue
        prompts = [f"{n}, {style} style" if styled else n for n in names]
        texts = torch.cat([encode_texts(clip, tokenizer, prompts[i:i + 512])[0] for i in range(0, len(prompts), 512)])
        sims = images[rows] @ texts.T  # (N, things)
        truth = torch.tensor([index[emoji[i].identity] for i in rows], device=sims.device)
        rank = (sims > sims.gather(1, truth[:, None])).sum(1)
        out[style] = {"images": len(rows), "top1": round((rank == 0).float().mean().item(), 4),
                      "top5": round((rank < 5).float().mean().item(), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="the emoji folder (../shared/data/emoji)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "emoji.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--clip", type=Path, default=None, help="score this CLIP instead of training one")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-emoji-clip")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "emoji-clip")
    args = ap.parse_args()
    spec = f"emoji:{args.data_dir}"
    report: dict = {"data": str(args.data_dir)}
    clip_dir = args.clip
    if clip_dir is None:
        clip_dir = args.run
        cmd = [str(Path(sys.executable).parent / "t2i"), "clip-train", "--config", str(args.config), "--data", spec,
               "--max-steps", str(args.steps), "--out", str(clip_dir), "--overwrite"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        report["train"] = {"steps": args.steps, "minutes": round((time.perf_counter() - t) / 60, 2),
                           "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config)}
    clip, cfg = load_clip(clip_dir, "cpu")
    m = cfg.model
    val, test = (load_dataset(spec, s, channels=m.image_channels, size=m.image_size, val_size=cfg.train.val_size)
                 for s in ("val", "test"))
    every = {e.identity: base_name(e) for d in (val, test) for e in d.captioner.emoji}
    names = sorted(set(every.values()))
    position = {name: i for i, name in enumerate(names)}
    index = {identity: position[name] for identity, name in every.items()}
    report["things"] = len(names)
    for split, data in (("seen (val)", val), ("held out (test)", test)):
        report[split] = {"name": score(clip, cfg, data, names, index, False),
                         "name, style": score(clip, cfg, data, names, index, True)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "emoji_clip.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Emoji CLIP: the name among {len(names):,} names ({time.strftime('%Y-%m-%d')}, "
             f"`python benchmarks/emoji_clip.py`)", ""]
    if "train" in report:
        lines += [f"Trained {report['train']['steps']} steps of `{report['train']['config']}` in "
                  f"{report['train']['minutes']} min.", ""]
    lines += ["| split | prompt | style | images | top-1 | top-5 |", "| --- | --- | --- | --- | --- | --- |"]
    for split in ("seen (val)", "held out (test)"):
        for prompt, per in report[split].items():
            for style, r in per.items():
                lines.append(f"| {split} | {prompt} | {style} | {r['images']} | {r['top1']:.3f} | {r['top5']:.3f} |")
    (args.out / "emoji_clip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
