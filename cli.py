"""t2i: a thin Typer front over the `unclip` library and the `stages` training recipes."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import typing
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from t2i.stages.tune import TUNABLE
from unclip.config import DEFAULT_PIPELINE, DistillConfig, TextConfig
from unclip.data import SOURCE_USAGE, SOURCES, STREAMABLE
from unclip.device import DEVICES
from unclip.diffusion.sampling import SAMPLERS
from unclip.errors import T2iWarning, UserError
from unclip.options import SamplingOptions

app = typer.Typer(pretty_exceptions_show_locals=False, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="unCLIP text-to-image: train CLIP, a diffusion prior and a decoder; generate images.")
console = Console(stderr=True)


# Choices built from the library's registries, so a new sampler or device needs no edit here.
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
Sampler = Enum("Sampler", {name: name for name in SAMPLERS}, type=str)


class StageChoice(str, Enum):
    prior = "prior"
    decoder = "decoder"
    both = "both"


# Library parameters whose flag is not the parameter's name with dashes.
FLAG_NAMES = {"name_or_path": "--checkpoints", "source": "--from", "target": "--to"}


def flag(param: str) -> str:
    return FLAG_NAMES.get(param, "--" + param.replace("_", "-"))


def user_error(e: UserError) -> str:
    """A library error in the CLI's words: the parameter at fault named by its flag (in place of its name where the
    message says it, else in front)."""
    if not e.param:
        return str(e)
    said, n = re.subn(rf"(?<![\w-]){re.escape(e.param)}(?![\w-])", flag(e.param), str(e), count=1)
    return said if n else f"{flag(e.param)}: {e}"


def command(name: str):
    """Register a command whose user errors print as one red line and exit 1, never a traceback."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                console.print(f"[red]error:[/red] {escape(user_error(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

        return app.command(name)(run)

    return decorate


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings (a word the pipeline never saw, a setting it cannot honour) as one yellow line."""
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


def version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            typer.echo(f"t2i {installed('t2i')}")
        except PackageNotFoundError:
            typer.echo("t2i (not installed: run from a source checkout)")
        raise typer.Exit()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
         show_version: Annotated[bool, typer.Option("--version", callback=version, is_eager=True,
                                                    help="Print t2i's version and exit.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_time=False, show_path=False)])
    warnings.showwarning = show_warning
    warnings.simplefilter("always", T2iWarning)  # each time it applies, not once per place in the code


@contextmanager
def progress_bar(description: str):
    """Yield `start(total) -> advance()`: a rich progress bar shown once the total is known."""
    with Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as progress:

        def start(total: int):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        yield start


# Options shared by the training commands.
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Stage or pipeline YAML; flags override it.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help=SOURCE_USAGE)]
ImageColumnOpt = Annotated[Optional[str], typer.Option("--image-column", help="parquet: the image column (default image).")]
TextColumnOpt = Annotated[Optional[str], typer.Option("--text-column", help="parquet: the caption column (default text).")]
StreamOpt = Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="coco:, parquet:, wds: stream the training split rather than decode it into memory (default: stream above 2 GiB decoded).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="Processes decoding a streamed source, per training process (default 2).")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder of the IDX files.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1)]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Overrides --epochs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1)]
LrOpt = Annotated[Optional[float], typer.Option("--lr", min=0.0)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
DeviceOpt = Annotated[Optional[Device], typer.Option("--device")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run saved in the output folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a run the output folder holds (without it, t2i refuses to).")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also log to OUT/tensorboard (the tensorboard extra).")]
InitOpt = Annotated[Optional[str], typer.Option("--init", help="Fine-tune: start from this stage folder's weights (or a pipeline folder's, or a shipped pipeline's, stage of the same name); new layers start fresh.")]


# The training flags every training command takes, declared once: `training_flags` adds them to a command.
# (parameter, annotation, default); the ones a command declares itself (distill's --epochs) keep its own wording.
TRAIN_FLAGS = [("data", DataOpt, None), ("data_dir", DataDirOpt, None), ("image_column", ImageColumnOpt, None),
               ("text_column", TextColumnOpt, None), ("stream", StreamOpt, None), ("workers", WorkersOpt, None),
               ("epochs", EpochsOpt, None), ("max_steps", MaxStepsOpt, None), ("batch_size", BatchOpt, None),
               ("lr", LrOpt, None), ("seed", SeedOpt, None), ("device", DeviceOpt, None),
               ("resume", ResumeOpt, False), ("overwrite", OverwriteOpt, False), ("tensorboard", TensorboardOpt, False),
               ("init", InitOpt, None)]


def ended(last: dict) -> None:
    """A training command's exit: 130 after SIGINT, 143 after SIGTERM (saved, resumable), 0 when finished."""
    from t2i.stages.trainer import EXIT_CODES

    if last.get("interrupted"):
        raise typer.Exit(EXIT_CODES.get(last["interrupted"], 1))


def train_overrides(**flags) -> dict:
    """Flags given on the command line, as overrides of the `train` section of a stage config."""
    train = {k: (v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v)
             for k, v in flags.items() if v is not None}
    if "epochs" in train and "max_steps" not in train:
        train["max_steps"] = None
    return {"train": train}


def training_flags(*skip: str):
    """Give a command the training flags (TRAIN_FLAGS, but those in `skip`). It receives them gathered as `flags`
    (`train_overrides`), except the ones it names among its own parameters: those it receives as themselves (a plain
    `resume: bool`), or, declared with an Annotated option of its own, with its own help (distill's --epochs)."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = {name for name in sig.parameters if name != "flags"}
        custom = {name for name in own if typing.get_origin(sig.parameters[name].annotation) is Annotated}
        shared = [(name, annotation, default) for name, annotation, default in TRAIN_FLAGS
                  if name not in skip and name not in custom]
        names = {name for name, _, _ in shared}
        defaults = {name: default for name, _, default in shared}
        params = [p for name, p in sig.parameters.items() if name != "flags" and name not in names]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                   for name, annotation, default in shared]

        @functools.wraps(fn)
        def run(**kwargs):
            given = {name: kwargs.pop(name) for name in names}
            given = {k: v for k, v in given.items() if v is not defaults[k] or k in own}  # an unset switch overrides nothing
            passed = {name: given.pop(name) for name in list(given) if name in own}
            return fn(**kwargs, **passed, flags=train_overrides(**given))

        run.__signature__ = sig.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


@command("clip-train")
@training_flags()
def clip_train(
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder: weights, metrics, resume state.")] = Path("runs/clip"),
    resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """Stage one: train CLIP contrastively on captioned images."""
    from t2i.stages.clip import train_clip
    from t2i.stages.distributed import is_main
    from unclip.config import ClipConfig, load_config, merge

    cfg = merge(load_config(ClipConfig, config), flags)
    last = train_clip(cfg, out, resume, overwrite)
    ended(last)
    if not last.get("finished") and is_main():
        console.print(f"CLIP saved to {out}" + (f" (val zero-shot {last['val_zero_shot']:.4f})" if "val_zero_shot" in last else ""))


@command("prepare")
def prepare(
    data: Annotated[str, typer.Option("--data", help=" | ".join(SOURCES[k].usage for k in STREAMABLE))],
    out: Annotated[Path, typer.Option("--out", help="The file written (and FILE.json beside it); train with --data prepared:FILE.")],
    size: Annotated[int, typer.Option("--size", min=8, help="Side of the square images stored.")] = 64,
    channels: Annotated[int, typer.Option("--channels", min=1, max=3, help="3 (colour) or 1 (grey).")] = 3,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding processes.")] = 2,
    image_column: ImageColumnOpt = None, text_column: TextColumnOpt = None,
) -> None:
    """Decode and resize a captioned source once into a uint8 file on disk (training then reads rows, not JPEGs)."""
    import time

    from unclip.data.prepared import prepare as run_prepare
    from unclip.data.sources import open_source, skip_summary

    if channels == 2:
        raise UserError("--channels: 1 (grey) or 3 (colour)")
    if data.partition(":")[0] not in STREAMABLE:
        raise UserError(f"--data {data}: t2i prepare reads {', '.join(SOURCES[k].usage for k in STREAMABLE)}")
    source = open_source(data, "train", channels, size, image_column or "image", text_column or "text")
    start = time.perf_counter()
    total = len(source) if hasattr(source, "__len__") else getattr(source, "count", None)
    with Progress(TextColumn("[bold]preparing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("preparing", total=total)
        meta = run_prepare(source, data, out, workers, lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - start
    console.print(f"prepared {meta['count']:,} images of {channels}x{size}x{size} from {data} in {seconds:.1f} s "
                  f"({meta['count'] / seconds:,.0f} images/s; skipped: {skip_summary(meta['skipped'])}) into {out} "
                  f"({out.stat().st_size / 2**20:,.1f} MiB); train with --data prepared:{out}", highlight=False)


@command("clip-import")
def clip_import(
    open_clip: Annotated[str, typer.Option("--open-clip", help="An open_clip architecture (ViT-B-32) or a model-config JSON file.")],
    weights: Annotated[Path, typer.Option("--weights", help="Its weights: a local .pt, .bin or .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", help="The CLIP stage folder written (config.yaml + model.safetensors).")],
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="The pipeline's image side (default: the model's input size).")] = None,
    image_channels: Annotated[int, typer.Option("--image-channels", min=1, max=3, help="1 for grayscale data, 3 for colour.")] = 3,
    template: Annotated[str, typer.Option("--template", help="Zero-shot prompt with {} for the class name.")] = "a photo of a {}",
) -> None:
    """Stage one from a pretrained open_clip model and a local weights file (no network): frozen, with its own
    preprocessing and tokenizer; decoder-train, clip-eval, classify and generate use it like a trained CLIP."""
    from unclip.checkpoint import save_checkpoint
    from unclip.models.open_clip_import import import_open_clip

    if image_channels == 2:
        raise UserError("--image-channels: 1 (grayscale) or 3 (colour)")
    model, cfg = import_open_clip(open_clip, weights, image_size, image_channels, template)
    save_checkpoint(out, model, cfg)
    m = cfg.model
    params = sum(p.numel() for p in model.parameters())
    console.print(f"imported {cfg.open_clip.name} ({params / 1e6:.1f}M parameters, embeddings {m.embed_dim}, "
                  f"input {cfg.open_clip.image_size}px) to {out}; pipeline images {m.image_channels}x{m.image_size}px. "
                  f"Next: t2i decoder-train --clip {out} --config YAML --out DIR", highlight=False)


@command("clip-eval")
def clip_eval(
    clip: Annotated[str, typer.Option("--clip", help="CLIP checkpoint folder, or a shipped pipeline's name.")] = DEFAULT_PIPELINE,
    data: DataOpt = None, data_dir: DataDirOpt = None,
    template: Annotated[Optional[str], typer.Option("--template", help="Prompt with {} for the class name.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Zero-shot classification of the test split against one prompt per class."""
    from unclip.components.clip import load_clip
    from unclip.zeroshot import evaluate_clip

    model, cfg = load_clip(clip, device.value if device else "auto")
    template = template or cfg.template
    if "{}" not in template:
        raise UserError(f"--template {template!r} has no {{}} for the class name")
    result = evaluate_clip(model, cfg, data or cfg.train.data, data_dir or cfg.train.data_dir, template)
    table = Table(title=f"zero-shot, template {template!r}")
    for col in ("class", "prompt", "accuracy", "images"):
        table.add_column(col, justify="right" if col in ("accuracy", "images") else "left")
    for name, acc, n in zip(result["class_names"], result["per_class"], result["counts"]):
        table.add_row(name, template.format(name), f"{acc:.4f}", str(n))
    Console().print(table)
    typer.echo(f"zero-shot accuracy: {result['accuracy']:.4f}")


@command("classify")
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files of any size or colour mode.")],
    clip: Annotated[str, typer.Option("--clip", help="CLIP checkpoint folder, or a shipped pipeline's name.")] = DEFAULT_PIPELINE,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Comma-separated labels (default: the training classes).")] = None,
    template: Annotated[Optional[str], typer.Option("--template")] = None,
    top: Annotated[int, typer.Option("--top", min=1)] = 3,
    device: DeviceOpt = None,
) -> None:
    """Rank captions for each image with CLIP (zero-shot classification)."""
    from unclip.components.clip import load_clip
    from unclip.zeroshot import classify_files

    model, cfg = load_clip(clip, device.value if device else "auto")
    names = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    for path, ranking in classify_files(model, cfg, images, names, template or cfg.template):
        typer.echo(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranking[:top]))


class Pooling(str, Enum):
    mean = "mean"
    first = "first"


@command("text-import")
def text_import(
    transformers: Annotated[Path, typer.Option("--transformers", help="A Hugging Face transformers text model saved "
                                               "locally (save_pretrained: config.json, model.safetensors, tokenizer.json).")],
    out: Annotated[Path, typer.Option("--out", help="The text encoder folder written (config.yaml, model.safetensors, tokenizer/).")],
    context: Annotated[int, typer.Option("--context", min=2, help="Tokens a caption is cut to.")] = TextConfig.context,
    pooling: Annotated[Pooling, typer.Option("--pooling", help="The caption's embedding: its tokens' mean (T5) or the "
                                             "first token's (BERT's [CLS]).")] = Pooling.mean,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the text encoder --out holds.")] = False,
) -> None:
    """A frozen pretrained text encoder (T5's encoder, BERT, a CLIP text model) for stage two to read captions with,
    from a local folder (no network): t2i decoder-train --text OUT trains the prior and the decoder against it."""
    from unclip.checkpoint import CONFIG_FILE, save_checkpoint
    from unclip.models.pretrained_text import TOKENIZER_DIR, feature_width, import_transformers

    if (out / CONFIG_FILE).is_file() and not overwrite:
        raise UserError(f"--out {out} already holds a stage ({CONFIG_FILE}): replace it with --overwrite, or choose another --out")
    text, cfg, tokenizer = import_transformers(transformers, context, pooling.value)
    save_checkpoint(out, text, cfg)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    params = sum(p.numel() for p in text.parameters())
    console.print(f"imported the {cfg.model.get('model_type')} text encoder {cfg.name} ({params / 1e6:.2f}M parameters, "
                  f"features {feature_width(cfg)} wide, context {context}) to {out}. "
                  f"Next: t2i decoder-train --clip CLIP --text {out} --config YAML --out DIR", highlight=False)


@command("decoder-train")
@training_flags()
def decoder_train(
    clip: Annotated[Path, typer.Option("--clip", help="Trained CLIP folder (frozen here).")],
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Pipeline folder: prior/, decoder/ and a copy of clip/.")] = Path("runs/pipeline"),
    stage: Annotated[StageChoice, typer.Option("--stage")] = StageChoice.both,
    text: Annotated[Optional[Path], typer.Option("--text", help="A pretrained text encoder (t2i text-import) to read "
                                                 "captions with instead of CLIP's text tower; copied to OUT/text.")] = None,
    autoencoder: Annotated[Optional[Path], typer.Option("--autoencoder", help="An autoencoder (t2i autoencoder-train) "
                                                        "for the decoder to draw in the latent space of; copied to "
                                                        "OUT/autoencoder.")] = None,
    resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """Stage two: train the diffusion prior and/or the decoder against a frozen CLIP."""
    from t2i.stages.distributed import is_main
    from t2i.stages.stage_two import train_stage_two
    from unclip.checkpoint import WEIGHTS_FILE

    stages = ["prior", "decoder"] if stage == StageChoice.both else [stage.value]
    last = train_stage_two(clip, config, flags, out, stages, resume, overwrite, text, autoencoder)
    ended(last)
    if not last.get("finished") and is_main():
        if (out / "decoder" / WEIGHTS_FILE).is_file():
            console.print(f"pipeline saved to {out} (generate with: t2i generate --checkpoints {out} --prompt ...)")
        else:
            console.print(f"prior saved to {out / 'prior'}; the pipeline needs its decoder: t2i decoder-train --clip {clip} "
                          f"--stage decoder --out {out}")


@command("upsampler-train")
@training_flags()
def upsampler_train(
    pipeline: Annotated[Path, typer.Option("--pipeline", help="Pipeline folder with clip/ and decoder/; writes upsampler/.")],
    config: ConfigOpt = None, resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """DALL-E 2's cascade: a diffusion upsampler from the decoder's image size to the config's (64 by default)."""
    from t2i.stages.distributed import is_main
    from t2i.stages.upsampler import train_upsampler

    last = train_upsampler(pipeline, config, flags, resume, overwrite)
    ended(last)
    if not last.get("finished") and is_main():
        console.print(f"upsampler saved to {pipeline / 'upsampler'}; t2i generate --checkpoints {pipeline} now runs it")


@command("autoencoder-train")
@training_flags()
def autoencoder_train(
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Autoencoder folder: weights, metrics, sheets, resume state.")] = Path("runs/autoencoder"),
    resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """An autoencoder for a decoder to draw in its latent space (t2i decoder-train --autoencoder OUT), on images alone."""
    from t2i.stages.autoencoder import autoencoder_config, train_autoencoder
    from t2i.stages.distributed import is_main

    last = train_autoencoder(autoencoder_config(config, flags), out, resume, overwrite)
    ended(last)
    if not last.get("finished") and is_main():
        psnr = f" (validation PSNR {last['val_psnr']:.2f} dB)" if "val_psnr" in last else ""
        console.print(f"autoencoder saved to {out}{psnr}; a latent decoder: t2i decoder-train --clip CLIP "
                      f"--autoencoder {out} --out DIR", highlight=False)


@command("layout-train")
@training_flags("image_column", "text_column", "stream", "workers")  # scenes only: drawn in memory
def layout_train(
    pipeline: Annotated[Path, typer.Option("--pipeline", help="Pipeline folder with clip/; writes layout/.")],
    config: ConfigOpt = None, resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """A layout stage: caption -> each object's label and box, drawn before the image, for a decoder trained with
    layout: true (--data scenes)."""
    from t2i.stages.distributed import is_main
    from t2i.stages.layout import train_layout

    last = train_layout(pipeline, config, flags, resume, overwrite)
    ended(last)
    if not last.get("finished") and is_main():
        console.print(f"layout stage saved to {pipeline / 'layout'}; t2i generate --checkpoints {pipeline} draws "
                      "layouts first when its decoder reads them")


class DistillStage(str, Enum):
    decoder = "decoder"
    prior = "prior"


@command("distill")
@training_flags()
def distill(
    pipeline: Annotated[str, typer.Option("--pipeline", help="The teacher: a pipeline folder or a shipped pipeline's name.")],
    out: Annotated[Path, typer.Option("--out", help="The distilled pipeline folder written (rounds under OUT/distill/).")],
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help=f"The distilled stage's sampling steps (default {DistillConfig.steps}).")] = None,
    teacher_steps: Annotated[Optional[int], typer.Option("--teacher-steps", min=2, help=f"The teacher's DDIM steps, steps x 2^rounds (default {DistillConfig.teacher_steps}).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", min=1.0, help="The teacher's guidance, learnt by the student (default: the pipeline's own for the stage, its sampling.yaml).")] = None,
    student_guidance: Annotated[Optional[float], typer.Option("--student-guidance", min=1.0, help=f"The guidance the distilled pipeline samples its student at, on top of the learnt one (default {DistillConfig.student_guidance}).")] = None,
    stage: Annotated[Optional[DistillStage], typer.Option("--stage", help=f"The stage distilled (default {DistillConfig.stage}).")] = None,
    config: ConfigOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Per round.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Per round; overrides --epochs.")] = None,
    resume: bool = False, overwrite: bool = False, flags: dict = None,
) -> None:
    """Progressive distillation: a decoder (or prior) that samples in a few DDIM steps, as a new pipeline folder."""
    from t2i.stages.distill import distill as run_distill
    from t2i.stages.distributed import is_main

    flags["train"].update(train_overrides(epochs=epochs, max_steps=max_steps)["train"])
    flags.update({k: v for k, v in (("steps", steps), ("teacher_steps", teacher_steps), ("guidance", guidance),
                                    ("student_guidance", student_guidance), ("stage", stage and stage.value)) if v is not None})
    last = run_distill(pipeline, out, config, flags, resume, overwrite)
    ended(last)
    if not last.get("finished") and is_main():
        console.print(f"distilled pipeline saved to {out} (t2i generate --checkpoints {out} --prompt ...)")


TuneStage = Enum("TuneStage", {name: name for name in TUNABLE}, type=str)  # the stages stages/tune.py can search


@command("tune")
@training_flags("image_column", "text_column", "stream", "workers", "resume", "overwrite", "tensorboard", "init")
def tune(
    stage: Annotated[TuneStage, typer.Argument(help="The stage whose config is searched.")],
    space: Annotated[Path, typer.Option("--space", help="YAML: dotted config field -> {low, high[, log, step]} or {choices}.")],
    out: Annotated[Path, typer.Option("--out", help="Study folder: study.db, trial_NNN/, best.yaml.")],
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials to finish (or prune) in all; a rerun resumes.")] = 20,
    config: ConfigOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=0.0, help="Start no new trial after this many minutes.")] = None,
    evaluate_best: Annotated[bool, typer.Option("--evaluate-best", help="Retrain the best config and score it on the test split.")] = False,
    clip: Annotated[Optional[Path], typer.Option("--clip", help="prior, decoder: the trained CLIP folder.")] = None,
    pipeline: Annotated[Optional[Path], typer.Option("--pipeline", help="upsampler: the pipeline folder.")] = None,
    flags: dict = None,
) -> None:
    """Search a stage's hyperparameters with Optuna on the validation split (median pruning, SQLite study)."""
    from t2i.stages.tune import Interrupted, trial_values
    from t2i.stages.tune import tune as run_tune

    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731

    def on_trial(trial, objective, values) -> None:
        value = f"{objective} {trial.value:.5g}" if trial.value is not None else trial.user_attrs.get("error", "")
        console.print(f"trial {trial.number} {trial.state.name.lower()}: {value}  " + "  ".join(f"{k}={show(v)}" for k, v in values.items()),
                      highlight=False, soft_wrap=True)

    try:
        result = run_tune(stage.value, space, trials, out, config, flags, clip, pipeline, timeout, evaluate_best, on_trial)
    except Interrupted as e:
        console.print(f"interrupted: {e}")
        raise typer.Exit(130) from None
    table = Table(title=f"t2i tune {stage.value}: {len(result.trials)} trials in {out}")
    names = list(result.space)
    for col in ("trial", *names, result.objective or "value", "state", "seconds"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for t in result.trials:
        values = trial_values(t, result.space)
        seconds = f"{t.duration.total_seconds():.1f}" if t.duration else ""
        mark = " *" if result.best is not None and t.number == result.best.number else ""
        table.add_row(str(t.number) + mark, *[show(values[n]) if n in values else "" for n in names],
                      f"{t.value:.5g}" if t.value is not None else "", t.state.name.lower(), seconds)
    Console().print(table)
    if result.best is None:
        console.print("no trial finished; nothing to report")
        return
    console.print(f"best: trial {result.best.number}, {result.objective} {result.best.value:.5g} ({result.direction}); "
                  f"its config: {result.best_yaml} (use it with --config)")
    if result.test is not None:
        console.print("best config retrained, on the test split: " + "  ".join(
            f"{k.removeprefix('val_')} {v:.5g}" for k, v in result.test.items()))


@command("runs")
def runs(folder: Annotated[Path, typer.Argument(help="A run, a pipeline folder, or a folder of runs.")] = Path("runs")) -> None:
    """A table of the training runs under a folder: stage, steps, wall time, losses, whether it can be resumed."""
    from t2i.stages.runs import find_runs, run_labels, summarize

    found = find_runs(folder)
    if not found:
        raise UserError(f"no training runs (folders with metrics.jsonl) under {folder}")
    table = Table(title=f"runs under {folder}")
    for col in ("run", "stage", "steps", "wall time", "last loss", "best validation", "state"):  # folded, never cut
        table.add_column(col, justify="right" if col in ("steps", "wall time", "last loss") else "left", overflow="fold")
    for path, label in zip(found, run_labels(found)):
        r = summarize(path)
        steps = f"{r.step:,}" + (f"/{r.total:,}" if r.total else "")
        wall = "-" if r.seconds is None else f"{r.seconds:.1f}s" if r.seconds < 60 else \
            f"{int(r.seconds // 3600)}h{int(r.seconds % 3600 // 60):02d}m" if r.seconds >= 3600 else \
            f"{int(r.seconds // 60)}m{int(r.seconds % 60):02d}s"
        best = f"{r.objective} {r.best:.4g} (step {r.best_step:,})" if r.best is not None else "-"
        loss = f"{r.last_loss:.4g}" if r.last_loss is not None else "-"
        table.add_row(label, r.stage, steps, wall, loss, best, r.state)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: wide enough for whole paths


@command("plot")
def plot(
    run_folders: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Runs, pipeline folders or folders of runs.")],
    metric: Annotated[str, typer.Option("--metric", help="The training metric (loss, lr, grad_norm, acc, ...).")] = "loss",
    x: Annotated[str, typer.Option("--x", help="step or time (wall minutes).")] = "step",
    out: Annotated[Path, typer.Option("--out", help="The PNG written.")] = Path("plot.png"),
    smooth: Annotated[float, typer.Option("--smooth", min=0.0, max=0.999, help="Exponential smoothing, as TensorBoard's.")] = 0.9,
) -> None:
    """Training and validation curves of one or several runs on one PNG (the plot extra: matplotlib)."""
    from t2i.stages.runs import plot_runs

    console.print(f"wrote {plot_runs(run_folders, metric, x, out, smooth)}")


@command("export")
def export(
    checkpoints: Annotated[Path, typer.Option("--checkpoints", help="Trained pipeline folder, or one stage's (a CLIP run).")],
    out: Annotated[Path, typer.Option("--out", help="Where the shippable copy goes.")],
    half: Annotated[bool, typer.Option("--half/--full", help="Store weights in float16 (half the size).")] = True,
) -> None:
    """Copy a pipeline's (or one stage's) weights and configs, no training state, for shipping, in float16 by default."""
    import torch

    from unclip.checkpoint import export_pipeline

    export_pipeline(checkpoints, out, torch.float16 if half else None)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.print(f"exported {checkpoints} to {out} ({size / 2**20:.1f} MiB)")


# Options shared by the sampling commands.
CheckpointsOpt = Annotated[str, typer.Option("--checkpoints", help="Pipeline folder with clip/, prior/, decoder/, or a shipped pipeline's name (mnist).")]
SeedSampleOpt = Annotated[int, typer.Option("--seed", help="Same seed, same settings: same images.")]
SamplerOpt = Annotated[Optional[Sampler], typer.Option("--sampler", help=f"Default: the pipeline's ({SamplingOptions.sampler} unless its sampling.yaml says).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (ddpm always takes all).")]
GuidanceOpt = Annotated[Optional[float], typer.Option("--guidance", help="Decoder guidance scale, 1 = none.")]
TextGuidanceOpt = Annotated[Optional[float], typer.Option(
    "--text-guidance", help="Decoders that read the caption: its own guidance scale, --guidance then the image embedding's.")]
PriorGuidanceOpt = Annotated[Optional[float], typer.Option("--prior-guidance", help="Prior guidance scale (default: the pipeline's).")]
UpsamplerStepsOpt = Annotated[Optional[int], typer.Option("--upsampler-steps", help="Upsampler sampling steps (pipelines with one).")]
UpsamplerStrengthOpt = Annotated[Optional[float], typer.Option(
    "--upsampler-strength", help="How far the upsampler noises the enlarged base image before refining it; 1: from noise.")]
SampleDeviceOpt = Annotated[Device, typer.Option("--device")]
LayoutTemperatureOpt = Annotated[Optional[float], typer.Option(
    "--layout-temperature", help="Pipelines with a layout stage: how freely it draws each object (1: as it learnt; 0: its likeliest).")]
BoxTemperatureOpt = Annotated[Optional[float], typer.Option(
    "--layout-box-temperature", "--box-temperature",
    help="Pipelines with a layout stage: how freely it draws the boxes, apart from the objects' labels.")]


def sampling_settings(sampler: Optional[Sampler], **flags) -> dict:
    """The sampling flags given, by SamplingOptions' names (None: the pipeline's default, from its sampling.yaml or
    the library's); the library's one door (`UnCLIPPipeline.options`) resolves and checks them."""
    return {"sampler": sampler.value if sampler else None, **flags}


@command("generate")
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="What to draw.")],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Images to draw.")] = 16,
    checkpoints: CheckpointsOpt = DEFAULT_PIPELINE,
    out: Annotated[Optional[Path], typer.Option("--out", help="Default: outputs/<prompt>/")] = None,
    seed: SeedSampleOpt = 0, sampler: SamplerOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
    text_guidance: TextGuidanceOpt = None, prior_guidance: PriorGuidanceOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None, upsampler_strength: UpsamplerStrengthOpt = None,
    layout_temperature: LayoutTemperatureOpt = None, layout_box_temperature: BoxTemperatureOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images sampled at once.")] = 64,
    device: SampleDeviceOpt = Device.auto,
    animate: Annotated[bool, typer.Option("--animate", help="Also write denoise.gif of the sampling chain.")] = False,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", help="What to steer away from.")] = None,
    init_image: Annotated[Optional[Path], typer.Option("--init-image", help="Image-to-image (SDEdit): start from this image.")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="With --init-image: 0 keeps the image, 1 ignores it.")] = None,
) -> None:
    """Text -> image: the prior turns the caption into a CLIP image embedding, the decoder draws it."""
    from t2i.folders import generate_to_folder

    if strength is not None and init_image is None:
        raise UserError("--strength is for image-to-image: give the image with --init-image")
    settings = sampling_settings(sampler, steps=steps, guidance=guidance, prior_guidance=prior_guidance,
                                 upsampler_steps=upsampler_steps, upsampler_strength=upsampler_strength,
                                 strength=strength, text_guidance=text_guidance, layout_temperature=layout_temperature,
                                 layout_box_temperature=layout_box_temperature)
    with progress_bar("sampling") as bar:
        folder = generate_to_folder(prompt, num_samples, checkpoints, out, settings, seed, batch_size, device.value,
                                    animate, bar, negative_prompt, init_image)
    console.print(f"wrote {num_samples} image(s) and grid.png{' and denoise.gif' if animate else ''} to {folder}/")


@command("vary")
def vary(
    image: Annotated[Path, typer.Argument(help="Any image; converted to what the model expects.")],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1)] = 16,
    checkpoints: CheckpointsOpt = DEFAULT_PIPELINE,
    out: Annotated[Optional[Path], typer.Option("--out", help="Default: outputs/vary-<image name>/")] = None,
    seed: SeedSampleOpt = 0, sampler: SamplerOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None, upsampler_strength: UpsamplerStrengthOpt = None,
    device: SampleDeviceOpt = Device.auto,
) -> None:
    """Image variations: decode the image's CLIP embedding from fresh noise (same content, new details)."""
    from t2i.folders import vary_to_folder

    settings = sampling_settings(sampler, steps=steps, guidance=guidance, upsampler_steps=upsampler_steps,
                                 upsampler_strength=upsampler_strength)
    with progress_bar("sampling") as bar:
        folder = vary_to_folder(image, num_samples, checkpoints, out, settings, seed, device.value, progress=bar)
    console.print(f"wrote {num_samples} variation(s), grid.png and source.png to {folder}/")


@command("interpolate")
def interpolate(
    source: Annotated[str, typer.Option("--from", help="A prompt or an image path.")],
    target: Annotated[str, typer.Option("--to", help="A prompt or an image path.")],
    frames: Annotated[int, typer.Option("--frames", min=2, help="Frames, both ends included.")] = 8,
    checkpoints: CheckpointsOpt = DEFAULT_PIPELINE,
    out: Annotated[Optional[Path], typer.Option("--out", help="Default: outputs/<from>-to-<to>/")] = None,
    seed: SeedSampleOpt = 0, sampler: SamplerOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None, upsampler_steps: UpsamplerStepsOpt = None,
    upsampler_strength: UpsamplerStrengthOpt = None, device: SampleDeviceOpt = Device.auto,
) -> None:
    """Slerp between two CLIP image embeddings (of prompts, through the prior, or of images) and decode each frame."""
    from t2i.folders import interpolate_to_folder

    settings = sampling_settings(sampler, steps=steps, guidance=guidance, prior_guidance=prior_guidance,
                                 upsampler_steps=upsampler_steps, upsampler_strength=upsampler_strength)
    with progress_bar("sampling") as bar:
        folder = interpolate_to_folder(source, target, frames, checkpoints, out, settings, seed, device.value, progress=bar)
    console.print(f"wrote {frames} frames, strip.png and interpolation.gif to {folder}/")


@command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="127.0.0.1 keeps the page on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 7860,
    checkpoints: Annotated[Optional[list[str]], typer.Option("--checkpoints", help="Pipeline folders to offer besides the shipped ones (repeatable; the first is the default).")] = None,
    device: SampleDeviceOpt = Device.auto,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Most images one request may ask for.")] = 64,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait behind the one computing; more get 429.")] = 8,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="A host name requests may address the server by, besides localhost and --host (repeatable; * for any).")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Require this token (made up and printed when --host is not this machine's).")] = None,
) -> None:
    """A local web page (prompt, negative prompt, seed, steps, guidance; live denoising; variations on a click;
    interpolation) and GET /api/generate for scripts."""
    import secrets

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"t2i serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from t2i.server.app import create_app, pipeline_sources
    from t2i.server.guard import LOCAL_HOSTS, is_local

    local = is_local(host)
    if not local and token is None:
        token = secrets.token_urlsafe(24)  # beyond this machine, never without one (as Jupyter does)
    everywhere = host in ("0.0.0.0", "::", "")
    hosts = ("*",) if everywhere else (*LOCAL_HOSTS, host, *(allow_host or []))
    app_ = create_app(pipeline_sources(checkpoints or []), device.value, max_images, max_queue=max_queue,
                      allowed_hosts=hosts, token=token)
    shown = "127.0.0.1" if everywhere else f"[{host}]" if ":" in host else host
    console.print(f"t2i serving on http://{shown}:{port}/{f'?token={token}' if token else ''} (Ctrl-C stops)"
                  + ("" if local else "; it is reachable from other machines: share that address only with whom you trust"),
                  highlight=False, soft_wrap=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


# Commands that hold nothing open once they return: their images are written and closed, so the process may end
# without Python's teardown, which unloading PyTorch makes 0.4 s or more (docs/results/generation-time.md).
FAST_EXIT = {"generate", "vary", "interpolate"}


def run() -> None:
    """The `t2i` command: the Typer app, and after a sampling command an immediate exit with its status."""
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if name not in FAST_EXIT:
        return app()
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
