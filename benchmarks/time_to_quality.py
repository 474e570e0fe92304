"""Time to quality of the fast recipe's prior, old against new, with everything else held fixed.

    python benchmarks/train_pipeline.py --config configs/mnist-fast.yaml --data-dir DIR   # runs/fast
    python benchmarks/time_to_quality.py --pipeline runs/fast --data-dir DIR

`configs/mnist-fast.yaml` before and after the whitened prior differ only in the prior, so the pipeline's
CLIP and decoder (trained once by train_pipeline.py, their wall minutes read from its train.json) are kept and
the prior alone is trained again for each point: the old recipe's (x0-prediction, not whitened) and the new
one's, for `--epochs` epochs each, timed from process start. Each pipeline is judged like the shipped one
(benchmarks/generation.py, 100 samples a prompt, default settings). A point's wall minutes are CLIP + decoder
(fixed) + that prior's. Writes OUT/time_to_quality.json, .md and .png (accuracy and Frechet / floor against
wall minutes, both recipes on one plot).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i.stages.runs import read_metrics  # noqa: E402
RECIPES = {"old (x0, not whitened)": {"prediction": "x0", "whiten": False},
           "new (v, whitened)": {"prediction": "v", "whiten": True}}


def prior_minutes(pipeline: Path) -> float:
    """The prior's share of train_pipeline.py's prior+decoder process: its own training time from metrics.jsonl."""
    steps, validations = read_metrics(pipeline / "prior")
    return max(r["time"] for r in steps + validations) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=ROOT / "runs" / "fast")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-fast.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--per-prompt", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "time-to-quality")
    args = ap.parse_args()
    t2i = str(Path(sys.executable).parent / "t2i")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    if not (args.pipeline / "train.json").is_file():
        sys.exit(f"{args.pipeline}/train.json is missing: train the pipeline with benchmarks/train_pipeline.py "
                 f"--run {args.pipeline} --out {args.pipeline.parent} first")
    trained = json.loads((args.pipeline / "train.json").read_text())["train_seconds"]
    fixed = trained["clip"] / 60 + trained["prior+decoder"] / 60 - prior_minutes(args.pipeline)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, model in RECIPES.items():
            cfg = yaml.safe_load(args.config.read_text())
            cfg["prior"]["model"].update(model)
            config = tmp / "config.yaml"
            config.write_text(yaml.safe_dump(cfg))
            for epochs in args.epochs:
                run = tmp / f"{model['prediction']}-{epochs}"
                shutil.copytree(args.pipeline / "decoder", run / "decoder")
                start = time.perf_counter()
                subprocess.run([t2i, "decoder-train", "--clip", str(args.pipeline / "clip"), "--config", str(config),
                                *data, "--stage", "prior", "--epochs", str(epochs), "--out", str(run)],
                               check=True, stdout=subprocess.DEVNULL)
                minutes = (time.perf_counter() - start) / 60
                judged = run / "judged"
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--checkpoints", str(run),
                                *data, "--per-prompt", str(args.per_prompt), "--no-sweep", "--no-timing",
                                "--out", str(judged)], check=True, stdout=subprocess.DEVNULL)
                report = json.loads((judged / "generation.json").read_text())
                d = report["default"]
                rows.append({"recipe": name, "prior_epochs": epochs, "prior_minutes": minutes,
                             "wall_minutes": fixed + minutes, "accuracy": d["accuracy"],
                             "frechet_ratio": d["frechet"] / d["frechet_floor"], "diversity": d["diversity_ratio"],
                             "spread": report["prior"]["spread_ratio"]})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"pipeline": str(args.pipeline), "fixed_minutes": fixed, "rows": rows}
    (args.out / "time_to_quality.json").write_text(json.dumps(summary, indent=2))
    lines = [f"CLIP and decoder of `{args.pipeline}`: {fixed:.1f} min (fixed); the prior trained again for each row.", "",
             "| recipe | prior epochs | prior min | wall min | accuracy | Frechet / floor | diversity | prior spread |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['recipe']} | {r['prior_epochs']} | {r['prior_minutes']:.1f} | {r['wall_minutes']:.1f} | "
              f"{r['accuracy']:.4f} | {r['frechet_ratio']:.2f} | {r['diversity']:.3f} | {r['spread']:.3f} |" for r in rows]
    (args.out / "time_to_quality.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "time_to_quality.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in RECIPES:
        mine = [r for r in rows if r["recipe"] == name]
        x = [r["wall_minutes"] for r in mine]
        left.plot(x, [r["accuracy"] for r in mine], "o-", label=name)
        right.plot(x, [r["frechet_ratio"] for r in mine], "o-", label=name)
    left.axhline(0.99, color="gray", ls=":", label="target")
    right.axhline(2.0, color="gray", ls=":", label="target")
    for ax, label in ((left, "judged accuracy"), (right, "Frechet / real-vs-real floor")):
        ax.axvline(15, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("wall minutes from scratch (2-core CPU)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    fig.suptitle("configs/mnist-fast.yaml: time to quality, old prior against new")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
