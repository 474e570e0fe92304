"""Stage one: a residual CNN image encoder and a Transformer text encoder in one embedding space.

Radford et al. 2021 (CLIP); the text tower follows CLIP's causal Transformer pooled at the end token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ClipModelConfig
from unclip.errors import ConfigError
from unclip.models.layers import identity_transformer
from unclip.tokenizer import VOCAB_SIZE


class ResBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) skip; `stride` 2 halves the resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al. 2017)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x), inplace=True)


class AttentionPool(nn.Module):
    """CLIP's ResNet pooling (Radford et al. 2021, sec. 2.4): the mean feature attends to every position,
    each carrying a learned positional embedding, so the embedding can say where things are."""

    def __init__(self, c: int, positions: int, heads: int, out: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(positions + 1, c) / c**0.5)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.proj = nn.Linear(c, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos  # (B, 1 + HW, C)
        return self.proj(self.attn(x[:, :1], x, x, need_weights=False)[0][:, 0])  # (B, D)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipModelConfig):
        super().__init__()
        w = cfg.image_widths
        self.patch = cfg.image_patch
        side = cfg.image_size // cfg.image_patch // 2 ** (len(w) - 1)
        if side < 1 or cfg.image_size % cfg.image_patch:
            raise ConfigError(f"CLIP image_size {cfg.image_size} is too small for image_patch {cfg.image_patch} "
                              f"and {len(w)} levels (or not divisible by the patch)")
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.image_channels * cfg.image_patch**2, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
            nn.ReLU(inplace=True),
        )
        blocks, c = [], w[0]
        for level, width in enumerate(w):
            for b in range(cfg.image_blocks):
                blocks.append(ResBlock(c, width, stride=2 if level > 0 and b == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.layers = identity_transformer(c, cfg.text_heads, cfg.image_layers) if cfg.image_layers else None
        self.layer_pos = nn.Parameter(torch.zeros(side * side, c)) if cfg.image_layers else None
        attend = cfg.image_pool == "attention"
        self.pool = AttentionPool(c, side * side, cfg.text_heads, cfg.embed_dim) if attend else None
        self.proj = None if attend else nn.Linear(c, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(F.pixel_unshuffle(x, self.patch)))  # (B, C, H', W')
        if self.layers is not None:
            tokens = self.layers(h.flatten(2).transpose(1, 2) + self.layer_pos)  # (B, H'W', C)
            h = tokens.transpose(1, 2).reshape(h.shape)
        return self.pool(h) if self.pool is not None else self.proj(h.mean((2, 3)))  # (B, D)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.text_context, cfg.text_width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.text_width, cfg.text_heads, 4 * cfg.text_width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.register_buffer("causal_mask", torch.full((cfg.text_context,) * 2, float("-inf")).triu(1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled embedding (B, D), per-token features (B, L, W)) for token ids (B, L)."""
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, W)
        x = self.ln_final(self.transformer(x, mask=self.causal_mask, is_causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(-1)]  # the end token has the largest id
        return self.proj(pooled), x


class CLIP(nn.Module):
    def __init__(self, cfg: ClipModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) for images (B, C, H, W) in [-1, 1]."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm text embeddings (B, D), per-token features (B, L, W))."""
        pooled, features = self.text(tokens)
        return F.normalize(pooled, dim=-1), features

    def scale(self) -> torch.Tensor:
        """The learned inverse temperature, capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)[0], self.scale()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor,
                     negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss) with multi-positive targets.

    With class-level captions a batch of 256 MNIST images holds ~25 captions of each digit. The usual
    one-hot targets (the i-th text for the i-th image) would push an image of a six away from every
    other six's caption, fighting the very alignment we want. Instead every pair in the same group
    (same label, or the same caption text) is a positive, and the target is uniform over them; this is
    the supervised-contrastive soft target (Khosla et al. 2020), and it reduces to CLIP's loss when all
    groups are distinct.

    `negatives` (B', D): extra texts that match no image (NegCLIP's hard negatives); they widen the
    image-to-text softmax only.
    """
    logits = scale * image_emb @ text_emb.T  # (B, B)
    targets = (groups[:, None] == groups[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)  # symmetric positives, so rows of targets.T match too
    wide = logits if negatives is None else torch.cat([logits, scale * image_emb @ negatives.T], 1)  # (B, B + B')
    loss_i = torch.sum(-targets * F.log_softmax(wide, dim=1)[:, : logits.shape[1]], dim=1).mean()
    loss_t = torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


def twin_direction_loss(image_emb: torch.Tensor, twin_image_emb: torch.Tensor, text_emb: torch.Tensor,
                        twin_text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE over the changes between each example and its hard negative twin (B, D each): the k-th scene's
    change (image minus twin image) must point the way of the k-th caption's change (text minus twin text) rather
    than the other pairs' (the directional CLIP loss of StyleGAN-NADA, Gal et al. 2022, as a training signal).

    Where both towers are still bags of words a twin pair's two embeddings nearly coincide, so the contrastive
    loss's pressure to tell them apart is the product of two small differences and barely moves either tower.
    Normalised, each change is a unit vector whatever its size, and each tower learns from the other's direction.
    """
    di = F.normalize(image_emb - twin_image_emb, dim=-1)
    dt = F.normalize(text_emb - twin_text_emb, dim=-1)
    return contrastive_loss(di, dt, scale, torch.arange(len(di), device=di.device))  # every pair its own group
