"""unCLIP's own abilities, judged by the independent classifier of benchmarks/judge.py:

- variations (`t2i vary`) of real test digits: how often a variation is judged the source's digit;
- text-to-text interpolation (`t2i interpolate --from A --to B`): is the first frame judged A's digit
  and the last B's, for every ordered pair of different digits.

    python benchmarks/abilities.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.judge import DIGITS, load_judge, predict  # noqa: E402
from unclip.data import load_dataset  # noqa: E402
from unclip.images import grid, save_png  # noqa: E402
from unclip.api import UnCLIPPipeline  # noqa: E402
from unclip.options import SamplingOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sources", type=int, default=100, help="real test digits to vary")
    ap.add_argument("--variations", type=int, default=8, help="variations of each")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    judge = load_judge(args.data_dir)
    pipe = UnCLIPPipeline.from_pretrained(args.checkpoints, "cpu")
    options = SamplingOptions()
    test = load_dataset("mnist", "test", args.data_dir)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.sources]

    same, rows = [], []
    for n, i in enumerate(idx.tolist()):
        images = pipe.variations(test.images[i], args.variations, generator=pipe.generator(seed=n), output_type="uint8").images
        same.append((predict(judge, images) == test.labels[i]).float().mean().item())
        if n < 8:
            rows.append(torch.cat([test.images[i][None], images]))
    save_png(grid(torch.cat(rows), ncol=args.variations + 1), args.out / "variations.png", scale=2)

    ends, strips = [], []
    for a in range(10):
        for b in range(10):
            if a == b:
                continue
            frames = pipe.interpolate(DIGITS[a], DIGITS[b], args.frames, generator=pipe.generator(seed=a * 10 + b),
                                      output_type="uint8").images
            pred = predict(judge, frames)
            ends.append((pred[0].item() == a, pred[-1].item() == b))
            if (a, b) in ((1, 7), (3, 8), (0, 6), (4, 9)):
                strips.append(frames)
    save_png(grid(torch.cat(strips), ncol=args.frames), args.out / "interpolations.png", scale=2)
    report = {
        "variation_same_digit": sum(same) / len(same),
        "interpolation_first_is_a": sum(e[0] for e in ends) / len(ends),
        "interpolation_last_is_b": sum(e[1] for e in ends) / len(ends),
        "interpolation_pairs": len(ends),
        "settings": vars(options),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abilities.json").write_text(json.dumps(report, indent=2))
    lines = ["| ability | judged correct |", "| --- | --- |",
             f"| variation keeps the source digit ({args.sources} test digits x {args.variations}) | {report['variation_same_digit']:.4f} |",
             f"| interpolation: first frame is A ({len(ends)} ordered digit pairs) | {report['interpolation_first_is_a']:.4f} |",
             f"| interpolation: last frame is B | {report['interpolation_last_is_b']:.4f} |"]
    (args.out / "abilities.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
