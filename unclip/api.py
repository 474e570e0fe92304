"""The Python API, in diffusers' shape: `UnCLIPPipeline.from_pretrained("mnist")("six").images`.

The CLI and the web server are thin callers of this class, so what they draw for a seed is what a script draws.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image

from unclip.components.clip import encode_images
from unclip.components.prior import sample_image_embeddings
from unclip.config import DEFAULT_PIPELINE
from unclip.data.folder import load_images, pil_to_tensor
from unclip.errors import SettingWarning, UnknownWordsWarning, UserError
from unclip.images import to_float, to_pil, to_uint8
from unclip.options import GUIDANCE_KEYS, SamplingOptions, canonical, sampling_options
from unclip.pipeline import Pipeline, decode_and_upsample, draw, drawing_shape, slerp, steps_per_image
from unclip.vocabulary import unknown_words

ImageInput = Union[str, Path, Image.Image, torch.Tensor]
"""An image file's path, a PIL image, or a uint8 tensor (C, H, W); converted to what the model expects."""
StepCallback = Callable[[int, int, torch.Tensor], None]
"""`callback(step, total, x0)` after every denoising step: x0 is the current estimate (B, C, h, w) in [-1, 1]."""
OUTPUT_TYPES = ("pil", "pt", "uint8")
BATCH_SIZE = 64  # images sampled at once: memory stays bounded however many are asked for


@dataclass
class UnCLIPOutput:
    """`images`: a list of PIL images ("pil"), or a (B, C, H, W) tensor, float in [0, 1] ("pt") or uint8."""

    images: Union[list[Image.Image], torch.Tensor]


LIBRARY_DIRS = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def user_frame() -> int:
    """The stack level of the first caller outside unclip and torch: where a warning points (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def unknown_words_note(words: list[str]) -> str:
    """What is said of a prompt's words the pipeline's training captions never used (API, CLI and page alike)."""
    return (f"{', '.join(repr(w) for w in words)} never appeared in this pipeline's training captions: it draws only "
            "what its captions taught it, and reads an unknown word as noise")


class UnCLIPPipeline:
    """A loaded unCLIP pipeline (prior, decoder, upsampler if any, and their CLIP), called like diffusers' pipelines."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._noted_distilled = False  # said once that a sampler or steps asked for do not reach distilled stages
        self._noted_learnt = False  # said once that a guidance asked for adds to what a distilled stage learnt

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_PIPELINE, device: str | torch.device = "auto") -> "UnCLIPPipeline":
        """A shipped pipeline's name (`mnist`, `scenes`) or a pipeline folder; `device`: auto, cpu or cuda."""
        return cls(Pipeline.load(name_or_path, device))

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def image_size(self) -> int:
        return self.pipeline.image_size

    def options(self, options: Optional[SamplingOptions] = None, **settings) -> SamplingOptions:
        """The one way sampling settings come in: `options` (default: this pipeline's own, from its folder's
        sampling.yaml or the library's) with `settings` on top (SamplingOptions fields, or their diffusers-style
        ALIASES such as `num_inference_steps`; None keeps the value), validated against this pipeline."""
        given = canonical(settings)
        resolved = self.check(sampling_options(options or self.pipeline.defaults, **given))
        self._note_distilled(resolved, given)
        return resolved

    def _note_distilled(self, options: SamplingOptions, given: dict) -> None:
        """Warn once of settings asked for that distilled stages do not take as asked: a sampler or steps (they keep
        their own chain), a guidance other than the pipeline's default (it adds to what they learnt)."""
        pipe, defaults = self.pipeline, self.pipeline.defaults
        own = {stage: d.distilled_steps for stage, d in (("prior", pipe.prior), ("decoder", pipe.decoder))
               if d.distilled_steps}
        asked = [k for k in ("sampler", "steps") if k in given]
        if own and asked and not self._noted_distilled:
            self._noted_distilled = True
            rest = [f"the {stage}" for stage in ("prior", "decoder") if stage not in own] or ["neither"]
            warnings.warn(SettingWarning(
                f"distilled, so sampling their own DDIM steps whatever is asked: "
                f"{', '.join(f'the {stage} {n}' for stage, n in own.items())}; the sampler and steps asked for drive "
                f"{rest[0]}"), stacklevel=user_frame())
        configs = {"prior": pipe.prior_config, "decoder": pipe.decoder_config}
        learnt = [f"the {stage} learnt guidance {configs[stage].model.distilled_guidance:g}, so {key} "
                  f"{getattr(options, key):g} guides it again on top of that" for stage, key in GUIDANCE_KEYS.items()
                  if configs[stage].model.distilled_guidance != 1.0 and key in given and given[key] != 1.0
                  and given[key] != getattr(defaults, key)]
        if learnt and not self._noted_learnt:
            self._noted_learnt = True
            warnings.warn(SettingWarning(f"distilled with guidance: {'; '.join(learnt)}"), stacklevel=user_frame())

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` that never appeared in this pipeline's training captions ([] when it saved none)."""
        return unknown_words(prompt, self.pipeline.vocabulary)

    def _warn_unknown(self, prompts: list[str]) -> None:
        unknown = list(dict.fromkeys(w for p in prompts for w in self.unknown_words(p)))
        if unknown:
            warnings.warn(UnknownWordsWarning(unknown_words_note(unknown)), stacklevel=user_frame())

    def check(self, options: SamplingOptions) -> SamplingOptions:
        """`options` (already `validate`d) if this pipeline can honour them; else a UserError saying what is wrong."""
        pipe = self.pipeline
        if options.text_guidance is not None and not pipe.decoder_config.model.text_tokens:
            raise UserError("text_guidance is for decoders that read the caption; this pipeline's reads only the "
                            "image embedding: use guidance", param="text_guidance")
        for stage, diffusion in (("prior", pipe.prior), ("decoder", pipe.decoder)):
            if options.steps > len(diffusion.ac):
                raise UserError(f"steps {options.steps} is more than the {len(diffusion.ac)} diffusion steps of the {stage}",
                                param="steps")
        if pipe.upsampler is not None and options.upsampler_steps > len(pipe.upsampler.ac):
            raise UserError(f"upsampler_steps {options.upsampler_steps} is more than the upsampler's "
                            f"{len(pipe.upsampler.ac)} diffusion steps", param="upsampler_steps")
        return options

    def generator(self, generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Generator:
        """The generator to draw with: the one given (on this pipeline's device), one seeded with `seed`, or
        else one seeded from torch's global generator (so `torch.manual_seed` makes a call reproducible)."""
        if generator is not None:
            if generator.device.type != self.device.type:
                raise UserError(f"the generator is on {generator.device}, the pipeline on {self.device}: "
                                f"make it with torch.Generator({str(self.device)!r})")
            return generator
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        return torch.Generator(self.device).manual_seed(seed)

    def image(self, image: ImageInput, size: Optional[int] = None) -> torch.Tensor:
        """Any `ImageInput` as uint8 (C, size, size) with the pipeline's channels (default size: CLIP's)."""
        channels = self.pipeline.clip_config.model.image_channels
        size = size or self.pipeline.clip_config.model.image_size
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3:
                raise UserError(f"an image tensor must be uint8 (C, H, W), got {image.dtype} {tuple(image.shape)}")
            image = to_pil(image.cpu())
        if isinstance(image, (str, Path)):
            return load_images([Path(image)], channels, size)[0]
        return pil_to_tensor(image, channels, size)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Union[None, str, list[str]] = None,
                 num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None, output_type: str = "pil",
                 callback: Optional[StepCallback] = None, image: Optional[ImageInput] = None,
                 batch_size: int = BATCH_SIZE, options: Optional[SamplingOptions] = None, **settings) -> UnCLIPOutput:
        """Text -> images: the prior turns each prompt into CLIP image embeddings, the decoder (and upsampler)
        draws them, `num_images_per_prompt` each, in batches of `batch_size`.

        `negative_prompt`: what to steer away from (Kandinsky 2.2's way: the prior's and the decoder's
        unconditional branches take it). `image`: image-to-image (SDEdit), `strength` 0 returns the image, 1
        ignores it. Sampling settings: `options` (a SamplingOptions; default the pipeline's own) and keywords on
        top of it, by SamplingOptions' field names (`steps=`, `guidance=`, `prior_guidance=`, `sampler=`,
        `prior_candidates=`, `text_guidance=`, `upsampler_steps=`, `upsampler_strength=`, `strength=`,
        `layout_temperature=`, `layout_box_temperature=`) or diffusers' (`num_inference_steps=`, `guidance_scale=`,
        `prior_guidance_scale=`, `text_guidance_scale=`). See `options`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise UserError("the prompt is empty: say what to draw, e.g. 'six'")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if negatives is not None and len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if negatives is not None and all(not n.strip() for n in negatives):
            negatives = None  # an empty negative prompt is no negative prompt
        check_count(num_images_per_prompt, batch_size, output_type)
        options = self.options(options, **settings)
        self._warn_unknown(prompts)
        if negatives is not None and options.prior_guidance == options.guidance == 1 and options.text_guidance is None:
            warnings.warn(SettingWarning("the negative prompt changes nothing at guidance 1: it takes the place of the "
                                         "unconditional branch of guidance, and there is none; set prior_guidance above "
                                         "1 (1.5, say)"), stacklevel=user_frame())
        generator = self.generator(generator)
        captions = [p for p in prompts for _ in range(num_images_per_prompt)]
        negs = [n for n in negatives for _ in range(num_images_per_prompt)] if negatives else None
        init = to_float(self.image(image, self.image_size)).to(self.device)[None] if image is not None else None
        strength = options.strength if init is not None else 1.0
        step = Steps(callback, steps_per_image(self.pipeline, options, strength) * -(-len(captions) // batch_size))
        out = []
        for start in range(0, len(captions), batch_size):
            part = slice(start, start + batch_size)
            b = len(captions[part])
            x = draw(self.pipeline, captions[part], options, generator, step,
                     negatives=negs[part] if negs else None,
                     init=init.expand(b, -1, -1, -1) if init is not None else None, strength=strength)
            out.append(to_uint8(x))
        return output(torch.cat(out), output_type)

    @torch.no_grad()
    def variations(self, image: ImageInput, num_images: int = 4, generator: Optional[torch.Generator] = None,
                   output_type: str = "pil", callback: Optional[StepCallback] = None, batch_size: int = BATCH_SIZE,
                   options: Optional[SamplingOptions] = None, **settings) -> UnCLIPOutput:
        """Variations of an image: its CLIP image embedding decoded from fresh noise (DALL-E 2 sec. 3.1).
        Sampling settings as `__call__` takes them."""
        check_count(num_images, batch_size, output_type)
        options = self.options(options, **settings)
        generator = self.generator(generator)
        emb = encode_images(self.pipeline.clip, self.image(image)[None])
        step = Steps(callback, steps_per_image(self.pipeline, options) * -(-num_images // batch_size))
        out = []
        for start in range(0, num_images, batch_size):
            b = min(batch_size, num_images - start)
            x = decode_and_upsample(self.pipeline, emb.expand(b, -1), options, generator, step)
            out.append(to_uint8(x))
        return output(torch.cat(out), output_type)

    @torch.no_grad()
    def interpolate(self, start: Union[str, ImageInput], end: Union[str, ImageInput], frames: int = 8,
                    generator: Optional[torch.Generator] = None, output_type: str = "pil",
                    callback: Optional[StepCallback] = None, options: Optional[SamplingOptions] = None,
                    **settings) -> UnCLIPOutput:
        """`frames` images on the arc between the CLIP image embeddings of two prompts (through the prior) or
        images, all from the same starting noise so that only the content moves (DALL-E 2 sec. 3.2). Sampling
        settings as `__call__` takes them."""
        if frames < 2:
            raise UserError(f"frames must be at least 2, got {frames}", param="frames")
        check_count(frames, 1, output_type)
        options = self.options(options, **settings)
        generator = self.generator(generator)
        a, b = (self.embed(x, options, generator) for x in (start, end))
        emb = slerp(a, b, torch.linspace(0, 1, frames, device=a.device))
        pipe = self.pipeline
        shared = lambda shape: torch.randn((1, *shape), generator=generator,  # noqa: E731
                                           device=self.device).expand(frames, -1, -1, -1).clone()
        noise = shared(drawing_shape(pipe.decoder_config))  # the decoder's drawing: pixels, or latents
        upsampler_noise = shared((pipe.image_channels, pipe.image_size, pipe.image_size)) if pipe.upsampler else None
        step = Steps(callback, steps_per_image(pipe, options))
        x = decode_and_upsample(pipe, emb, options, generator, step, noise=noise,
                                upsampler_noise=upsampler_noise)
        return output(to_uint8(x), output_type)

    def embed(self, source: Union[str, ImageInput], options: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
        """A unit CLIP image embedding (D,): of a prompt through the prior, or of an image (a path with an image
        suffix or of an existing file counts as an image)."""
        if isinstance(source, str) and not (Path(source).suffix.lower() in IMAGE_SUFFIXES or Path(source).is_file()):
            if not source.strip():
                raise UserError("an empty prompt: give a caption or the path of an image")
            self._warn_unknown([source])
            pipe = self.pipeline
            return sample_image_embeddings(*pipe.captions(), pipe.prior, [source], options.sampler,
                                           options.steps, options.prior_guidance, generator, options.prior_candidates)[0]
        return encode_images(self.pipeline.clip, self.image(source)[None])[0]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def check_count(num_images: int, batch_size: int = 1, output_type: str = "pil") -> None:
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"unknown output_type {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
    if num_images < 1:
        raise UserError(f"the number of images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {batch_size}")


class Steps:
    """The samplers' `callback(i, t, x_t, x0)` counted across chains and batches, as `callback(step, total, x0)`."""

    def __init__(self, callback: Optional[StepCallback], total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        self.done += 1
        if self.callback:
            self.callback(self.done, self.total, x0)


def output(images: torch.Tensor, output_type: str) -> UnCLIPOutput:
    """uint8 (B, C, H, W) as the output type asked for."""
    if output_type == "pil":
        return UnCLIPOutput([to_pil(x) for x in images])
    if output_type == "pt":
        return UnCLIPOutput(images.float() / 255)
    return UnCLIPOutput(images)
