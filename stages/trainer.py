"""The one training loop every stage shares: device, data order, LR schedule, EMA, progress, resume.

A stage supplies a `Stage`: the module to train, a `loss(idx, step)` over example indices, and
optional `validate()` / `sample(step)` hooks. The loop owns everything else, so exact resume,
signal handling and checkpointing are written once:

- data order is a pure function of (seed, epoch) and the LR of the step, so nothing about them is saved;
- `train_state.pt` holds the raw weights, EMA, optimizer, step and RNG states, apart from the
  shippable `config.yaml` + `model.safetensors` (the EMA weights when EMA is on);
- every file is written atomically; SIGINT/SIGTERM finish the current step, save and exit cleanly.
"""
from __future__ import annotations

import copy
import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stages import distributed as dist
from unclip.checkpoint import atomic_write, atomic_write_text, save_checkpoint
from unclip.config import TrainConfig
from unclip.errors import UserError
from unclip.pipeline import resolve_device

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
console = Console(stderr=True)


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # what is optimised
    config: object  # the stage config saved beside the weights
    num_examples: int
    # (example indices, step, the module to call: `model`, or its DDP wrapper) -> (loss, metrics)
    loss: Callable[[torch.Tensor, int, torch.nn.Module], tuple[torch.Tensor, dict]]
    validate: Optional[Callable[[torch.nn.Module], dict]] = None  # called with the model to ship, each epoch
    sample: Optional[Callable[[torch.nn.Module, int, Path], None]] = None  # (model to ship, step, run folder)
    parameters: Optional[list] = None  # trainable subset (default: all of model)
    save_dtype: Optional[torch.dtype] = None
    metrics_shown: list[str] = field(default_factory=lambda: ["loss"])


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model under `seed`, so the same seed starts from the same weights."""
    torch.manual_seed(seed)
    return build()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `lr * min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


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


def _rewind_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps up to `step`, so a resumed run logs every step once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def fit(stage: Stage, cfg: TrainConfig, out: Path, resume: bool = False) -> dict:
    """Train `stage` into the folder `out`; return the last logged metrics."""
    device = resolve_device(cfg.device)
    out = Path(out)
    model = stage.model
    ddp_model = dist.wrap(model, device)
    params = stage.parameters if stage.parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    world, rank = dist.world_size(), dist.rank()
    batch = cfg.batch_size // world
    if batch * world != cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    steps_per_epoch = stage.num_examples // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{stage.num_examples} training examples is fewer than one batch ({cfg.batch_size}); lower --batch-size")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    step = 0
    state_path = out / STATE_FILE
    torch.manual_seed(cfg.seed + rank)
    if resume:
        if not state_path.exists():
            raise UserError(f"--resume: no {STATE_FILE} in {out} to resume from")
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
        torch.set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        if dist.is_main():
            _rewind_metrics(out / METRICS_FILE, step)
    shipped = ema if ema is not None else model

    def save() -> None:
        dist.broadcast_buffers(model)  # what rank 0 saves is what every rank holds
        rngs = dist.gather_objects(torch.get_rng_state())
        if not dist.is_main():
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rngs,
                 "ema": ema.state_dict() if ema is not None else None}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        save_checkpoint(out, shipped, stage.config, dtype=stage.save_dtype)

    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / METRICS_FILE, "a") if dist.is_main() else None
    last: dict = {}
    order, order_epoch = None, -1
    t0, step0 = time.perf_counter(), step
    try:
        with stop_on_signals() as flag, _progress() as progress:
            task = progress.add_task(stage.name, total=total, completed=step, stats="", speed="")
            while step < total:
                epoch, pos = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(cfg.seed, epoch, stage.num_examples), epoch
                idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size][rank * batch : (rank + 1) * batch]
                lr = lr_at(step, total, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                loss, metrics = stage.loss(idx, step, ddp_model)
                loss_value = dist.mean(loss.detach()).item()
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"{stage.name}: the loss became {loss_value} at step {step}; stopped, the checkpoint of "
                        f"step {(step // cfg.ckpt_every) * cfg.ckpt_every} in {out} is intact (try a lower --lr)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
                optimizer.step()
                step += 1
                if ema is not None:
                    ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
                last = {"step": step, "epoch": epoch, "lr": lr, "loss": loss_value, **metrics}
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if log_file:
                    log_file.write(json.dumps(last) + "\n")
                rate = (step - step0) / (time.perf_counter() - t0)
                stats = "  ".join(f"{k} {last[k]:.4g}" for k in stage.metrics_shown if k in last)
                progress.update(task, completed=step, stats=stats, speed=f"{rate:.1f} it/s")
                if step % steps_per_epoch == 0 and stage.validate is not None and dist.is_main():
                    val = {"step": step, "epoch": epoch, **stage.validate(shipped)}
                    log_file.write(json.dumps(val) + "\n")
                    progress.console.print(f"{stage.name} epoch {epoch}: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in val.items() if k not in ("step", "epoch")))
                    last.update(val)
                if stage.sample is not None and dist.is_main() and cfg.sample_every and step % cfg.sample_every == 0 and step < total:
                    stage.sample(shipped, step, out)
                stop = dist.any_rank(flag["stop"] is not None)
                if step % cfg.ckpt_every == 0 or step == total or stop:
                    if log_file:
                        log_file.flush()
                    save()
                if stop:
                    progress.console.print(f"{flag['stop'] or 'stop'}: saved step {step} to {out}; continue with --resume")
                    last["interrupted"] = True
                    break
            else:
                if step == step0 and dist.is_main():
                    save()  # resumed a finished run: make sure the shippable weights exist
        if stage.sample is not None and dist.is_main() and not last.get("interrupted"):
            stage.sample(shipped, step, out)
    finally:
        if log_file:
            log_file.close()
    return last
