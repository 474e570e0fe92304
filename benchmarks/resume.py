"""Interrupt and resume on a device: does a run stopped by SIGTERM and continued with --resume end where an
uninterrupted run ends? (tests/stages/test_trainer.py checks this on the CPU; this script is for a GPU.)

    python benchmarks/resume.py --data-dir DIR --device cuda

Trains a small CLIP, then for CLIP and for the decoder (whose noise is drawn on the device, so its CUDA RNG
state must come back too): one run of `--steps` steps, a second like it, and a third stopped by SIGTERM once
`--stop-after` steps are logged and then resumed. Reports the largest per-step loss difference and weight
difference of the resumed run from the first, beside the same between the two uninterrupted runs (a GPU's
own nondeterminism: cuDNN picks kernels whose sums run in varying order). Writes OUT/resume.json.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i.stages.runs import read_metrics  # noqa: E402


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)[0]}


def interrupted(cmd: list[str], run: Path, stop_after: int) -> int:
    """Start `cmd`, SIGTERM it once `stop_after` steps are logged, then resume it; the step it stopped at."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= stop_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    stopped = torch.load(run / "train_state.pt", map_location="cpu", weights_only=True)["step"]
    subprocess.run([*cmd, "--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return stopped


def differences(a: Path, b: Path) -> dict:
    la, lb = losses(a), losses(b)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return {"steps": sorted(la) == sorted(lb) and len(la),
            "max_loss_difference": max(abs(la[s] - lb[s]) for s in la),
            "max_weight_difference": max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist-fast.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stop-after", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "resume")
    args = ap.parse_args()
    t2i = str(Path(sys.executable).parent / "t2i")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    common = ["--config", str(args.config), *data, "--device", args.device, "--max-steps", str(args.steps)]
    report = {"device": args.device, "torch": torch.__version__, "steps": args.steps,
              "machine": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([t2i, "clip-train", *common, "--out", str(tmp / "clip")], check=True, stdout=subprocess.DEVNULL)
        stages = {"clip": (lambda out: [t2i, "clip-train", *common, "--out", str(out)], lambda out: out),
                  "decoder": (lambda out: [t2i, "decoder-train", "--clip", str(tmp / "clip"), "--stage", "decoder",
                                           *common, "--out", str(out)], lambda out: out / "decoder")}
        for stage, (cmd, folder) in stages.items():
            for name in ("a", "b"):
                subprocess.run(cmd(tmp / stage / name), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stopped = interrupted(cmd(tmp / stage / "cut"), folder(tmp / stage / "cut"), args.stop_after)
            report[stage] = {"stopped_at": stopped,
                             "resumed": differences(folder(tmp / stage / "a"), folder(tmp / stage / "cut")),
                             "uninterrupted_twice": differences(folder(tmp / stage / "a"), folder(tmp / stage / "b"))}
            print(json.dumps({stage: report[stage]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resume.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
