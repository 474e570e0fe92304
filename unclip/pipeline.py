"""The saved stages chained: load a pipeline folder; text -> image embedding -> image; variations, interpolation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from unclip.checkpoint import SAMPLING_FILE, check_fingerprint, fingerprint, load_checkpoint, resolve_folder
from unclip.config import ClipConfig, DecoderConfig, LayoutConfig, PriorConfig, UpsamplerConfig, load_yaml, merge
from unclip.diffusion.models import Diffusion
from unclip.errors import CheckpointError, ConfigError, UserError
from unclip.images import resize
from unclip.models.clip import CLIP
from unclip.models.layout import LayoutModel, layout_map, no_layout
from unclip.models.prior import DiffusionPrior, embed_scale
from unclip.models.unet import UNet
from unclip.models.upsampler import Upsampler, degrade, sampling_level
from unclip.tokenizer import Tokenizer
from unclip.zeroshot import encode_images, encode_texts, model_device


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def build_clip(cfg: ClipConfig) -> CLIP:
    """Our CLIP, or a pretrained open_clip model imported by `t2i clip-import` (the same interface)."""
    if cfg.open_clip is not None:
        from unclip.models.open_clip_import import ImportedCLIP

        return ImportedCLIP(cfg)
    return CLIP(cfg.model)


def load_clip(folder: str | Path, device: str | torch.device = "auto") -> tuple[CLIP, ClipConfig]:
    """A CLIP checkpoint folder, or a shipped pipeline's CLIP by name (`mnist`)."""
    model, cfg = load_checkpoint(resolve_folder(folder, "clip"), ClipConfig, build_clip)
    return model.to(resolve_device(device)).eval(), cfg


def load_prior(folder: Path, clip_cfg: ClipConfig, device: torch.device) -> tuple[DiffusionPrior, PriorConfig]:
    m = clip_cfg.model
    model, cfg = load_checkpoint(folder, PriorConfig,
                                 lambda c: DiffusionPrior(c.model, m.embed_dim, m.text_width, m.text_context))
    return model.to(device).eval(), cfg


def load_decoder(folder: Path, clip_cfg: ClipConfig, device: torch.device) -> tuple[UNet, DecoderConfig]:
    m = clip_cfg.model
    model, cfg = load_checkpoint(folder, DecoderConfig, lambda c: UNet(c.model, m.embed_dim, text_width=m.text_width))
    return model.to(device).eval(), cfg


def load_layout(folder: Path, clip_cfg: ClipConfig, device: torch.device) -> tuple[LayoutModel, LayoutConfig]:
    model, cfg = load_checkpoint(folder, LayoutConfig, lambda c: LayoutModel(c.model, clip_cfg.model.text_width))
    return model.to(device).eval(), cfg


def load_upsampler(folder: Path, device: torch.device) -> tuple[Upsampler, UpsamplerConfig]:
    model, cfg = load_checkpoint(folder, UpsamplerConfig, lambda c: Upsampler(c.model))
    return model.to(device).eval(), cfg


def prior_diffusion(prior: DiffusionPrior, cfg: PriorConfig, device: torch.device) -> Diffusion:
    m = cfg.model
    return Diffusion.build(prior, m.schedule, m.timesteps, m.prediction, device, distilled_steps=m.distilled_steps)


def decoder_diffusion(decoder: UNet, cfg: DecoderConfig, device: torch.device) -> Diffusion:
    m = cfg.model
    return Diffusion.build(decoder, m.schedule, m.timesteps, m.prediction, device, clip_x0=1.0,
                           distilled_steps=m.distilled_steps)


def upsampler_diffusion(upsampler: Upsampler, cfg: UpsamplerConfig, device: torch.device) -> Diffusion:
    m = cfg.model
    return Diffusion.build(upsampler, m.schedule, m.timesteps, m.prediction, device, clip_x0=1.0,
                           distilled_steps=m.distilled_steps)


@torch.no_grad()
def text_condition(clip: CLIP, tokenizer: Tokenizer, captions: list[str]) -> tuple[torch.Tensor, ...]:
    """The prior's condition for captions: (scaled text embedding (B, D), token features (B, L, W), mask (B, L))."""
    emb, features, tokens = encode_texts(clip, tokenizer, captions)
    mask = token_mask(tokens)
    length = int(mask.sum(1).max())  # positions after every caption's end carry nothing: drop them
    return emb * embed_scale(emb.shape[-1]), features[:, :length], mask[:, :length]


def token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) True up to and including each caption's end token, which has the largest id. Not `tokens != 0`:
    id 0 is padding but also the BPE token of a "!" inside a word."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None] <= tokens.argmax(-1)[:, None]


@dataclass
class SamplingOptions:
    """Sampling settings; the defaults were chosen with benchmarks/generation.py (see the README's sweep):
    on MNIST, prior guidance 1.5 trims the prior's rare off-class embeddings (accuracy 0.978 -> 0.995) and
    even lowers the Frechet distance, where decoder guidance or best-of-N candidates cost more for less;
    DPM-Solver++ at 10 steps is as good as 1000-step DDPM."""

    sampler: str = "dpmpp"
    steps: int = 10
    guidance: float = 1.0  # decoder classifier-free guidance scale (1 = none)
    # decoders that read the caption: the scale from the image embedding alone to it with the caption, `guidance`
    # then scaling only the image embedding's part (InstructPix2Pix's two scales); None: one scale, `guidance`
    text_guidance: Optional[float] = None
    prior_guidance: float = 1.5
    prior_candidates: int = 1  # draws per caption, the one closest to the text embedding kept (DALL-E 2)
    # pipelines with a layout stage: its sampling temperature (1 draws from what it learnt; lower keeps to the
    # likelier layouts: on scenes 0.5 drew the prompts' relations and colours right more often, README)
    layout_temperature: float = 1.0
    layout_box_temperature: Optional[float] = None  # the boxes' corners' own temperature (None: layout_temperature)
    upsampler_steps: int = 10  # when the pipeline has an upsampler
    # how far the upsampler noises the base image, enlarged, before refining it (SDEdit): 1 draws from pure noise
    upsampler_strength: float = 1.0
    strength: float = 0.8  # image-to-image (SDEdit): how far an init image is noised, 0 (kept) to 1 (ignored)


GUIDANCE_KEYS = {"prior": "prior_guidance", "decoder": "guidance"}  # each guided stage's scale in SamplingOptions


def load_sampling(folder: Path) -> SamplingOptions:
    """The sampling defaults of a pipeline folder: SamplingOptions with what its sampling.yaml sets, strictly (an
    unknown key or a wrong type is a one-line error); the library's defaults where it has none."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return SamplingOptions()
    try:
        return merge(SamplingOptions(), load_yaml(path) or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass
class Pipeline:
    """The saved stages of an unCLIP pipeline folder: `clip/`, `prior/`, `decoder/`; when the decoder
    draws a smaller image than the pipeline's output, `upsampler/` (DALL-E 2's cascade); when the decoder reads
    layouts, `layout/` (caption -> objects and boxes, drawn first)."""

    clip: CLIP
    clip_config: ClipConfig
    prior: Diffusion
    prior_config: PriorConfig
    decoder: Diffusion
    decoder_config: DecoderConfig
    tokenizer: Tokenizer
    device: torch.device
    upsampler: Optional[Diffusion] = None
    upsampler_config: Optional[UpsamplerConfig] = None
    layout: Optional[LayoutModel] = None  # the layout stage, when the pipeline has one and its decoder reads layouts
    layout_config: Optional[LayoutConfig] = None
    defaults: SamplingOptions = field(default_factory=SamplingOptions)  # the folder's sampling.yaml, if any

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "Pipeline":
        """A pipeline folder, or a shipped pipeline by name (`mnist`)."""
        folder = resolve_folder(folder)
        missing = [s for s in ("clip", "prior", "decoder") if not (folder / s).is_dir()]
        if missing:
            raise CheckpointError(f"{folder} lacks {', '.join(s + '/' for s in missing)} (a pipeline folder holds clip/, prior/ and decoder/)")
        dev = resolve_device(device)
        clip, clip_cfg = load_clip(folder / "clip", device)
        print_ = fingerprint(clip.state_dict())
        prior, prior_cfg = load_prior(folder / "prior", clip_cfg, dev)
        check_fingerprint(folder / "prior", prior_cfg.clip_fingerprint, print_)
        decoder, decoder_cfg = load_decoder(folder / "decoder", clip_cfg, dev)
        check_fingerprint(folder / "decoder", decoder_cfg.clip_fingerprint, print_)
        pipe = cls(clip, clip_cfg, prior_diffusion(prior, prior_cfg, dev), prior_cfg,
                   decoder_diffusion(decoder, decoder_cfg, dev), decoder_cfg, Tokenizer(clip_cfg.model.text_context), dev,
                   defaults=load_sampling(folder))
        if (folder / "upsampler").is_dir():
            upsampler, pipe.upsampler_config = load_upsampler(folder / "upsampler", dev)
            low, base = pipe.upsampler_config.model.low_size, decoder_cfg.model.image_size
            if low != base:
                raise CheckpointError(f"{folder / 'upsampler'} upsamples {low}x{low} images, but the decoder draws {base}x{base}")
            pipe.upsampler = upsampler_diffusion(upsampler, pipe.upsampler_config, dev)
        if (folder / "layout").is_dir() and decoder_cfg.model.layout:
            pipe.layout, pipe.layout_config = load_layout(folder / "layout", clip_cfg, dev)
            check_fingerprint(folder / "layout", pipe.layout_config.clip_fingerprint, print_)
            if pipe.layout_config.model.fields != decoder_cfg.model.layout_fields:
                raise CheckpointError(f"{folder / 'layout'} writes fields {pipe.layout_config.model.fields}, but the "
                                      f"decoder reads {decoder_cfg.model.layout_fields}")
        return pipe

    @property
    def image_size(self) -> int:
        """The side of the images the pipeline draws (the upsampler's when there is one)."""
        return (self.upsampler_config or self.decoder_config).model.image_size


def prompt_conditions(clip: CLIP, tokenizer: Tokenizer, captions: list[str],
                      negatives: Optional[list[str]] = None) -> tuple[tuple, Optional[tuple]]:
    """`text_condition` of the captions and of their negative prompts (one each, or None), padded alike so
    that classifier-free guidance can batch them together."""
    cond = text_condition(clip, tokenizer, captions + (negatives or []))
    if negatives is None:
        return cond, None
    if len(negatives) != len(captions):
        raise ValueError(f"{len(negatives)} negative prompts for {len(captions)} captions")
    n = len(captions)
    return tuple(c[:n] for c in cond), tuple(c[n:] for c in cond)


@torch.no_grad()
def sample_image_embeddings(clip: CLIP, tokenizer: Tokenizer, prior: Diffusion, captions: list[str], sampler: str,
                            steps: int, guidance: float, generator: torch.Generator, candidates: int = 1,
                            negatives: Optional[list[str]] = None, callback=None) -> torch.Tensor:
    """Text -> unit-norm CLIP image embeddings (B, D) through the prior; of `candidates` draws per caption
    the one most similar to the caption's text embedding is kept (DALL-E 2, sec. 2.2). With `negatives`,
    guidance steers away from those captions instead of from no caption (Kandinsky 2.2's negative prompt).
    `callback(i, t, x_t, x0)` sees every step of the chain."""
    cond, negative = prompt_conditions(clip, tokenizer, captions, negatives)
    B, D = cond[0].shape
    repeat = lambda c: tuple(x.repeat_interleave(candidates, 0) for x in c) if c is not None else None  # noqa: E731
    noise = torch.randn((B * candidates, D), generator=generator, device=generator.device)
    denoise = prior.denoiser(repeat(cond), guidance, repeat(negative))
    emb = prior.net.decode(prior.sample(sampler, denoise, noise, steps, generator=generator, callback=callback))
    emb = emb.view(B, candidates, D)
    return emb[torch.arange(B), nearest_candidates(emb, cond[0])]


def nearest_candidates(emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Of each caption's candidates' CLIP image embeddings (B, K, D), the index (B,) of the one most similar to
    its text embedding (B, D) (DALL-E 2's choice among the prior's draws; DALL-E 1's reranking of images)."""
    return (emb @ F.normalize(text_emb, dim=-1)[:, :, None]).squeeze(-1).argmax(1)


def decoder_condition(cfg: DecoderConfig, image_emb: torch.Tensor, text: Optional[tuple] = None,
                      layout: Optional[torch.Tensor] = None) -> tuple:
    """The decoder's condition: the image embeddings, and the caption's (token features (B, L, W), mask (B, L)
    [, embed_kept (B,): False where the embedding alone is dropped, the caption read on its own]) when the
    decoder reads text; without a caption (variations, interpolation) no token is shown. A decoder that reads
    layouts also gets one's map (`layout_map`; None: no layout, an all-zero map)."""
    if text is None or not cfg.model.text_tokens:
        return (image_emb,)
    m = cfg.model
    if not m.layout:
        return (image_emb, *text)
    kept = text[2:] or (torch.ones(image_emb.shape[0], dtype=torch.bool, device=image_emb.device),)
    if layout is None:
        layout = no_layout(image_emb.shape[0], m.layout_fields, m.image_size, image_emb.device)
    return (image_emb, *text[:2], *kept, layout)


@torch.no_grad()
def decode(decoder: Diffusion, cfg: DecoderConfig, image_emb: torch.Tensor, sampler: str, steps: int, guidance: float,
           generator: torch.Generator, callback=None, noise: Optional[torch.Tensor] = None,
           text: Optional[tuple] = None, negative: Optional[tuple] = None, init: Optional[torch.Tensor] = None,
           strength: float = 1.0, text_guidance: Optional[float] = None,
           layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP image embeddings (B, D) (and, for decoders that read them, the captions' token features and mask
    from `text_condition`) -> images (B, C, H, W) in [-1, 1]. `negative` is the condition guidance steers
    away from (a negative prompt's `decoder_condition`); `init` images in [-1, 1] of any size and `strength`
    make it image-to-image (SDEdit). `text_guidance` (with a caption the decoder reads): the caption's own
    scale over the image embedding alone, `guidance` then the embedding's. `layout`: its map, for decoders that
    read layouts (`decoder_condition`)."""
    m = cfg.model
    if noise is None:
        shape = (image_emb.shape[0], m.image_channels, m.image_size, m.image_size)
        noise = torch.randn(shape, generator=generator, device=generator.device)
    cond = decoder_condition(cfg, image_emb, text, layout)
    if len(cond) > 1 and text_guidance is not None and text_guidance != guidance:
        tokens, mask, *kept = text  # the same tokens, none of them read: the caption dropped, the embedding as it was
        inner = decoder_condition(cfg, image_emb, (tokens, torch.zeros_like(mask), *kept), layout)
        denoise = decoder.denoiser(cond, text_guidance, negative, inner=(inner, guidance))
    else:
        denoise = decoder.denoiser(cond, guidance, negative)
    init = resize(init, m.image_size) if init is not None else None
    return decoder.sample(sampler, denoise, noise, steps, generator=generator, callback=callback, init=init,
                          strength=strength).clamp(-1, 1)


@torch.no_grad()
def upsample(upsampler: Diffusion, cfg: UpsamplerConfig, low: torch.Tensor, sampler: str, steps: int,
             generator: torch.Generator, callback=None, noise: Optional[torch.Tensor] = None,
             init: Optional[torch.Tensor] = None, strength: float = 1.0) -> torch.Tensor:
    """Base images (B, C, h, w) in [-1, 1] -> (B, C, H, W): the upsampler's chain, conditioned on the base image
    upsampled and noised to the sampling augmentation level (Ho et al. 2021, sec. 4.2)."""
    m = cfg.model
    s = sampling_level(m, low.shape[0], low.device)
    cond = degrade(low, m.image_size, s, upsampler.ac, generator=generator)
    if noise is None:
        noise = torch.randn(cond.shape, generator=generator, device=generator.device)
    denoise = upsampler.denoiser((cond, s), 1.0)
    init = resize(init, m.image_size) if init is not None else None
    return upsampler.sample(sampler, denoise, noise, steps, generator=generator, callback=callback, init=init,
                            strength=strength).clamp(-1, 1)


@torch.no_grad()
def decode_and_upsample(pipe: "Pipeline", image_emb: torch.Tensor, options: "SamplingOptions", generator: torch.Generator,
                        callback=None, noise: Optional[torch.Tensor] = None,
                        upsampler_noise: Optional[torch.Tensor] = None, text: Optional[tuple] = None,
                        negative: Optional[tuple] = None, init: Optional[torch.Tensor] = None,
                        strength: float = 1.0, layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP image embeddings (B, D) -> the pipeline's images (B, C, H, W) in [-1, 1]: the decoder, then the
    upsampler when the pipeline has one (for image-to-image, each starts from `init` at its own size).
    `callback(i, t, x_t, x0)` is called after every step of both chains."""
    x = decode(pipe.decoder, pipe.decoder_config, image_emb, options.sampler, options.steps, options.guidance,
               generator, callback, noise, text, negative, init, strength, options.text_guidance, layout)
    if pipe.upsampler is None:
        return x
    init = init if strength < 1.0 else x
    return upsample(pipe.upsampler, pipe.upsampler_config, x, options.sampler, options.upsampler_steps, generator,
                    callback, upsampler_noise, init, upsampler_strength(options, strength))


def upsampler_strength(options: "SamplingOptions", strength: float = 1.0) -> float:
    """The upsampler's SDEdit strength: image-to-image's own (`strength` < 1, from the init image), else
    `options.upsampler_strength` (from the base image, enlarged)."""
    return strength if strength < 1.0 else options.upsampler_strength


def draw(pipe: "Pipeline", captions: list[str], options: "SamplingOptions", generator: torch.Generator,
         callback=None, negatives: Optional[list[str]] = None, init: Optional[torch.Tensor] = None,
         strength: float = 1.0, layouts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Captions -> images (B, C, H, W) in [-1, 1]: prior, layout stage (when the pipeline has one), decoder, upsampler.
    `layouts` (B, N, F): each caption's layout given (`unclip/models/layout.py`), instead of the layout stage's.

    Negative prompts (one per caption) work as in Kandinsky 2.2: the prior's guidance steers away from their
    text condition, and the decoder's (when its guidance is not 1) away from their image embeddings."""
    embed = lambda texts, neg: sample_image_embeddings(  # noqa: E731
        pipe.clip, pipe.tokenizer, pipe.prior, texts, options.sampler, options.steps, options.prior_guidance,
        generator, options.prior_candidates, neg)
    emb = embed(captions, negatives)
    cond, neg = prompt_conditions(pipe.clip, pipe.tokenizer, captions, negatives)
    negative = None  # the caption's tokens go to decoders that read them (decoder_condition)
    if negatives is not None and options.guidance != 1.0:
        negative = decoder_condition(pipe.decoder_config, embed(negatives, None), neg[1:])
    layout = sample_layouts(pipe, cond[1:], generator, options, layouts)
    return decode_and_upsample(pipe, emb, options, generator, callback, text=cond[1:], negative=negative, init=init,
                               strength=strength, layout=layout)


def sample_layouts(pipe: "Pipeline", text: tuple, generator: torch.Generator, options: SamplingOptions,
                   layouts: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """For a decoder that reads layouts, the map (`layout_map`) of `layouts` (B, N, F) when given, else of a layout
    the pipeline's layout stage draws for each caption (token features and mask from `text_condition`) at the
    options' `layout_temperature` and `layout_box_temperature`; None where there is none to read."""
    m = pipe.decoder_config.model
    if not m.layout or (layouts is None and pipe.layout is None):
        return None
    if layouts is None:
        layouts = pipe.layout.sample(*text, generator, options.layout_temperature, options.layout_box_temperature)
    return layout_map(layouts.to(pipe.device), m.layout_fields, m.image_size)


def steps_per_image(pipe: "Pipeline", options: "SamplingOptions", strength: float = 1.0) -> int:
    """Network calls of the decoder and upsampler chains for one batch (for progress bars)."""
    count = lambda d, n, s: len(d.timesteps(options.sampler, n, s))  # noqa: E731
    up = count(pipe.upsampler, options.upsampler_steps, upsampler_strength(options, strength)) if pipe.upsampler else 0
    return count(pipe.decoder, options.steps, strength) + up


@torch.no_grad()
def prior_cosine(clip: CLIP, tokenizer: Tokenizer, prior: Diffusion, images: torch.Tensor, captions: list[str],
                 sampler: str = "ddim", steps: int = 16, seed: int = 0) -> dict:
    """How well the prior does its job: the mean cosine similarity between the embedding it samples for a
    caption and the true CLIP embedding of that caption's image, next to the same for the caption's own
    text embedding (the baseline a prior must beat; DALL-E 2 sec. 5.1)."""
    device = model_device(clip)
    true = encode_images(clip, images).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    sampled = sample_image_embeddings(clip, tokenizer, prior, captions, sampler, steps, 1.0, generator, 1)
    text = F.normalize(text_condition(clip, tokenizer, captions)[0], dim=-1)
    return {"prior_cosine": (sampled * true).sum(-1).mean().item(), "text_cosine": (text * true).sum(-1).mean().item()}


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (D,) at fractions alpha (K,) -> (K, D) (Shoemake 1985)."""
    omega = torch.arccos((a * b).sum().clamp(-1, 1))
    alpha = alpha[:, None]
    if omega < 1e-4:  # (nearly) the same direction: the chord is the arc
        return F.normalize((1 - alpha) * a + alpha * b, dim=-1)
    return (torch.sin((1 - alpha) * omega) * a + torch.sin(alpha * omega) * b) / torch.sin(omega)
