"""`t2i tune`: a hyperparameter search over one stage's config with Optuna, on the validation split.

A search space is YAML mapping config fields by dotted name to a range or a list of choices:

    train.lr: {low: 1e-4, high: 3e-3, log: true}
    model.embed_dim: {choices: [64, 128]}
    model.widths: {choices: [[16, 32], [32, 64]]}

Each trial trains the stage under the budget of the config (`train.max_steps` or `train.epochs`, from the
space, the config or the flags) into `OUT/trial_NNN/`, reporting its validation metric at every validation to
Optuna, whose median pruner stops trials that fall behind. The study lives in `OUT/study.db` (SQLite), so the
same command run again resumes it: it counts the finished and pruned trials against `--trials`, and a trial
that was interrupted is run again with its parameters, continuing from its folder. The test split never takes
part; `evaluate_best` trains the best config once more and reports it on the test split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from t2i.stages.trainer import STATE_FILE, Stage, fit
from unclip.checkpoint import atomic_write_text, load_state
from unclip.components import STAGES
from unclip.config import ClipConfig, load_config, load_yaml, merge
from unclip.data import load_split
from unclip.errors import ConfigError, UserError

log = logging.getLogger(__name__)
STUDY_FILE = "study.db"
BEST_FILE = "best.yaml"
# The trials share their data (loaded, and for stage two embedded by CLIP, once), so these are not searched.
SHARED = ("train.data", "train.data_dir", "train.val_size", "train.device", "train.image_column", "train.text_column")
TUNABLE = ("clip", "prior", "decoder", "upsampler")  # the stages `stage_search` knows how to train and score


class Interrupted(Exception):
    """A trial was stopped by SIGINT/SIGTERM; its folder holds what `--resume` continues from."""


def nested(name: str, value: Any) -> dict:
    """"train.lr", 1e-3 -> {"train": {"lr": 1e-3}}."""
    for key in reversed(name.split(".")):
        value = {key: value}
    return value


def field_type(cls: type, name: str) -> Any:
    """The annotation of the dotted field `name` of config dataclass `cls`, or a ConfigError naming what exists."""
    tp, where = cls, []
    for key in name.split("."):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(where)} has no fields, so {name} is not a config field")
        hints = typing.get_type_hints(tp)
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"{name}: no field {key!r} in {'.'.join(where) or 'the config'} (fields: {known})")
        tp, where = hints[key], where + [key]
    return tp


def as_number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_space(path: Path, base: Any) -> dict[str, dict]:
    """Read and check a search space against the stage config `base`, before any trial runs."""
    space = load_yaml(path)
    if not space:
        raise ConfigError(f"{path}: the search space is empty")
    for name, spec in space.items():
        where = f"{path}: {name}"
        if name in SHARED:
            raise ConfigError(f"{where}: the trials share their data, so {name} cannot be searched")
        try:
            tp = field_type(type(base), name)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise ConfigError(f"{where}: give {{low: .., high: ..}} (with log: true or step: ..) or {{choices: [..]}}")
        unknown = set(spec) - {"choices", "low", "high", "log", "step"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (use low, high, log, step or choices)")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            values = spec["choices"]
        else:
            low, high = (as_number(spec[k]) for k in ("low", "high"))
            spec["low"], spec["high"] = low, high
            if tp not in (int, float, Optional[int], Optional[float]):
                raise ConfigError(f"{where}: a range needs a numeric field; give choices for it")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
            if low > high:
                raise ConfigError(f"{where}: low {low} is above high {high}")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
            values = [low, high]
        for value in values:  # each value must fit the field: the same strict check a config file gets
            try:
                merge(base, nested(name, value))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    return space


def suggest(trial, space: dict[str, dict], base: Any) -> dict[str, Any]:
    """The trial's values of the space's fields (lists and other non-scalars go through Optuna as JSON)."""
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            encoded = [json.dumps(c) for c in spec["choices"]]
            values[name] = json.loads(trial.suggest_categorical(name, encoded))
        elif field_type(type(base), name) in (int, Optional[int]):
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                             log=bool(spec.get("log", False)))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               step=spec.get("step"), log=bool(spec.get("log", False)))
    return values


def with_values(base: Any, values: dict[str, Any]) -> Any:
    cfg = base
    for name, value in values.items():
        cfg = merge(cfg, nested(name, value))
    return cfg


@dataclass
class Search:
    """What a stage's search needs: its base config, and how to build its stage on a split."""

    stage: str
    base: Any
    build: Callable[[Any, str], Stage]  # (config, "val" | "test") -> Stage


def stage_search(stage: str, config_path: Optional[Path], flags: dict, clip: Optional[Path],
                 pipeline: Optional[Path]) -> Search:
    """The base config (defaults, config file, flags) of `stage`, and its data loaded once for every trial."""
    if stage == "clip":
        from t2i.stages.clip import clip_stage

        return Search(stage, merge(load_config(ClipConfig, config_path), flags), clip_stage)
    if stage in ("prior", "decoder"):
        if clip is None:
            raise UserError(f"tuning the {stage} needs the CLIP it is trained against: --clip DIR")
        from t2i.stages.decoder import decoder_stage
        from t2i.stages.frozen_clip import FrozenClip
        from t2i.stages.prior import prior_stage
        from t2i.stages.stage_two import stage_config
        from unclip.checkpoint import CONFIG_FILE, resolve_folder

        clip = resolve_folder(clip, "clip")
        if not (clip / CONFIG_FILE).is_file():
            raise UserError(f"--clip {clip}: not a CLIP checkpoint folder (no {CONFIG_FILE})")
        clip_cfg = load_config(ClipConfig, clip / CONFIG_FILE)
        base = stage_config(STAGES[stage].config, stage, clip_cfg, config_path, flags)
        frozen = FrozenClip.load(clip, base.train)
        splits = {"val": frozen}

        def build(cfg, split: str) -> Stage:
            if split not in splits:
                m = clip_cfg.model
                splits[split] = replace(frozen, val=load_split(cfg.train, split, m.image_channels, m.image_size))
            return prior_stage(cfg, splits[split]) if stage == "prior" else decoder_stage(cfg, splits[split])

        return Search(stage, base, build)
    if stage == "upsampler":
        if pipeline is None:
            raise UserError("tuning the upsampler needs the pipeline it sharpens: --pipeline DIR")
        from t2i.stages.upsampler import upsampler_setup, upsampler_stage

        base, data, val = upsampler_setup(pipeline, config_path, flags)
        splits = {"val": val}

        def build(cfg, split: str) -> Stage:
            if split not in splits:
                splits[split] = upsampler_setup(pipeline, config_path, flags, split)[2]
            return upsampler_stage(cfg, data, splits[split])

        return Search(stage, base, build)
    raise UserError(f"unknown stage {stage!r}: use one of {', '.join(TUNABLE)}", param="stage")


@dataclass
class TuneResult:
    space: dict[str, dict]
    trials: list  # optuna FrozenTrials, in order
    objective: Optional[str]
    direction: str
    best: Optional[Any]  # the best FrozenTrial, if any finished
    best_yaml: Optional[Path]
    test: Optional[dict] = None  # the best config retrained, on the test split (evaluate_best)


def open_study(out: Path, stage: str, space: dict, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is told by `on_trial`, errors included
    if not (out / STUDY_FILE).exists() and any(out.glob("trial_*")):
        raise UserError(f"{out} holds trial folders but no {STUDY_FILE} (removed?): give the search a new --out")
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{out / STUDY_FILE}", study_name=f"t2i-{stage}", load_if_exists=True,
        direction=STAGES[stage].direction, pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    # seeded, and on a resumed study seeded anew past its trials, so it does not propose the first ones again
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", space)
    elif recorded != space:
        raise UserError(f"{out / STUDY_FILE} holds a study over another search space; use a new --out "
                        "(or the space it was started with)")
    return study


def recover(study) -> None:
    """Ready a resumed study: trials left RUNNING by a killed process become failed-and-interrupted, and every
    interrupted trial not yet taken up again is queued with its parameters to continue from its folder."""
    from optuna.trial import TrialState

    storage = study._storage  # Optuna's public Study API cannot change a trial that is not its own running one
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get("resume") for t in trials}
    for t in trials:
        folder = t.user_attrs.get("folder")
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and folder not in taken:
            study.enqueue_trial(t.params, user_attrs={"resume": folder})
            taken.add(folder)


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def tune(stage: str, space_path: Path, trials: int, out: Path, config_path: Optional[Path] = None,
         flags: Optional[dict] = None, clip: Optional[Path] = None, pipeline: Optional[Path] = None,
         timeout_min: Optional[float] = None, evaluate_best: bool = False,
         on_trial: Optional[Callable[[Any, Optional[str], dict], None]] = None) -> TuneResult:
    """Run (or resume) the search of `stage` in `out` until `trials` trials have finished or been pruned;
    `on_trial(trial, objective, values)` hears of each trial as it ends."""
    try:
        import optuna
    except ImportError:
        raise UserError("t2i tune needs Optuna: pip install -e '.[tune]'") from None
    if stage not in TUNABLE:
        raise UserError(f"unknown stage {stage!r}: use one of {', '.join(TUNABLE)}", param="stage")
    space = load_space(space_path, STAGES[stage].config())  # checked before any data is loaded or trial runs
    search = stage_search(stage, config_path, flags or {}, clip, pipeline)
    out = Path(out)
    study = open_study(out, stage, space, search.base.train.seed)
    recover(study)
    found: dict[str, Optional[str]] = {"objective": study.user_attrs.get("objective")}

    def objective(trial) -> float:
        values = suggest(trial, space, search.base)
        cfg = with_values(search.base, values)
        resumed = trial.user_attrs.get("resume")  # an interrupted trial's folder, taken up again (recover)
        folder = Path(resumed or out / f"trial_{trial.number:03d}")
        trial.set_user_attr("folder", str(folder))
        built = search.build(cfg, "val")
        if found["objective"] is None:
            found["objective"] = built.objective
            study.set_user_attr("objective", built.objective)

        def report(val: dict) -> None:
            trial.report(val[built.objective], step=val["step"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            last = fit(built, cfg.train, folder, resume=bool(resumed) and (folder / STATE_FILE).is_file(),
                       on_validate=report)
        except UserError as e:  # the trial fails (a diverging lr, say) and the search goes on
            trial.set_user_attr("error", str(e))
            raise
        if last.get("interrupted"):
            trial.set_user_attr("interrupted", True)
            raise Interrupted(f"trial {trial.number} was interrupted ({folder} holds it); run the same command "
                              "again to resume the study")
        return last[built.objective]

    remaining = trials - finished(study)
    callbacks = [lambda s, t: on_trial(t, found["objective"], trial_values(t, space))] if on_trial else []
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=timeout_min * 60 if timeout_min else None,
                       catch=(UserError,), callbacks=callbacks)
    done = study.get_trials(deepcopy=False)
    best = best_trial(study)
    result = TuneResult(space, done, found["objective"], STAGES[stage].direction, best, None)
    if best is None:
        return result
    best_cfg = with_values(search.base, trial_values(best, space))
    result.best_yaml = out / BEST_FILE
    atomic_write_text(result.best_yaml, f"# t2i tune {stage}: trial {best.number}, {found['objective']} "
                                        f"{best.value:.6g} on the validation split\n"
                                        + yaml.safe_dump({stage: dataclasses.asdict(best_cfg)}, sort_keys=False))
    if evaluate_best:
        result.test = evaluate(search, best_cfg, out / "best")
    return result


def best_trial(study):
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(complete, key=lambda t: t.value)


def trial_values(trial, space: dict[str, dict]) -> dict[str, Any]:
    """A finished trial's values of the space's fields, as `suggest` gave them to its config."""
    return {k: json.loads(v) if "choices" in space[k] else v for k, v in trial.params.items()}


def evaluate(search: Search, cfg: Any, folder: Path) -> dict:
    """Train `cfg` once more (validated on the validation split, as in the search), then score its weights on
    the test split, which the search never saw."""
    last = fit(search.build(cfg, "val"), cfg.train, folder, resume=(folder / STATE_FILE).is_file())
    if last.get("interrupted"):
        raise Interrupted(f"the best config's run was interrupted ({folder} holds it); run the command again")
    test = search.build(cfg, "test")
    test.model.load_state_dict(load_state(folder))
    return test.validate(test.model)
