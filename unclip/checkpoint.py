"""A checkpoint is a folder: `config.yaml` (the resolved stage config) beside `model.safetensors`.

Every file is written to a temporary name and renamed, so a crash mid-write leaves the previous
version intact. Loading rebuilds the model from the YAML and loads the weights strictly.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unclip.config import DEFAULT_PIPELINE, load_config, to_yaml
from unclip.errors import CheckpointError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
T = TypeVar("T")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: `.NAME.XXXX.tmp` beside NAME
WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")  # torch.save's words for ENOSPC


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, flush it to the disk (fsync) and rename it onto `path` (same folder, so the rename is
    atomic), then fsync the folder so the rename itself survives a power cut. A write that fails for want of space
    or permission is a one-line CheckpointError naming the folder; `path` keeps its previous version."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as e:
        raise unwritable(path.parent, e) from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in WRITE_FAILED)):
            raise unwritable(path.parent, e) from None
        raise


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(folder: Path, e: BaseException) -> CheckpointError:
    """A failed write as one line naming the folder: no space, no permission, a read-only disk."""
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror.lower()
    else:  # torch.save says only "unexpected pos": say what the disk has left
        try:
            why = f"the write failed with {shutil.disk_usage(folder).free / 2**20:.1f} MiB free on its disk"
        except OSError:
            why = "the write failed"
    return CheckpointError(f"cannot write to {folder}: {why}; what was saved there before is intact")


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries a killed save left in `folder` (`.NAME.XXXX.tmp`); how many there were."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict, independent of storage precision (fp32 and fp16 copies agree)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = t.half() if t.is_floating_point() else t
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(folder: Path, model: torch.nn.Module, config, dtype: Optional[torch.dtype] = None) -> None:
    """Write `config.yaml` and `model.safetensors` into `folder`, floats cast to `dtype` if given."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in seen:  # tied weights (T5's embeddings): safetensors stores each once
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        state[k] = v
    folder = Path(folder)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write_text(folder / CONFIG_FILE, to_yaml(config))


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (train the stage first, or pass the right folder)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); retrain or restore it") from None


def load_checkpoint(folder: Path, config_cls: type[T], build: Callable[[T], torch.nn.Module]) -> tuple[torch.nn.Module, T]:
    """Rebuild a model from `folder/config.yaml` with `build(config)` and load its weights strictly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}")
    config = load_config(config_cls, folder / CONFIG_FILE)
    model = build(config)
    state = load_state(folder)
    reference = model.state_dict()
    differ = {"missing": sorted(reference.keys() - state.keys()), "not in the model": sorted(state.keys() - reference.keys()),
              "of another shape": sorted(k for k in reference.keys() & state.keys() if reference[k].shape != state[k].shape)}
    if any(differ.values()):  # a config edited by hand, or weights saved by another version of t2i
        said = "; ".join(f"{len(keys)} {what} ({keys[0]}{', ...' if len(keys) > 1 else ''})" for what, keys in differ.items() if keys)
        raise CheckpointError(f"{folder}: weights do not match {CONFIG_FILE}: {said}")
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=True)
    return model, config


SAMPLING_FILE = "sampling.yaml"  # a pipeline folder's own sampling defaults (unclip.options.load_sampling)
SHIPPED_PACKAGE = "t2i.checkpoints"  # the repository's checkpoints/ folder, installed as package data


def shipped_root() -> Path:
    """Where the shipped pipelines are: the installed package data, or checkpoints/ beside a source checkout."""
    try:
        return Path(str(importlib.resources.files(SHIPPED_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "checkpoints"


def shipped_pipelines() -> list[str]:
    """The shipped pipelines' names, the default (`DEFAULT_PIPELINE`) first."""
    root = shipped_root()
    names = [p.name for p in root.iterdir() if (p / "clip").is_dir()] if root.is_dir() else []
    return sorted(names, key=lambda name: (name != DEFAULT_PIPELINE, name))


def resolve_folder(spec: str | Path, stage: Optional[str] = None) -> Path:
    """A checkpoint folder from a path, or from the name of a shipped pipeline (`mnist`; with `stage`,
    that pipeline's stage folder, so `--clip mnist` works as well as `--clip path/to/clip`)."""
    path = Path(spec)
    if path.is_dir():
        return path
    if len(path.parts) == 1 and str(spec) in shipped_pipelines():
        return shipped_root() / str(spec) / (stage or "")
    raise CheckpointError(f"checkpoint folder not found: {spec} (a folder, or a shipped pipeline: "
                          f"{', '.join(shipped_pipelines()) or 'none installed'})")


def check_fingerprint(stage_folder: Path, recorded: str, clip_print: str) -> None:
    if recorded and recorded != clip_print:
        raise CheckpointError(
            f"{stage_folder} was trained against a different CLIP (fingerprint {recorded}, the CLIP beside it is "
            f"{clip_print}); retrain it against this CLIP"
        )



SHIPPED_EXTRAS = ("vocabulary.txt",)  # what a stage folder may hold beside its config and weights, and ships
SHIPPED_DIRS = ("tokenizer",)  # ... and folders (a text/ encoder's tokenizer files)


def copy_extra_dirs(src: Path, dst: Path) -> None:
    for name in SHIPPED_DIRS:
        if (Path(src) / name).is_dir():
            shutil.copytree(Path(src) / name, Path(dst) / name, dirs_exist_ok=True)


def copy_stage(src: Path, dst: Path) -> None:
    """Copy a stage folder's `config.yaml` and `model.safetensors` (and its vocabulary, its tokenizer) as they are
    (no training state)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, *SHIPPED_EXTRAS):
        if name in SHIPPED_EXTRAS and not (Path(src) / name).is_file():
            continue
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    copy_extra_dirs(src, dst)


def export_stage(src: Path, dst: Path, dtype: Optional[torch.dtype] = torch.float16) -> None:
    """Copy a stage folder's `config.yaml` and `model.safetensors`, floating-point weights stored as `dtype`."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in load_state(src).items()}
    atomic_write(Path(dst) / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write_text(Path(dst) / CONFIG_FILE, (Path(src) / CONFIG_FILE).read_text())
    for name in SHIPPED_EXTRAS:
        if (Path(src) / name).is_file():
            atomic_write_text(Path(dst) / name, (Path(src) / name).read_text())
    copy_extra_dirs(src, dst)


def export_pipeline(src: Path, dst: Path, dtype: Optional[torch.dtype] = torch.float16) -> None:
    """Copy a pipeline folder's shippable files (`config.yaml` + `model.safetensors` of clip/, prior/,
    decoder/, and upsampler/ and layout/ if any, and its sampling.yaml if it has one), floating-point weights stored as
    `dtype`; training state, metrics and samples stay behind. The CLIP fingerprint does not depend on storage precision, so the stages still
    recognise their CLIP. A single stage's folder (a CLIP run, to train stage two against) is exported alike."""
    if (Path(src) / WEIGHTS_FILE).is_file():
        return export_stage(src, dst, dtype)
    from unclip.components import REQUIRED, STAGES  # the registry imports this module

    for stage in REQUIRED:
        if not (Path(src) / stage / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{src} lacks {stage}/{WEIGHTS_FILE} (and is no stage folder: no {WEIGHTS_FILE})")
    for stage in STAGES:
        if (Path(src) / stage / WEIGHTS_FILE).is_file():
            export_stage(Path(src) / stage, Path(dst) / stage, dtype)
    if (Path(src) / SAMPLING_FILE).is_file():
        atomic_write_text(Path(dst) / SAMPLING_FILE, (Path(src) / SAMPLING_FILE).read_text())
