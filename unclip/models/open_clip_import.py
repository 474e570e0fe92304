"""A pretrained open_clip model as stage one: `t2i clip-import --open-clip ARCH --weights FILE`.

The weights come from a file the user names; nothing is downloaded. The architecture is open_clip's model
config (a name it knows, such as ViT-B-32, or a model-config JSON file) and is saved inside the stage's
`config.yaml`, so the stage loads without the JSON or the original file. The imported model is frozen:
the prior and the decoder train against it like against a CLIP of our own (`t2i decoder-train --clip DIR`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ClipConfig, ClipModelConfig, OpenClipConfig
from unclip.errors import CheckpointError, UserError


def _open_clip():
    import open_clip  # seconds of start-up (its model zoo): only for imported models

    return open_clip


def build(model_cfg: dict) -> nn.Module:
    """open_clip's CLIP of a model config, randomly initialised (the weights are loaded after)."""
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise UserError(f"not an open_clip model config: no {', '.join(missing)}")
    text, vision = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if model_cfg.get("custom_text") or "hf_model_name" in text:
        raise UserError("open_clip models whose text tower comes from Hugging Face are not supported "
                        "(they need its tokenizer and config from the network); use one with open_clip's own text tower")
    if "timm_model_name" in vision:
        raise UserError("open_clip models with a timm vision tower are not supported; use a ViT or ModifiedResNet one")
    kwargs = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu",
                                                          "init_logit_scale", "init_logit_bias")}
    return _open_clip().model.CLIP(**kwargs)


class ImportedCLIP(nn.Module):
    """An open_clip model behind the interface of `unclip.models.clip.CLIP`: images in t2i's convention
    ([-1, 1], the pipeline's channels and size) are made what its vision tower was trained on (RGB, its input
    size, its mean and std); text gives the unit-norm embedding and the per-token features the prior reads."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        p = cfg.open_clip
        self.config: ClipModelConfig = cfg.model
        self.model = build(p.model)
        self.input_size, self.interpolation = p.image_size, p.interpolation
        self.register_buffer("mean", torch.tensor(p.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(p.image_std).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode=self.interpolation, align_corners=False,
                              antialias=x.shape[-1] > self.input_size).clamp(0, 1)
        return F.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's `encode_text`, keeping the per-token features (B, L, W) it pools."""
        from open_clip.transformer import text_global_pool

        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            pooled = m.text_projection(pooled) if isinstance(m.text_projection, nn.Linear) else pooled @ m.text_projection
        return F.normalize(pooled, dim=-1), x

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens)[0], self.scale()


def model_config(arch: str) -> tuple[dict, str]:
    """(open_clip model config, its name) of an architecture name open_clip knows, or of a model-config JSON file."""
    path = Path(arch)
    if path.suffix == ".json" or path.is_file():
        try:
            return json.loads(path.read_text()), path.stem
        except FileNotFoundError:
            raise UserError(f"open_clip {arch}: no such model-config file", param="open_clip") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"open_clip {arch}: not a JSON model config ({e})", param="open_clip") from None
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        known = open_clip.list_models()
        raise UserError(f"open_clip {arch}: open_clip knows no such architecture (it knows {len(known)}, e.g. "
                        f"{', '.join(k for k in known if k.startswith('ViT-B'))[:120]}...; or give a model-config JSON)",
                        param="open_clip")
    return cfg, arch


def import_open_clip(arch: str, weights: Path, image_size: Optional[int] = None, image_channels: int = 3,
                     template: str = "a photo of a {}") -> tuple[ImportedCLIP, ClipConfig]:
    """Build `arch`, load `weights` into it (open_clip's own loader: its state-dict layouts and conversions),
    and describe it as a t2i CLIP stage whose images are `image_channels` x `image_size` (default: the
    vision tower's input size)."""
    cfg_dict, name = model_config(arch)
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"weights {weights}: no such file", param="weights")
    vision, text = cfg_dict.get("vision_cfg", {}), cfg_dict.get("text_cfg", {})
    side = vision.get("image_size", 224)
    side = side[0] if isinstance(side, (list, tuple)) else side
    pre = cfg_dict.get("preprocess_cfg", {})
    defaults = OpenClipConfig()
    clip_cfg = ClipConfig(
        model=ClipModelConfig(image_channels=image_channels, image_size=image_size or side,
                              text_context=text.get("context_length", 77), text_width=text.get("width", 512),
                              embed_dim=cfg_dict.get("embed_dim", 512)),
        template=template,
        open_clip=OpenClipConfig(model=cfg_dict, name=name, image_size=side,
                                 image_mean=list(pre.get("mean", defaults.image_mean)),
                                 image_std=list(pre.get("std", defaults.image_std)),
                                 interpolation=pre.get("interpolation", "bicubic")
                                 if pre.get("interpolation", "bicubic") in ("bicubic", "bilinear") else "bicubic"),
    )
    model = ImportedCLIP(clip_cfg)
    try:
        _open_clip().load_checkpoint(model.model, str(weights))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"weights {weights} do not fit {name}: {' '.join(lines[:3])[:300]}", param="weights") from None
    except Exception as e:  # an unreadable file (pickle, zip, safetensors errors) or open_clip's own conversions
        raise CheckpointError(f"weights {weights} could not be loaded into {name} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no message'})", param="weights") from None
    return model.eval().requires_grad_(False), clip_cfg
