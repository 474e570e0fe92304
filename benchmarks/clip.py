"""Stage one targets: zero-shot MNIST accuracy with the default prompt and with unseen templates,
and the wall time of training CLIP from scratch.

    python benchmarks/clip.py --data-dir ../shared/data/mnist                       # train, then evaluate
    python benchmarks/clip.py --data-dir ../shared/data/mnist --clip checkpoints/mnist/clip   # evaluate only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unclip.data.captions import MNIST_TEMPLATES  # noqa: E402
from unclip.components.clip import load_clip  # noqa: E402
from unclip.zeroshot import evaluate_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Prompts never used in training (checked below): how well the text encoder generalises.
UNSEEN_TEMPLATES = ["a photo of a {}", "this is a {}", "an illustration of the number {}", "{} written by hand"]
assert not set(UNSEEN_TEMPLATES) & set(MNIST_TEMPLATES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist.yaml")
    ap.add_argument("--clip", type=Path, default=None, help="evaluate this checkpoint instead of training one")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-clip")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    report: dict = {}
    clip_dir = args.clip
    if clip_dir is None:
        clip_dir = args.run
        cmd = [str(Path(sys.executable).parent / "t2i"), "clip-train", "--config", str(args.config), "--out", str(clip_dir)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        report["train_seconds"] = time.perf_counter() - start
        report["train_command"] = " ".join(cmd)
    model, cfg = load_clip(clip_dir, "cpu")
    report["default_template"] = cfg.template
    report["default"] = evaluate_clip(model, cfg, "mnist", args.data_dir, cfg.template)["accuracy"]
    report["unseen"] = {t: evaluate_clip(model, cfg, "mnist", args.data_dir, t)["accuracy"] for t in UNSEEN_TEMPLATES}
    lines = ["| prompt template | zero-shot test accuracy |", "| --- | --- |",
             f"| `{cfg.template}` (default) | {report['default']:.4f} |"]
    lines += [f"| `{t}` (never seen in training) | {a:.4f} |" for t, a in report["unseen"].items()]
    if "train_seconds" in report:
        lines += ["", f"CLIP training wall time from scratch: {report['train_seconds'] / 60:.1f} min (`{report['train_command']}`)"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clip.json").write_text(json.dumps(report, indent=2))
    (args.out / "clip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
