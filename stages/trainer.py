"""The one training loop every stage shares: device, data order, LR schedule, EMA, progress, resume.

A stage supplies a `Stage`: the module to train, its training data, a `loss(batch, step)` over a batch of
it, and optional `validate()` / `sample(step)` hooks. The loop owns everything else, so exact resume,
signal handling and checkpointing are written once:

- data order is a pure function of (seed, epoch), or for a streamed source of (seed, step) (unclip/data/stream.py),
  and the LR of the step, so nothing about them is saved;
- `train_state.pt` holds the raw weights, EMA, optimizer, step and RNG states (CPU and CUDA), apart from the
  shippable `config.yaml` + `model.safetensors` (the EMA weights when EMA is on);
- every file is written atomically; SIGINT/SIGTERM finish the current step, save and exit cleanly.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import pickle
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from t2i.stages import distributed as dist
from t2i.stages.samples import save_progress_gif
from unclip.components import MAXIMIZE
from unclip.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, atomic_write, atomic_write_text, load_state, remove_stale_temporaries,
                               resolve_folder, save_checkpoint)
from unclip.config import TrainConfig, load_yaml
from unclip.data import CaptionedImages
from unclip.data.stream import StreamedCaptions
from unclip.errors import UserError

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"  # one JSON record a step ({"step", "time", "loss", ...}) and one a validation
RUN_FILE = "run.json"  # stage, step, saved step, total, time, finished, objective: for t2i runs
VAL_IMAGES = 512  # validation examples of a diffusion stage's validation loss
console = Console(stderr=True)


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # what is optimised
    config: object  # the stage config saved beside the weights
    data: CaptionedImages | StreamedCaptions  # the training examples
    # (this process's batch of `data`, step, the module to call: `model`, or its DDP wrapper) -> (loss, metrics)
    loss: Callable[[CaptionedImages, int, torch.nn.Module], tuple[torch.Tensor, dict]]
    validate: Optional[Callable[[torch.nn.Module], dict]] = None  # called with the model to ship, each epoch
    # brings the model to ship up to date before it is validated or saved (CLIP: its BatchNorm statistics)
    finalize: Optional[Callable[[torch.nn.Module], None]] = None
    # (model to ship, step, run folder) -> the sample sheet written (uint8 (C, H, W)), see stages/samples.py
    sample: Optional[Callable[[torch.nn.Module, int, Path], torch.Tensor]] = None
    metrics_shown: list[str] = field(default_factory=lambda: ["loss"])
    objective: Optional[str] = None  # the key of `validate`'s result that ranks runs (t2i runs, t2i tune)

    @property
    def direction(self) -> str:
        return direction(self.objective)


def direction(metric: Optional[str]) -> str:
    """Whether a validation metric is better high (accuracies, cosines) or low (losses)."""
    return "maximize" if metric in MAXIMIZE else "minimize"


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model under `seed`, so the same seed starts from the same weights."""
    torch.manual_seed(seed)
    return build()


@torch.no_grad()
def held_out_loss(batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], available: int,
                  batch_size: int, device: torch.device) -> float:
    """The mean of `batch_loss(idx, generator)` over the first VAL_IMAGES of `available` validation examples,
    batch by batch, with timesteps and noise from a fixed seed: a diffusion stage's validation loss, comparable
    across epochs and runs."""
    n = min(VAL_IMAGES, available)
    generator = torch.Generator(device).manual_seed(0)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        total += batch_loss(idx, generator).item() * len(idx)
    return total / n


def fixed_images(data: CaptionedImages | StreamedCaptions, n: int, seed: int) -> CaptionedImages:
    """`n` training examples fixed for the run, to take statistics over (CLIP's BatchNorm, an autoencoder's latents):
    random ones of data in memory, a stream's first ones."""
    if isinstance(data, StreamedCaptions):
        return data.load(data.n_val, n)
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n])


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `lr * min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batches(data: CaptionedImages | StreamedCaptions, cfg: TrainConfig, start: int, steps_per_epoch: int):
    """This process's batches for the steps from `start` on: slices of a fresh permutation each epoch, or the
    batches of a stream (their order a function of the seed and the step, so both resume exactly)."""
    world, rank = dist.world_size(), dist.rank()
    per_rank = cfg.batch_size // world
    if isinstance(data, StreamedCaptions):
        yield from data.batches(cfg.seed, start, per_rank, rank, world, cfg.workers)
        return
    order, order_epoch = None, -1
    for step in itertools.count(start):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(cfg.seed, epoch, len(data)), epoch
        idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size][rank * per_rank : (rank + 1) * per_rank]
        yield data.subset(idx, batch=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one launch, not one a tensor
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


@contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps (the loop then saves and returns)."""
    flag = {"stop": None}

    def handler(signum, _frame):
        flag["stop"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not dist.is_main(),
    )


def _rewind_metrics(path: Path, step: int) -> float:
    """Keep only the records of steps up to `step`, so a resumed run logs every step once; return the wall
    time the run had trained by then (seconds), from which a resumed run counts on."""
    if not path.exists():
        return 0.0
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return max((r.get("time", 0.0) for r in kept), default=0.0)


def write_run_file(out: Path, stage: Stage, step: int, saved: Optional[int], total: int, seconds: float) -> None:
    """run.json: how far the run got (`step`), what `--resume` would continue from (`saved`), and its plan."""
    atomic_write_text(out / RUN_FILE, json.dumps({
        "stage": stage.name, "step": step, "saved": saved, "total": total, "time": round(seconds, 3),
        "finished": saved is not None and saved >= total, "objective": stage.objective,
        "direction": stage.direction if stage.objective else None}) + "\n")


def tensorboard_writer(out: Path, step: int):
    """A SummaryWriter in OUT/tensorboard (dropping what a resumed run logs again), or a clear error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard extra: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step or None)


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # a stopped run's exit status, as a shell reports a killed command
RUN_FILES = (STATE_FILE, METRICS_FILE, RUN_FILE, WEIGHTS_FILE, CONFIG_FILE)  # what a run writes, all replaced by --overwrite


def run_status(run: Path) -> dict:
    """A run's run.json (`write_run_file`), or {} where it has none (a run from before run.json, or no run)."""
    try:
        return json.loads((Path(run) / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def check_out(out: Path, name: str, resume: bool = False, overwrite: bool = False) -> str:
    """What training `name` into `out` will do: "fresh" (nothing there, or --overwrite, which clears the old run),
    "resume" (--resume of a run that is not finished) or "finished" (--resume of a finished one: nothing to do).
    A folder that holds a run (or a stage's weights) is never written over without --overwrite: a UserError
    names the ways on."""
    out = Path(out)
    status = run_status(out)
    held = [f for f in (STATE_FILE, RUN_FILE, WEIGHTS_FILE) if (out / f).is_file()]
    if resume and overwrite:
        raise UserError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    if resume:
        if status.get("finished"):
            return "finished"
        if not (out / STATE_FILE).is_file():
            raise UserError(f"--resume: no {STATE_FILE} in {out} to resume from")
        return "resume"
    if held and not overwrite:
        what = (f"a finished {name} run (step {status.get('step')} of {status.get('total')})" if status.get("finished")
                else f"a resumable {name} run (saved at step {status.get('saved')})" if (out / STATE_FILE).is_file()
                else f"{name} weights")
        raise UserError(f"{out} holds {what}: continue it with --resume, replace it with --overwrite, or train into "
                        "another --out")
    if held and dist.is_main():
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
        for folder in ("samples", "tensorboard"):
            shutil.rmtree(out / folder, ignore_errors=True)
    return "fresh"


def nothing_to_resume(out: Path, name: str) -> dict:
    if dist.is_main():
        console.print(f"{name}: the run in {out} is finished; nothing to resume", soft_wrap=True, highlight=False)
    return {"finished": True}


def load_train_state(path: Path) -> dict:
    """A run's `train_state.pt`, loaded with `weights_only=True`: tensors and plain values only, so a shared run
    folder cannot run code when it is resumed; anything else is a one-line UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused, it holds more than tensors and plain values (loading it could run code); "
                        "a t2i training state never does") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable training state ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng"} <= set(state):
        raise UserError(f"{path}: not a t2i training state (its keys: {', '.join(map(str, state)) if isinstance(state, dict) else type(state).__name__})")
    return state


class Run:
    """The state of one training run: weights, EMA, optimizer, step; saved and restored as one."""

    def __init__(self, stage: Stage, cfg: TrainConfig, out: Path):
        self.stage, self.cfg, self.out = stage, cfg, Path(out)
        self.device = dist.training_device(cfg.device)
        self.model = stage.model
        self.ddp_model = dist.wrap(self.model, self.device)  # DDP broadcasts rank 0's initial weights
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                           fused=self.device.type == "cuda" or None)  # one kernel on a GPU
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        self.shipped = self.ema if self.ema is not None else self.model  # what `model.safetensors` holds
        self.step, self.saved_step = 0, None
        self.elapsed = 0.0  # wall seconds trained before this process (a resumed run goes on counting)
        torch.manual_seed(cfg.seed + dist.rank())

    def restore(self) -> None:
        path = self.out / STATE_FILE
        if not path.exists():
            raise UserError(f"--resume: no {STATE_FILE} in {self.out} to resume from")
        state = load_train_state(path)  # onto the CPU, then copied onto the device
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = self.saved_step = state["step"]
        cpu_rng, cuda_rng = state["rng"][dist.rank()]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)
        if dist.is_main():
            self.elapsed = _rewind_metrics(self.out / METRICS_FILE, self.step)

    def initialize(self, spec: str) -> None:
        """Start from the weights of the stage folder `spec` (TrainConfig.init). Its layers must have this
        model's shapes; the model's layers it lacks keep their fresh weights and are listed."""
        folder = resolve_folder(spec)
        if (folder / self.stage.name / WEIGHTS_FILE).is_file():  # a pipeline folder: its stage of this name
            folder = folder / self.stage.name
        state, reference = load_state(folder), self.model.state_dict()
        wrong = [k for k, v in state.items() if k not in reference or reference[k].shape != v.shape]
        if wrong:
            raise UserError(f"--init {spec}: {folder} does not fit this {self.stage.name} "
                            f"({len(wrong)} tensors differ, e.g. {wrong[0]}); fine-tuning keeps the shapes")
        recorded = (load_yaml(folder / CONFIG_FILE) or {}).get("clip_fingerprint") if (folder / CONFIG_FILE).is_file() else None
        expected = getattr(self.stage.config, "clip_fingerprint", None)
        self.model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=False)
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())
        fresh = sorted({k.split(".")[0] for k in reference.keys() - state.keys()})
        if dist.is_main():
            console.print(f"{self.stage.name}: starting from {folder}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
            if recorded and expected and recorded != expected:  # a CLIP retrained: what it draws carries over
                console.print(f"{self.stage.name}: note: {folder} was trained against another CLIP (fingerprint "
                              f"{recorded}, this run's is {expected}); it starts reading this one's embeddings as that one's")

    def save(self, finalize: bool = True) -> None:
        """Every rank calls this (it holds collectives); rank 0 writes. `finalize` brings the shipped model up to date
        first (CLIP's BatchNorm statistics, seconds); a save on a signal skips it, to stop within the step (the
        statistics are recomputed at every later save and do not touch training)."""
        if finalize and self.stage.finalize is not None:
            self.stage.finalize(self.shipped)
        dist.broadcast_buffers(self.model)  # what rank 0 saves is what every rank holds
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rngs = dist.gather_objects((torch.get_rng_state(), cuda_rng))  # the noise is drawn on the device
        self.saved_step = self.step
        if not dist.is_main():
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "rng": rngs, "ema": self.ema.state_dict() if self.ema is not None else None}
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        save_checkpoint(self.out, self.shipped, self.stage.config)

    def train_step(self, batch: CaptionedImages, total: int) -> dict:
        """One optimisation step on `batch`; returns the step's metrics."""
        cfg, lr = self.cfg, lr_at(self.step, total, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, metrics = self.stage.loss(batch, self.step, self.ddp_model)
        value = dist.mean(loss.detach()).item()  # the same on every rank, so all stop together
        if not math.isfinite(value):
            kept = (f"the checkpoint of step {self.saved_step} in {self.out} is intact" if self.saved_step is not None
                    else "no checkpoint had been written yet")
            raise TrainingError(f"{self.stage.name}: the loss became {value} at step {self.step}; stopped, "
                                f"{kept} (try a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            ema_update(self.ema, self.model, min(cfg.ema_decay, (1 + self.step) / (10 + self.step)))
        out = {"step": self.step, "lr": lr, "loss": value, **metrics}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out


def fit(stage: Stage, cfg: TrainConfig, out: Path, resume: bool = False,
        on_validate: Optional[Callable[[dict], None]] = None, overwrite: bool = False) -> dict:
    """Train `stage` into the folder `out`; return the last logged metrics (with "interrupted": the signal's name
    if stopped, or "finished": True when `resume` found the run finished). A folder holding a run is continued
    (`resume`) or replaced (`overwrite`), never written over otherwise (`check_out`).

    The stage is validated at the end of every epoch and of the run; `on_validate(record)` sees each result
    (t2i tune reports it to Optuna, whose pruner may stop the run by raising)."""
    if check_out(out, stage.name, resume, overwrite) == "finished":
        return nothing_to_resume(out, stage.name)
    run = Run(stage, cfg, out)
    world, main = dist.world_size(), dist.is_main()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    steps_per_epoch = len(stage.data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(stage.data)} training examples is fewer than one batch ({cfg.batch_size}); lower --batch-size")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if resume:
        run.restore()
    elif cfg.init:
        run.initialize(cfg.init)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(run.out)
        if stale:
            console.print(f"{stage.name}: removed {stale} temporary file(s) an interrupted save left in {run.out}")
    log = open(run.out / METRICS_FILE, "a", buffering=1) if main else None  # line-buffered: `tail -f` follows it
    board = tensorboard_writer(run.out, run.step) if main and cfg.tensorboard else None
    last: dict = {}
    stream = batches(stage.data, cfg, run.step, steps_per_epoch)
    t0, step0 = time.perf_counter(), run.step
    seconds = lambda: run.elapsed + time.perf_counter() - t0  # noqa: E731

    def record(entry: dict, kind: str) -> None:
        log.write(json.dumps(entry) + "\n")
        if board is not None:
            for key, value in entry.items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)):
                    board.add_scalar(f"{stage.name}/{kind}/{key}", value, entry["step"])

    def show_samples() -> None:
        sheet = stage.sample(run.shipped, run.step, run.out)
        if board is not None and sheet is not None:
            board.add_image(f"{stage.name}/samples", sheet, run.step, dataformats="CHW")

    def status() -> None:
        if main:
            write_run_file(run.out, stage, run.step, run.saved_step, total, seconds())

    def save(finalize: bool = True) -> None:
        if log:
            log.flush()
        run.save(finalize)
        status()

    try:
        with stop_on_signals() as flag, _progress() as progress:
            task = progress.add_task(stage.name, total=total, completed=run.step, stats="", speed="")
            while run.step < total:
                epoch = run.step // steps_per_epoch
                last = {**run.train_step(next(stream), total), "epoch": epoch, "time": round(seconds(), 3)}
                if log:
                    record(last, "train")
                stats = "  ".join(f"{k} {last[k]:.4g}" for k in stage.metrics_shown if k in last)
                speed = f"{(run.step - step0) / (time.perf_counter() - t0):.1f} it/s"
                progress.update(task, completed=run.step, stats=stats, speed=speed)
                stop = dist.any_rank(flag["stop"] is not None)  # asked to stop: save this step and go, nothing else
                validating = not stop and stage.validate is not None and (run.step % steps_per_epoch == 0 or run.step == total)
                if validating and stage.finalize is not None:
                    stage.finalize(run.shipped)  # every rank: it may hold collectives (BatchNorm over ranks)
                if main and validating:
                    val = {"step": run.step, "epoch": epoch, "time": round(seconds(), 3), **stage.validate(run.shipped)}
                    record(val, "val")
                    progress.console.print(f"{stage.name} epoch {epoch}: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in val.items() if k not in ("step", "epoch", "time")))
                    last.update(val)
                    status()
                    if on_validate is not None:
                        on_validate(val)
                if main and not stop and stage.sample is not None and cfg.sample_every and \
                        run.step % cfg.sample_every == 0 and run.step < total:
                    show_samples()
                if run.step % cfg.ckpt_every == 0 or run.step == total or stop:
                    save(finalize=not stop)
                if stop:
                    progress.console.print(f"{flag['stop'] or 'stop'}: saved step {run.step} to {run.out}; "
                                           "continue with --resume")
                    return {**last, "interrupted": flag["stop"] or "SIGTERM"}
        if run.step == step0:
            save()  # resumed a finished run: make sure the shippable weights exist
        if main and stage.sample is not None:
            show_samples()
            save_progress_gif(run.out)
    finally:
        stream.close()  # a stream's DataLoader workers stop here
        if log:
            log.close()
        if board is not None:
            board.close()
    return last
