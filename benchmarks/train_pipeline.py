"""Train a whole pipeline from scratch with one config and time every stage (wall clock, process start
to exit), then judge it with benchmarks/generation.py.

    python benchmarks/train_pipeline.py --config configs/mnist-fast.yaml --data-dir ../shared/data/mnist
    python benchmarks/train_pipeline.py --config configs/mnist-gpu.yaml --data-dir DIR --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-fast.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "fast")
    ap.add_argument("--per-prompt", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default=None, help="cpu or cuda: where to train and to judge (default: the config's)")
    args = ap.parse_args()
    t2i = str(Path(sys.executable).parent / "t2i")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    device = ["--device", args.device] if args.device else []
    seconds = {
        "clip": timed([t2i, "clip-train", "--config", str(args.config), *data, *device, "--out", str(args.run / "clip")]),
        "prior+decoder": timed([t2i, "decoder-train", "--clip", str(args.run / "clip"), "--config", str(args.config),
                                *device, "--out", str(args.run)]),
    }
    total = sum(seconds.values())
    print(f"trained in {total / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    judged = args.out / args.run.name
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--checkpoints", str(args.run), *data,
                    "--per-prompt", str(args.per_prompt), "--no-sweep", "--no-timing", *device, "--out", str(judged)], check=True)
    accuracy = json.loads((judged / "generation.json").read_text())["default"]["accuracy"]
    summary = {"config": str(args.config), "device": args.device, "train_seconds": seconds, "total_minutes": total / 60, "accuracy": accuracy}
    (judged / "train.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
