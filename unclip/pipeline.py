"""A pipeline folder's stages, loaded from the registry (unclip/components) and chained: text -> CLIP image
embedding (prior) -> [layout] -> image (decoder) [or latent (decoder) -> image (autoencoder)] -> [larger image
(upsampler)]."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from unclip.checkpoint import check_fingerprint, fingerprint, resolve_folder
from unclip.components import REQUIRED, STAGES
from unclip.components import autoencoder as autoencoder_stage
from unclip.components import layout as layout_stage
from unclip.components.autoencoder import to_latents
from unclip.components import upsampler as upsampler_stage
from unclip.components.clip import prompt_conditions
from unclip.components.decoder import decode, decoder_condition
from unclip.components.layout import sample_layouts
from unclip.components.prior import sample_image_embeddings
from unclip.components.text import check_reads, text_tokenizer
from unclip.components.upsampler import upsample
from unclip.device import resolve_device
from unclip.errors import CheckpointError
from unclip.options import SamplingOptions, load_sampling
from unclip.tokenizer import Tokenizer
from unclip.vocabulary import load_vocabulary


@dataclass
class Pipeline:
    """The stages of an unCLIP pipeline folder, by their registry names: `clip/`, `prior/`, `decoder/`; when the
    decoder draws a smaller image than the pipeline's output, `upsampler/` (DALL-E 2's cascade); when the decoder
    reads layouts, `layout/` (caption -> objects and boxes, drawn first); when it draws in latent space, the
    `autoencoder/` that decodes its latents; and any stage registered since.

    `pipe.prior` is what a stage samples with (a diffusion stage's `Diffusion`, else its network), `pipe.prior_config`
    its config; a stage the folder lacks reads as None."""

    stages: dict[str, object]
    configs: dict[str, object]
    tokenizer: Tokenizer
    device: torch.device
    defaults: SamplingOptions = field(default_factory=SamplingOptions)  # the folder's sampling.yaml, if any
    vocabulary: Optional[frozenset[str]] = None  # the words of its training captions (clip/vocabulary.txt), if saved
    text_tokenizer: Optional[object] = None  # its text/ encoder's tokenizer, where it has one

    def captions(self) -> tuple[torch.nn.Module, object]:
        """(encoder, tokenizer) that the pipeline reads captions with: its text/ encoder's, else CLIP's text tower's."""
        if self.text is not None:
            return self.text, self.text_tokenizer
        return self.clip, self.tokenizer

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "auto") -> "Pipeline":
        """A pipeline folder, or a shipped pipeline by name (`mnist`): every registered stage it holds."""
        folder = resolve_folder(folder)
        missing = [name for name in REQUIRED if not (folder / name).is_dir()]
        if missing:
            raise CheckpointError(f"{folder} lacks {', '.join(s + '/' for s in missing)} (a pipeline folder holds "
                                  f"{', '.join(s + '/' for s in REQUIRED)})")
        dev = resolve_device(device)
        stages, configs = {}, {}
        clip_print = None
        for name, spec in STAGES.items():
            if not (folder / name).is_dir() or not wanted(name, configs):
                continue
            stages[name], configs[name] = spec.open(folder / name, configs.get("clip"), dev)
            if name == "clip":
                clip_print = fingerprint(stages["clip"].state_dict())
            elif spec.clip_bound:
                check_fingerprint(folder / name, configs[name].clip_fingerprint, clip_print)
        text_print = fingerprint(stages["text"].state_dict()) if "text" in stages else None
        for name, cfg in configs.items():
            if STAGES[name].reads_captions(cfg):
                check_reads(name, cfg.text, text_print, folder / name)
        base = configs["decoder"]
        autoencoder_stage.check_fits(base, stages.get("autoencoder"), folder)
        if "upsampler" in configs:
            upsampler_stage.check_fits(configs["upsampler"], base_size(configs), folder / "upsampler")
        if "layout" in configs:
            layout_stage.check_fits(configs["layout"], base, folder / "layout")
        return cls(stages, configs, Tokenizer(configs["clip"].model.text_context), dev, load_sampling(folder),
                   load_vocabulary(folder / "clip"),
                   text_tokenizer(folder / "text", configs["text"]) if "text" in configs else None)

    def __getattr__(self, name: str):
        stage, is_config = _stage_attribute(name)
        if stage is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return (self.configs if is_config else self.stages).get(stage)

    def __setattr__(self, name: str, value) -> None:
        stage, is_config = _stage_attribute(name)
        if stage is None:
            return object.__setattr__(self, name, value)
        held = self.configs if is_config else self.stages
        if value is None:
            held.pop(stage, None)
        else:
            held[stage] = value

    @property
    def image_size(self) -> int:
        """The side of the images the pipeline draws (the upsampler's when there is one)."""
        return self.upsampler_config.model.image_size if self.upsampler else base_size(self.configs)

    @property
    def image_channels(self) -> int:
        """Its images' channels (CLIP's, which every pixel stage was trained on)."""
        return self.clip_config.model.image_channels

    @torch.no_grad()
    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A chain's images (a step callback's x0) as pixels: a latent decoder's decoded by the autoencoder."""
        if self.decoder_config.model.latent and x.shape[1:] == drawing_shape(self.decoder_config):
            return self.autoencoder.decode(x)
        return x


def base_size(configs: dict) -> int:
    """The side of the images the decoder draws: its own, or for a latent decoder its autoencoder's."""
    decoder = configs["decoder"]
    return configs["autoencoder"].model.image_size if decoder.model.latent else decoder.model.image_size


def drawing_shape(cfg) -> tuple[int, int, int]:
    """The shape of one drawing of a decoder of config `cfg`: (channels, side, side) of its pixels or latents."""
    m = cfg.model
    return (m.image_channels, m.image_size, m.image_size)


def _stage_attribute(name: str) -> tuple[Optional[str], bool]:
    """(stage, whether its config is meant) for `pipe.prior` / `pipe.prior_config`; (None, False) for other names."""
    stage = name.removesuffix("_config")
    return (stage, stage != name) if stage in STAGES else (None, False)


def wanted(name: str, configs: dict) -> bool:
    """Whether a stage the folder holds takes part: a layout stage only for a decoder that reads layouts."""
    return name != "layout" or configs["decoder"].model.layout


@torch.no_grad()
def decode_and_upsample(pipe: Pipeline, image_emb: torch.Tensor, options: SamplingOptions, generator: torch.Generator,
                        callback=None, noise: Optional[torch.Tensor] = None,
                        upsampler_noise: Optional[torch.Tensor] = None, text: Optional[tuple] = None,
                        negative: Optional[tuple] = None, init: Optional[torch.Tensor] = None,
                        strength: float = 1.0, layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP image embeddings (B, D) -> the pipeline's images (B, C, H, W) in [-1, 1]: the decoder, then the
    upsampler when the pipeline has one (for image-to-image, each starts from `init` at its own size; a latent
    decoder from its latents). `callback(i, t, x_t, x0)` is called after every step of both chains (a latent
    decoder's x0 are latents: `Pipeline.pixels` makes them images)."""
    latent = pipe.decoder_config.model.latent
    x = decode(pipe.decoder, pipe.decoder_config, image_emb, options.sampler, options.steps, options.guidance,
               generator, callback=callback, noise=noise, text=text, negative=negative,
               init=to_latents(pipe.autoencoder, init) if latent and init is not None else init, strength=strength,
               text_guidance=options.text_guidance, layout=layout)
    if latent:
        x = pipe.autoencoder.decode(x)
    if pipe.upsampler is None:
        return x
    init = init if strength < 1.0 else x
    return upsample(pipe.upsampler, pipe.upsampler_config, x, options.sampler, options.upsampler_steps, generator,
                    callback=callback, noise=upsampler_noise, init=init, strength=upsampler_strength(options, strength))


def upsampler_strength(options: SamplingOptions, strength: float = 1.0) -> float:
    """The upsampler's SDEdit strength: image-to-image's own (`strength` < 1, from the init image), else
    `options.upsampler_strength` (from the base image, enlarged)."""
    return strength if strength < 1.0 else options.upsampler_strength


def draw(pipe: Pipeline, captions: list[str], options: SamplingOptions, generator: torch.Generator,
         callback=None, negatives: Optional[list[str]] = None, init: Optional[torch.Tensor] = None,
         strength: float = 1.0, layouts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Captions -> images (B, C, H, W) in [-1, 1]: prior, layout stage (when the pipeline has one), decoder, upsampler.
    `layouts` (B, N, F): each caption's layout given (`unclip/layouts.py`), instead of the layout stage's.

    Negative prompts (one per caption) work as in Kandinsky 2.2: the prior's guidance steers away from their
    text condition, and the decoder's (when its guidance is not 1) away from their image embeddings."""
    embed = lambda texts, neg: sample_image_embeddings(  # noqa: E731
        *pipe.captions(), pipe.prior, texts, options.sampler, options.steps, options.prior_guidance,
        generator, options.prior_candidates, neg)
    emb = embed(captions, negatives)
    cond, neg = prompt_conditions(*pipe.captions(), captions, negatives)
    negative = None  # the caption's tokens go to decoders that read them (decoder_condition)
    if negatives is not None and options.guidance != 1.0:
        negative = decoder_condition(pipe.decoder_config, embed(negatives, None), neg[1:])
    layout = sample_layouts(pipe.layout, pipe.decoder_config, cond[1:], generator, options.layout_temperature,
                            options.layout_box_temperature, layouts)
    return decode_and_upsample(pipe, emb, options, generator, callback, text=cond[1:], negative=negative, init=init,
                               strength=strength, layout=layout)


def steps_per_image(pipe: Pipeline, options: SamplingOptions, strength: float = 1.0) -> int:
    """Network calls of the decoder and upsampler chains for one batch (for progress bars)."""
    count = lambda d, n, s: len(d.timesteps(options.sampler, n, s))  # noqa: E731
    up = count(pipe.upsampler, options.upsampler_steps, upsampler_strength(options, strength)) if pipe.upsampler else 0
    return count(pipe.decoder, options.steps, strength) + up


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (D,) at fractions alpha (K,) -> (K, D) (Shoemake 1985)."""
    omega = torch.arccos((a * b).sum().clamp(-1, 1))
    alpha = alpha[:, None]
    if omega < 1e-4:  # (nearly) the same direction: the chord is the arc
        return F.normalize((1 - alpha) * a + alpha * b, dim=-1)
    return (torch.sin((1 - alpha) * omega) * a + torch.sin(alpha * omega) * b) / torch.sin(omega)
