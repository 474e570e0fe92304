"""Reading training runs back: `t2i runs` (what is under a folder) and `t2i plot` (curves of runs side by side).

A run is a folder the training loop wrote: `metrics.jsonl` (a record a step, which holds "lr", and a record a
validation, which does not), `run.json` (how far it got, and the step it last saved) and `train_state.pt`
(what `--resume` continues from).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from t2i.stages.trainer import METRICS_FILE, STATE_FILE, direction, run_status
from unclip.checkpoint import atomic_write
from unclip.components import MAXIMIZE, STAGES
from unclip.errors import UserError


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """A run's training-step records and validation records, in order."""
    path = Path(run) / METRICS_FILE
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{run}: not a training run (no {METRICS_FILE})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON lines ({e})") from None
    return [r for r in records if "lr" in r], [r for r in records if "lr" not in r]


def find_runs(root: Path) -> list[Path]:
    """`root` itself when it is a run, else every run below it (a pipeline folder's stages, a folder of runs)."""
    root = Path(root)
    if (root / METRICS_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    return sorted(p.parent for p in root.rglob(METRICS_FILE))


@dataclass
class RunSummary:
    path: Path
    stage: str
    step: int
    total: Optional[int]  # None for runs written before run.json existed
    seconds: Optional[float]
    last_loss: Optional[float]
    objective: Optional[str]
    best: Optional[float]  # of the objective over the run's validations
    best_step: Optional[int]
    state: str  # finished | resumable from STEP | stopped (nothing to resume) | unknown (a run from before run.json)

    @property
    def direction(self) -> str:
        return direction(self.objective)


def objective_of(run: Path, val: list[dict]) -> Optional[str]:
    """The run's ranking metric: from run.json, or for older runs the first known one its validations hold."""
    status = run_status(run)
    if status.get("objective"):
        return status["objective"]
    keys = [k for r in val for k in r]
    return next((k for k in (*MAXIMIZE, "val_loss") if k in keys), None)


def summarize(run: Path) -> RunSummary:
    run = Path(run)
    train, val = read_metrics(run)
    status = run_status(run)
    objective = objective_of(run, val)
    scored = [r for r in val if objective in r]
    pick = max if direction(objective) == "maximize" else min
    best = pick(scored, key=lambda r: r[objective]) if scored else None
    if status.get("finished"):
        state = "finished"
    elif (run / STATE_FILE).is_file():
        state = f"resumable from {status['saved']:,}" if status.get("saved") is not None else "unknown"
    else:
        state = "stopped"  # before its first checkpoint (a pruned trial, say): nothing to resume
    return RunSummary(
        path=run, stage=status.get("stage") or (run.name if run.name in STAGES else "?"),
        step=status.get("step", train[-1]["step"] if train else 0), total=status.get("total"),
        seconds=status.get("time", train[-1].get("time") if train else None),
        last_loss=train[-1].get("loss") if train else None, objective=objective,
        best=best[objective] if best else None, best_step=best["step"] if best else None, state=state)


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight > 0 else v)
    return out


def run_labels(runs: list[Path]) -> list[str]:
    """Short names for a legend: the paths without the folders they all share."""
    parts = [Path(r).resolve().parts for r in runs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def plot_runs(paths: list[Path], metric: str = "loss", x: str = "step", out: Path = Path("plot.png"),
              weight: float = 0.9) -> Path:
    """One PNG: `metric` of every run's training steps (raw faint, smoothed solid) and, beside it, each run's
    validation metric; one colour per run. `x` is "step" or "time" (wall minutes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise UserError("t2i plot needs matplotlib: pip install -e '.[plot]'") from None
    if x not in ("step", "time"):
        raise UserError(f"--x {x!r}: use step or time")
    runs = [r for p in paths for r in find_runs(p)]
    if not runs:
        raise UserError(f"no training runs (folders with {METRICS_FILE}) in {', '.join(map(str, paths))}")
    logs = {run: read_metrics(run) for run in runs}
    logged = sorted({k for train, _ in logs.values() for r in train for k in r} - {"step", "epoch", "time"})
    if metric not in logged:
        raise UserError(f"no run logs {metric!r} (logged: {', '.join(logged)})")
    for run, (train, _) in logs.items():
        if x == "time" and train and "time" not in train[-1]:
            raise UserError(f"{run} has no wall times (it was trained before t2i logged them): use --x step")
    has_val = any(objective_of(run, val) for run, (_, val) in logs.items())
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 7, 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    at = (lambda r: r["step"]) if x == "step" else (lambda r: r["time"] / 60)  # noqa: E731
    for i, (run, label) in enumerate(zip(runs, run_labels(runs))):
        train, val = logs[run]
        colour = colours[i % len(colours)]
        points = [(at(r), r[metric]) for r in train if metric in r]
        if points:
            xs, ys = zip(*points)
            axes[0, 0].plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            axes[0, 0].plot(xs, smooth(list(ys), weight), color=colour, label=label, linewidth=1.6)
        objective = objective_of(run, val)
        scored = [(at(r), r[objective]) for r in val if objective in r]
        if has_val and scored:
            xs, ys = zip(*scored)
            axes[0, 1].plot(xs, ys, "o-", color=colour, label=f"{label}: {objective}", markersize=4)
    xlabel = "step" if x == "step" else "wall time (minutes)"
    axes[0, 0].set(title=f"training {metric} (smoothed {weight})", xlabel=xlabel, ylabel=metric)
    if "loss" in metric and all(v > 0 for train, _ in logs.values() for r in train if metric in r for v in [r[metric]]):
        axes[0, 0].set_yscale("log")
        for axis in (axes[0, 0].yaxis.set_major_formatter, axes[0, 0].yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FormatStrFormatter("%.3g"))
    if has_val:
        axes[0, 1].set(title="validation", xlabel=xlabel)
        axes[0, 1].legend(fontsize=8)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out
