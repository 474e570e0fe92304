"""One config dataclass per stage, split into what rebuilds the model and what drives training.

A stage config is saved as `config.yaml` beside its weights. Loading is strict: an unknown key or a
value of the wrong type raises `ConfigError` naming the key, so a typo never silently falls back to
a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml

from unclip.errors import ConfigError


def choice(default: str, *others: str):
    """A string field that takes one of a fixed set of values, checked when a config loads."""
    return field(default=default, metadata={"choices": (default, *others)})


def check_objective(m) -> None:
    """A diffusion stage's model config: min-SNR weighting is for eps, x0 and v (it weights by the timestep's SNR)."""
    if m.prediction == "flow" and m.min_snr_gamma is not None:
        raise ConfigError("min_snr_gamma weights eps, x0 and v losses; flow matching (prediction: flow) weights its "
                          "timesteps by drawing them logit-normal: set min_snr_gamma: null")


@dataclass
class TrainConfig:
    """What drives a training run; nothing here is needed to rebuild the model."""

    data: str = "mnist"  # a spec of unclip.data.SOURCES: mnist, scenes, folder:PATH, coco:ROOT, parquet:PATH, ...
    data_dir: Optional[str] = None  # where IDX files live (default: the per-user cache)
    image_column: str = "image"  # parquet: the columns of the images and the captions
    text_column: str = "text"
    # COCO, parquet, webdataset: stream the training split from the source (unclip/data/stream.py) rather than
    # decode it into memory; None: stream when its decoded images would take more than 2 GiB
    stream: Optional[bool] = None
    workers: int = 2  # DataLoader processes decoding a streamed source, per training process
    epochs: int = 4
    max_steps: Optional[int] = None  # overrides epochs when set
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    device: str = choice("auto", "cpu", "cuda")
    # bf16: the forward and loss under bfloat16 autocast (weights, gradients and optimizer stay float32), for models
    # big enough to be bound by arithmetic; ours are not, and it was slower on the CPU and the GPU (docs/guides/gpu.md)
    precision: str = choice("fp32", "bf16")
    ema_decay: float = 0.0  # 0 disables EMA
    val_size: int = 5000  # images held out of train for validation
    log_every: int = 25
    ckpt_every: int = 500
    sample_every: int = 0  # 0: only at the end (stages that sample)
    tensorboard: bool = False  # also log to OUT/tensorboard (the tensorboard extra)
    # fine-tuning: a stage folder (or a pipeline folder / shipped name holding one of this stage's name) whose
    # weights start the run; layers it lacks (newly configured ones) start as they are built. Ignored by --resume.
    init: Optional[str] = None


@dataclass
class ClipModelConfig:
    """The contrastive image/text encoders (stage one)."""

    image_channels: int = 1
    image_size: int = 28
    image_patch: int = 1  # pixels folded into channels before the stem (space-to-depth), as in the decoder
    image_widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # per resolution level
    image_blocks: int = 1  # residual blocks per level
    # mean: average the last feature map (loses where things are); attention: CLIP's ResNet pooling, the mean
    # feature querying every position through attention over a learned positional embedding
    image_pool: str = choice("mean", "attention")
    # Transformer layers over the last feature map's positions, each given a learned positional embedding, before
    # the pooling: they make features of what *and* where (a pooled sum of what-features and where-features cannot
    # tell "a 3 left of a 7" from "a 7 left of a 3"). They start as the identity, so `--init` from a CLIP without them works.
    image_layers: int = 0
    text_context: int = 16  # tokens, start and end included; longer captions are truncated
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    init_temperature: float = 0.07


@dataclass
class OpenClipConfig:
    """A pretrained open_clip model as stage one (`t2i clip-import`), frozen: its architecture as open_clip's
    model-config JSON files write it, and the preprocessing its vision tower was trained with. The stage's
    `model` section then says what the pipeline's images are (`image_channels`, `image_size`) and what the
    text tower gives the prior (`text_context`, `text_width`, `embed_dim`)."""

    model: dict = field(default_factory=dict)  # embed_dim, vision_cfg, text_cfg, ...
    name: str = ""  # the architecture name or JSON file it came from, for the record
    image_size: int = 224  # the vision tower's input side
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])  # OpenAI's
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = choice("bicubic", "bilinear")


@dataclass
class ClipConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, batch_size=256, lr=2e-3))
    # Zero-shot prompt: filled with each class name.
    template: str = "a handwritten {}"
    # NegCLIP (Yuksekgonul et al. 2023): each caption's minimally changed twin (colours swapped, places
    # swapped, a digit or the count changed) joins the batch as an extra negative text; scenes only.
    hard_negatives: bool = False
    # ... and each negative caption's scene, drawn, joins the batch as an example of its own (NegCLIP's hard negative
    # images): the image tower too must then tell a scene from its twin (with text negatives alone both towers of the
    # first scenes CLIP stayed bags of words: a scene and its colour-swapped twin at cosine 0.99). Needs hard_negatives.
    hard_negative_images: bool = False
    # weight of twin_direction_loss (unclip/models/clip.py): each scene's change from its twin, in the image tower,
    # must point the way of its caption's change in the text tower. Needs hard_negative_images.
    twin_direction: float = 0.0
    open_clip: Optional[OpenClipConfig] = None  # set by t2i clip-import: a pretrained open_clip model, frozen


@dataclass
class TextConfig:
    """A frozen pretrained text encoder from Hugging Face `transformers` (T5's encoder, BERT, a CLIP text model) as
    the caption encoder of stage two (`t2i text-import`). Its model config as transformers writes it (config.json) is
    saved here, so the stage builds without the folder it came from; its tokenizer's files are kept in tokenizer/."""

    model: dict = field(default_factory=dict)  # config.json: model_type, d_model or hidden_size, ...
    name: str = ""  # the folder it was imported from, for the record
    context: int = 64  # tokens a caption is cut to (its special tokens included)
    # the caption's embedding, which the prior reads beside the token features: their mean over the caption's
    # tokens (Sentence-T5's choice for T5's encoder), or the first token's (BERT's [CLS])
    pooling: str = choice("mean", "first")


@dataclass
class TextEncoderDims:
    """The caption encoder a stage of stage two was trained against, where a pipeline has one of its own (text/, from
    `t2i text-import`) rather than reading CLIP's text tower: its sizes and fingerprint, set when the stage trains."""

    embed_dim: int = 0  # the caption embedding's width
    width: int = 0  # the token features' width
    context: int = 0
    fingerprint: str = ""  # of its weights, checked when the pipeline loads


@dataclass
class PriorModelConfig:
    """DALL-E 2 style diffusion prior: a Transformer over the caption and the noised image embedding."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    timesteps: int = 1000
    schedule: str = choice("cosine", "linear", "rectified")
    # DALL-E 2 predicts x0; on MNIST v spreads its samples closer to the real embeddings (docs/results/mnist.md, "The prior").
    prediction: str = choice("v", "x0", "eps", "flow")
    # diffuse the image embeddings whitened by what the captions leave open (the residual covariance of a linear fit
    # on the text embeddings, fitted when training starts and saved with the weights), so that the unit-variance
    # noise meets unit-variance data in every direction: the prior learns the spread in a few hundred steps where it
    # took thousands (docs/results/mnist-from-scratch.md, "A prior that learns the spread"). Off for priors trained before it existed.
    whiten: bool = False
    cond_drop: float = 0.1  # probability of dropping the text condition (classifier-free guidance)
    min_snr_gamma: Optional[float] = None  # as the decoder's
    distilled_steps: int = 0  # as the decoder's: set by t2i distill --stage prior
    distilled_guidance: float = 1.0  # as the decoder's

    def __post_init__(self):
        check_objective(self)


@dataclass
class PriorConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    # 100 epochs: in a few the prior only learns each caption's typical embedding (docs/results/mnist.md, "The prior")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, batch_size=512, lr=1e-3, ema_decay=0.999))
    clip_fingerprint: str = ""  # of the CLIP weights this stage was trained against
    text: Optional[TextEncoderDims] = None  # the pipeline's own caption encoder it reads, if not CLIP's text tower


@dataclass
class DecoderModelConfig:
    """Pixel-space U-Net conditioned on a CLIP image embedding."""

    image_channels: int = 1  # set from CLIP when training
    image_size: Optional[int] = None  # None: what CLIP sees; smaller makes the base of a cascade (DALL-E 2: 64 of 1024)
    patch: int = 2  # pixels folded into channels before the first level (space-to-depth)
    widths: list[int] = field(default_factory=lambda: [32, 64])  # per resolution level
    blocks: int = 2  # residual blocks per level (the up path gets one more)
    context_tokens: int = 4  # CLIP embedding -> this many tokens attended to at the lowest level
    heads: int = 4
    timesteps: int = 1000
    # rectified: alpha-bar of rectified flow's straight path, evenly spaced along it (unclip/diffusion/schedule.py)
    schedule: str = choice("cosine", "linear", "rectified")
    # flow: rectified flow's velocity, trained by flow matching at logit-normal times (SD3; unclip/diffusion/flow.py),
    # sampled by every sampler (DDIM's step is its Euler step); every diffusion stage (prior, upsampler) takes it too
    prediction: str = choice("v", "x0", "eps", "flow")
    cond_drop: float = 0.1
    dropout: float = 0.0
    # min-SNR-gamma loss weighting (Hang et al. 2023; 5 there): each timestep's x0 error weighted by min(SNR, gamma),
    # written for `prediction`'s own target; None: the plain loss of that target (v's weights the x0 error by SNR + 1)
    min_snr_gamma: Optional[float] = None
    # GLIDE's text conditioning, kept by DALL-E 2 (sec. 2.1): the caption's CLIP token features join the context
    # the lowest-resolution attention reads; while training the caption alone is dropped `text_drop` of the time.
    text_tokens: bool = False
    text_drop: float = 0.5
    # the CLIP embedding alone dropped this fraction of the time, the caption kept (DALL-E 2 drops the two
    # independently, the embedding 10% of the time): the caption's pathway must then draw on its own, as GLIDE's does
    embed_drop: float = 0.0
    # GLIDE trains its text encoder with the decoder: this many bidirectional Transformer layers over the token
    # features (CLIP's are causal, so a word there cannot see the digit it describes after it); 0 reads them as they are.
    text_layers: int = 0
    # levels (0: the first, after the patch fold) whose every residual block is followed by a cross-attention from
    # the pixels, each with a learned position, to the context: where the caption says what goes where.
    text_levels: list[int] = field(default_factory=list)
    # levels whose every residual block is followed by a self-attention over the pixels (and the context), as
    # GLIDE's at 32, 16 and 8 px: what lets one part of the image know what another has drawn; the lowest level's
    # middle block always has one
    attn_levels: list[int] = field(default_factory=list)
    # TokenCompose's grounding loss (Wang et al. 2024), this times the diffusion loss: each caption word that names
    # objects (a digit, a colour) should put its cross-attention, at every text level, on those objects' boxes;
    # for data whose captions say which object each word names (--data scenes). 0: none
    ground_weight: float = 0.0
    # read a layout (unclip/models/layout.py: each object's label fields and box, painted as a map beside x_t): the
    # true one of each training image, dropped `layout_drop` of the time (and with every condition) so that the
    # decoder still draws without one; at sampling the pipeline's layout stage writes it from the caption.
    # Needs text_tokens and data whose scenes say where each object is (--data scenes).
    layout: bool = False
    layout_drop: float = 0.1
    layout_fields: list[int] = field(default_factory=list)  # each label field's number of values, set from the data
    # set by t2i distill: the network samples with DDIM in exactly this many steps (a trailing chain); 0 = any
    distilled_steps: int = 0
    # set by t2i distill: the guidance its first teacher's chain was drawn with, now in the weights (the distilled
    # pipeline's sampling.yaml then says 1; a guidance above 1 guides again on top of it)
    distilled_guidance: float = 1.0
    # draw in the latent space of the pipeline's autoencoder (t2i decoder-train --autoencoder), set when training:
    # image_channels and image_size are then the latents', and the pipeline decodes the result to pixels
    latent: bool = False

    def __post_init__(self):
        check_objective(self)


@dataclass
class DecoderConfig:
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=128, lr=1e-3, warmup_steps=200,
                                                                   ema_decay=0.999, sample_every=1000))
    clip_fingerprint: str = ""
    text: Optional[TextEncoderDims] = None  # as the prior's
    autoencoder_fingerprint: str = ""  # a latent decoder's: of the autoencoder whose latents it draws


@dataclass
class UpsamplerModelConfig(DecoderModelConfig):
    """A diffusion upsampler (Cascaded Diffusion Models, Ho et al. 2021; DALL-E 2's 64 -> 256 -> 1024):
    the decoder's U-Net drawing `image_size` pixels, given the base image (`low_size`, set from the decoder
    when training) upsampled and degraded. Like DALL-E 2's, it reads neither the caption nor CLIP.

    Degradation while training (what makes it robust to the base decoder's mistakes): a Gaussian blur of
    sigma drawn in [0, blur_max] px (DALL-E 2), then noise-conditioning augmentation: the low-resolution image
    is diffused to a level s drawn in [0, aug_max] of the schedule, and s is an input. Sampling uses aug_level."""

    image_size: int = 64
    low_size: Optional[int] = None
    # a local task, so a narrow network; but at patch 4 its 32 channels cannot hold a 4x4x3 patch's detail
    # (on scenes its samples stayed noisy, loss 0.27 after 1,700 steps), so patch 2
    patch: int = 2
    widths: list[int] = field(default_factory=lambda: [32, 64])
    cond_drop: float = 0.0  # no condition to drop: the low-resolution image is always given
    blur_max: float = 1.0
    aug_max: float = 0.3  # fraction of the timesteps
    aug_level: float = 0.1  # the augmentation level applied (and told) at sampling


@dataclass
class UpsamplerConfig:
    model: UpsamplerModelConfig = field(default_factory=UpsamplerModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=64, lr=1e-3, warmup_steps=200,
                                                                   ema_decay=0.999, sample_every=1000))


@dataclass
class AutoencoderModelConfig:
    """A convolutional autoencoder (the first stage of Rombach et al. 2022, as small as TAESD): images -> latents of
    `latent_channels` at 1/(patch x 2^(len(widths) - 1)) of the side -> images, for a decoder that draws in latent space.

    KL-regularised: the encoder gives a Gaussian per latent element; the decoder learns from samples of it, with the KL
    to N(0, I) weighted by `kl_weight`, so that latents near each other decode alike; at use the latent is its mean,
    shifted and scaled per channel to zero mean and unit variance over training images (saved with the weights)."""

    image_channels: int = 3  # the images it encodes: 3 (colour) or 1
    image_size: int = 64
    patch: int = 2  # pixels folded into channels before the first level (space-to-depth), as the decoder's
    widths: list[int] = field(default_factory=lambda: [64, 128])  # per level; each level after the first halves
    blocks: int = 1  # residual blocks per level, each side
    latent_channels: int = 4
    kl_weight: float = 1e-6


@dataclass
class AutoencoderConfig:
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000, batch_size=32, lr=5e-4, warmup_steps=100,
                                                                   ema_decay=0.999, val_size=500, ckpt_every=250))


@dataclass
class LayoutModelConfig:
    """The layout stage (unclip/models/layout.py): a Transformer decoder writing a caption's objects, each its
    label fields then its box, reading the caption's CLIP token features through cross-attention."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    # bidirectional layers over the caption's token features first (GLIDE's text encoder, as the decoder's
    # text_layers): CLIP's text tower is causal, so a digit's token knows nothing of the relation named after it
    text_layers: int = 2
    max_objects: int = 4  # set from the data when training
    fields: list[int] = field(default_factory=list)  # each label field's number of values, set from the data
    field_names: list[str] = field(default_factory=list)  # what they are (scenes: digit, colour), set from the data


@dataclass
class LayoutConfig:
    model: LayoutModelConfig = field(default_factory=LayoutModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=3000, batch_size=256, lr=1e-3,
                                                                   warmup_steps=100, ckpt_every=500))
    # the chance that a training caption gets a stray word (a word of the tokenizer's vocabulary that the data's
    # captions never use) at a random place, and again for each next one: the stage learns to pass over words it
    # does not know, as in "exactly three 7s" (held-out phrasings)
    stray_words: float = 0.0
    clip_fingerprint: str = ""
    text: Optional[TextEncoderDims] = None  # as the prior's


@dataclass
class DistillConfig:
    """Progressive distillation of a pipeline's decoder or prior (Salimans & Ho 2022): round after round a student,
    started from its teacher's weights, learns to take in one DDIM step what the teacher takes in two, until it
    samples in `steps`. `train` is each round's."""

    stage: str = choice("decoder", "prior")
    teacher_steps: int = 16  # the first teacher's chain: the stage's DDIM over trailing timesteps
    steps: int = 2  # the last student's (the shipped one's); teacher_steps / steps must be a power of two
    # the teacher's classifier-free guidance, learnt by the students (Meng et al. 2023), who then sample at
    # `student_guidance` (the distilled pipeline's sampling.yaml says so); None: the teacher pipeline's own default for
    # the stage (its sampling.yaml's guidance, or prior_guidance)
    guidance: Optional[float] = None
    # the guidance the distilled pipeline's sampling.yaml gives its student: classifier-free guidance on top of the
    # learnt one (the student learns the unconditional chain too, its conditions dropped as in training)
    student_guidance: float = 1.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, batch_size=128, lr=2e-4, warmup_steps=50,
                                                                   ema_decay=0.999, ckpt_every=250))


DEFAULT_PIPELINE = "mnist"  # the shipped pipeline t2i draws with when none is named (CLI, API, web app)
T = TypeVar("T")


def _check(tp: Any, value: Any, where: str) -> Any:
    """Validate (and lightly coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is dict:  # free-form (an open_clip model config), checked by whoever reads it
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]} ({hint}known: {', '.join(sorted(names))})")
    kwargs = {k: _check(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    for f in dataclasses.fields(cls):
        options = f.metadata.get("choices")
        if options and f.name in kwargs and kwargs[f.name] not in options:
            raise ConfigError(f"{where + '.' if where else ''}{f.name}: {kwargs[f.name]!r} is not one of {', '.join(options)}")
    return cls(**kwargs)


def merge(base: Any, overrides: dict) -> Any:
    """Return a copy of dataclass `base` with nested `overrides` applied (validated like YAML)."""
    data = dataclasses.asdict(base)

    def deep(d: dict, o: dict) -> dict:
        for k, v in o.items():
            d[k] = deep(dict(d[k]), v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return d

    return from_dict(type(base), deep(data, overrides))


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:  # where: the line and column YAML stopped at
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def sections() -> dict[str, type]:
    """The sections of a pipeline YAML and their dataclasses: every registered stage's (unclip.components), and
    distillation's."""
    from unclip.components import STAGES  # the registry imports this module

    return {**{name: spec.config for name, spec in STAGES.items()}, "distill": DistillConfig}


def stage_section(data: dict, stage: str) -> dict:
    """A config file holds one stage's config, or a pipeline file with `clip:`/`prior:`/`decoder:` sections (and
    optionally `sampling:`, the sampling defaults `t2i decoder-train` writes beside the stages as sampling.yaml)."""
    if data and set(data) <= set(sections()) | {"sampling"}:
        return data.get(stage) or {}
    return data


def load_config(cls: type[T], path: Optional[Path]) -> T:
    """Load a stage config from YAML (or the defaults when `path` is None), strictly."""
    if path is None:
        return cls()
    stage = next(k for k, v in sections().items() if v is cls)
    try:
        return merge(cls(), stage_section(load_yaml(path), stage))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
