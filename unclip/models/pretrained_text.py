"""A frozen pretrained text encoder from Hugging Face `transformers` as stage two's caption encoder:
`t2i text-import --transformers DIR` (Imagen's choice: a large frozen language model reads the caption).

Nothing is downloaded and nothing t2i loads runs code: the model's config.json is kept inside the stage's
config.yaml and the network is built from it (`from_config`, no remote code), its weights are read from
safetensors only, and its tokenizer from its fast tokenizer's files (tokenizer.json, plain data). The stage
offers the interface of `unclip.models.clip.CLIP`'s text side (`encode_text(tokens) -> (embedding, token
features)`), and `PretrainedTokenizer` that of `unclip.tokenizer.Tokenizer`, so the prior, the decoder and the
layout stage train and sample against it as against CLIP's text tower.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import TextConfig
from unclip.errors import CheckpointError, UserError

TOKENIZER_DIR = "tokenizer"  # beside the stage's weights: the tokenizer's files as transformers saves them


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("a pretrained text encoder needs the transformers extra: pip install 't2i[text]'") from None
    return transformers


def hf_config(model: dict):
    """transformers' config object of a config.json dict."""
    if "model_type" not in model:
        raise UserError("not a transformers model config: no model_type")
    model = dict(model)
    return transformers_module().AutoConfig.for_model(model.pop("model_type"), **model)


def feature_width(cfg: TextConfig) -> int:
    """The width of the encoder's token features (T5: d_model; BERT and CLIP's text model: hidden_size)."""
    width = cfg.model.get("d_model") or cfg.model.get("hidden_size")
    if not width:
        raise UserError("a text encoder's config says neither d_model nor hidden_size")
    return int(width)


def pad_id(cfg: TextConfig) -> int:
    return int(cfg.model.get("pad_token_id") or 0)


def caption_mask(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, L) True where a caption's tokens are; its first token always counts (BERT's [CLS], an empty caption's
    end token)."""
    mask = tokens != pad
    mask[:, 0] = True
    return mask


class PretrainedText(nn.Module):
    """A transformers text encoder, frozen: token ids -> (unit-norm caption embedding (B, W), token features (B, L, W)).
    Built from its config, or around an `encoder` already loaded (`import_transformers`)."""

    def __init__(self, cfg: TextConfig, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.config, self.pad_id = cfg, pad_id(cfg)
        self.encoder = encoder or transformers_module().AutoModelForTextEncoding.from_config(hf_config(cfg.model))
        self.encoder.requires_grad_(False)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = caption_mask(tokens, self.pad_id)
        features = self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.config.pooling == "first":
            pooled = features[:, 0]
        else:
            weights = mask[..., None].to(features.dtype)
            pooled = (features * weights).sum(1) / weights.sum(1)
        return F.normalize(pooled, dim=-1), features


class PretrainedTokenizer:
    """The text encoder's own tokenizer, as `unclip.tokenizer.Tokenizer`: captions -> (B, context) ids, special
    tokens added, padded with the pad id and cut at the context; `mask` says which positions hold the caption."""

    def __init__(self, folder: Path, cfg: TextConfig):
        path = Path(folder) / TOKENIZER_DIR
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (t2i text-import keeps the fast tokenizer's files there)")
        # local files only; a tokenizer_config.json naming code of its own (auto_map) is refused without trust_remote_code
        self.tokenizer = transformers_module().AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
        self.context, self.pad_id = cfg.context, pad_id(cfg)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context,
                              return_tensors="pt")["input_ids"]

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return caption_mask(tokens, self.pad_id)


def import_transformers(folder: Path, context: int, pooling: str) -> tuple[PretrainedText, TextConfig, object]:
    """(the encoder, its TextConfig, its fast tokenizer) of a model saved locally with `save_pretrained`: config.json,
    model.safetensors, and a fast tokenizer's tokenizer.json. Weights are read from safetensors only."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"--transformers {folder}: no config.json (a folder written by save_pretrained)")
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"--transformers {folder}: no .safetensors weights (pickled .bin weights could run code "
                        "when loaded; convert them with safetensors first)")
    tf = transformers_module()
    tf.utils.logging.disable_progress_bar()  # t2i says what it imported, in one line
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--transformers {folder}: its tokenizer does not load: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"--transformers {folder}: a fast tokenizer (tokenizer.json) is needed")
    model = tf.AutoModelForTextEncoding.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    config = model.config.to_dict()
    if tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    cfg = TextConfig(model=config, name=folder.name, context=context, pooling=pooling)
    return PretrainedText(cfg, model.float()).eval(), cfg, tokenizer  # float32, as a model built from its config
