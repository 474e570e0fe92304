"""The unCLIP decoder: a pixel-space U-Net denoiser conditioned on a CLIP image embedding.

As in DALL-E 2 (sec. 2.1, after GLIDE), the embedding is projected into the timestep embedding and
into a few context tokens that the attention at the lowest resolution attends to besides the pixels.
On a CPU the cost of a U-Net is its top level, so the image is first folded into patch x patch
pixel groups (space-to-depth, lossless, as in Hoogeboom et al. 2023 "simple diffusion") and unfolded at
the end: at 28x28 with patch 2 the network runs at 14x14 and 7x7.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import DecoderModelConfig
from unclip.errors import ConfigError
from unclip.models.layers import TimestepMLP, drop_condition, identity_transformer


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4), c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding sets a scale and shift between them (Dhariwal & Nichol 2021), and
    with `layout_dim` so do a layout's features, per pixel (SPADE, Park et al. 2019: a label map modulating every
    block, where a map read once at the input washes out); that part starts at zero."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, layout_dim: int = 0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.layout = nn.Conv2d(layout_dim, 2 * c_out, 1) if layout_dim else None
        if self.layout is not None:
            nn.init.zeros_(self.layout.weight)
            nn.init.zeros_(self.layout.bias)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, layout: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C_in, S, S); emb (B, E); layout: the layout's features (B, layout_dim, ., .), any size (pooled to S)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        if self.layout is not None and layout is not None:
            s, b = self.layout(F.adaptive_avg_pool2d(layout, h.shape[-1])).chunk(2, dim=1)
            scale, shift = scale + s, shift + b
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """The pixels attend to the conditioning tokens and to each other (GLIDE). With `side`, a cross-attention
    only: each pixel, told where it is by a learned positional embedding (side x side), reads the tokens; the
    pixel-to-pixel part, which costs most above the lowest level, is left out."""

    def __init__(self, c: int, heads: int, context_dim: int, side: int = 0):
        super().__init__()
        self.heads = heads
        self.norm = norm(c)
        self.pos = nn.Parameter(torch.randn(1, c, side, side) * 0.02) if side else None
        self.q = nn.Linear(c, c) if side else None
        self.qkv = None if side else nn.Linear(c, 3 * c)
        self.context_kv = nn.Linear(context_dim, 2 * c)
        self.out = nn.Linear(c, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None,
                maps: Optional[list] = None) -> torch.Tensor:
        """x (B, C, H, W); context (B, K, C_ctx); context_mask (B, K) True where a context token may be read.
        `maps`: a cross-attention appends its weights there, averaged over the heads, (B, HW, K) (for the
        grounding loss; computed as written out instead of by the fused kernel)."""
        B, C, H, W = x.shape
        k, v = self.context_kv(context).chunk(2, dim=-1)  # (B, K, C)
        mask = None if context_mask is None else context_mask[:, None, None]
        if self.q is not None:
            q = self.q((self.norm(x) + self.pos).flatten(2).transpose(1, 2))  # (B, HW, C)
        else:
            q, pk, pv = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (B, HW, C) each
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            if mask is not None:
                mask = torch.cat([torch.ones(B, H * W, dtype=torch.bool, device=x.device), context_mask], 1)[:, None, None]
        split = lambda z: z.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        if maps is not None and self.q is not None:
            w = (split(q) @ split(k).transpose(-1, -2)) * (C // self.heads) ** -0.5  # (B, heads, HW, K)
            w = (w if mask is None else w.masked_fill(~mask, float("-inf"))).softmax(-1)  # the K embedding tokens stay
            maps.append(w.mean(1))
            a = w @ split(v)
        else:
            a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)  # (B, heads, HW, C / heads)
        return x + self.out(a.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).view(B, C, H, W)


class UNet(nn.Module):
    def __init__(self, cfg: DecoderModelConfig, embed_dim: int, image_inputs: int = 0, text_width: int = 0):
        """`embed_dim`: the condition vector's size; `image_inputs`: channels of a conditioning image given
        beside x_t (an upsampler's low-resolution image), 0 for none; `text_width`: the width of the caption's
        token features when `cfg.text_tokens`."""
        super().__init__()
        self.config = cfg
        w = cfg.widths
        emb_dim = 4 * w[0]
        self.time = TimestepMLP(emb_dim, w[0])
        self.cond_in = nn.Linear(embed_dim, emb_dim)
        self.context_in = nn.Linear(embed_dim, cfg.context_tokens * w[-1])
        self.null_cond = nn.Parameter(torch.zeros(embed_dim))
        self.text_in = nn.Linear(text_width, w[-1]) if cfg.text_tokens else None
        if cfg.text_tokens and not text_width:
            raise ConfigError("decoder text_tokens needs the width of CLIP's text features")
        if (cfg.text_layers or cfg.text_levels or cfg.embed_drop) and not cfg.text_tokens:
            raise ConfigError("decoder text_layers, text_levels and embed_drop need text_tokens: true")
        for name in ("text_levels", "attn_levels"):
            if any(not 0 <= level < len(w) for level in getattr(cfg, name)):
                raise ConfigError(f"decoder {name} {getattr(cfg, name)} must be levels 0 to {len(w) - 1}")
        self.text_encoder = identity_transformer(w[-1], cfg.heads, cfg.text_layers) if cfg.text_layers else None
        if cfg.image_size % (cfg.patch * 2 ** (len(w) - 1)):
            raise ConfigError(f"decoder image_size {cfg.image_size} must be divisible by patch * 2^(levels - 1) "
                              f"= {cfg.patch * 2 ** (len(w) - 1)}")
        pixels = cfg.image_channels * cfg.patch**2
        self.stem = nn.Conv2d(pixels + image_inputs * cfg.patch**2, w[0], 3, padding=1)
        self.layout_in = None  # a layout's map -> features every residual block is modulated by (`ResBlock`)
        if cfg.layout:
            if not cfg.text_tokens or not cfg.layout_fields:
                raise ConfigError("decoder layout needs text_tokens and the layout's fields (set from the training data: scenes)")
            self.layout_in = nn.Sequential(nn.Conv2d((1 + sum(cfg.layout_fields)) * cfg.patch**2, w[0], 3, padding=1),
                                           nn.SiLU(), nn.Conv2d(w[0], w[0], 3, padding=1))
        lay = w[0] if cfg.layout else 0
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        self.reads = nn.ModuleDict()  # "down{level}_{block}" / "up{level}_{block}" -> a cross-Attention, at text_levels
        self.attends = nn.ModuleDict()  # the same keys -> a self-Attention, at attn_levels
        side = (cfg.image_size or 0) // cfg.patch
        skips, c = [w[0]], w[0]
        for level, width in enumerate(w):
            blocks = nn.ModuleList()
            for b in range(cfg.blocks):
                blocks.append(ResBlock(c, width, emb_dim, cfg.dropout, lay))
                c = width
                skips.append(c)
                self.add_attention(f"down{level}_{b}", level, c, side >> level)
            self.down.append(blocks)
            if level + 1 < len(w):
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim, cfg.dropout, lay)
        self.mid_attn = Attention(c, cfg.heads, w[-1])
        self.mid2 = ResBlock(c, c, emb_dim, cfg.dropout, lay)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(w))):
            blocks = nn.ModuleList()
            for b in range(cfg.blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), width, emb_dim, cfg.dropout, lay))
                c = width
                self.add_attention(f"up{level}_{b}", level, c, side >> level)
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, pixels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def add_attention(self, key: str, level: int, c: int, side: int) -> None:
        """The attentions that follow residual block `key` (at `level`, `c` channels, side x side pixels)."""
        if level in self.config.text_levels:
            self.reads[key] = Attention(c, self.config.heads, self.config.widths[-1], side)
        if level in self.config.attn_levels:
            self.attends[key] = Attention(c, self.config.heads, self.config.widths[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_embed: torch.Tensor, text_tokens: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, embed_kept: Optional[torch.Tensor] = None,
                layout: Optional[torch.Tensor] = None, *, drop: torch.Tensor,
                image: Optional[torch.Tensor] = None, maps: Optional[list] = None) -> torch.Tensor:
        """x: noised images (B, C, H, W); image_embed: CLIP image embeddings (B, D); text_tokens (B, L, W) and
        text_mask (B, L): the caption's CLIP token features and which to read (`text_tokens` configs; None: no caption);
        embed_kept (B,): False where the embedding alone is dropped (None: nowhere); drop (B,) True where every
        condition is dropped; layout (B, 1 + sum(layout_fields), H, W): `layout_map` (all zeros: none), read by
        `layout` configs and dropped with every condition; image: the conditioning image (B, image_inputs, H, W); maps: a list each cross-attention
        (`text_levels`) appends its weights to (`Attention`), for `grounding_loss`.
        Returns the network output (eps, x0 or v, per the config) (B, C, H, W)."""
        if image is not None:
            x = torch.cat([x, image], dim=1)
        cond = drop_condition(image_embed, self.null_cond, drop if embed_kept is None else drop | ~embed_kept)
        emb = self.time(t) + self.cond_in(cond)  # (B, E)
        context = self.context_in(cond).view(x.shape[0], self.config.context_tokens, -1)  # (B, K, C_low)
        context_mask = None
        if self.text_in is not None and text_tokens is not None:
            text = self.text_in(text_tokens)  # (B, L, C_low)
            if self.text_encoder is not None:  # a caption dropped whole still runs, unread: all-masked rows are NaN
                text = self.text_encoder(text, src_key_padding_mask=~text_mask & text_mask.any(1, keepdim=True))
            context = torch.cat([context, text], 1)  # (B, K + L, C_low)
            keep = torch.ones(context.shape[0], self.config.context_tokens, dtype=torch.bool, device=x.device)
            context_mask = torch.cat([keep, text_mask & ~drop[:, None]], 1)

        def read(key: str, h: torch.Tensor) -> torch.Tensor:
            h = self.reads[key](h, context, context_mask, maps) if key in self.reads else h
            return self.attends[key](h, context, context_mask) if key in self.attends else h

        h = self.stem(F.pixel_unshuffle(x, self.config.patch))  # (B, C p^2, H / p, W / p) -> (B, w0, ., .)
        lay = None
        if self.layout_in is not None and layout is not None:
            lay = self.layout_in(F.pixel_unshuffle(layout * ~drop[:, None, None, None], self.config.patch))
        hs = [h]
        for level, blocks in enumerate(self.down):
            for b, block in enumerate(blocks):
                h = read(f"down{level}_{b}", block(h, emb, lay))
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb, lay), context, context_mask), emb, lay)
        for i, blocks in enumerate(self.up):  # the levels from the lowest up
            for b, block in enumerate(blocks):
                h = read(f"up{len(self.up) - 1 - i}_{b}", block(torch.cat([h, hs.pop()], dim=1), emb, lay))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return F.pixel_shuffle(self.out(h), self.config.patch)  # (B, C, H, W)


def attention_shares(maps: list[torch.Tensor], boxes: torch.Tensor, names: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each caption token's cross-attention, over the pixels, falls on the objects it names: (M, B, L)
    shares, one row a map, and (M, B, L) True where a share is defined (the token names objects and was read).
    maps: per cross-attention (B, S*S, K + L), softmax over the context, whose last L are the caption's tokens (one
    masked out, as a dropped caption's are, has no weight anywhere); boxes (B, N, H, W): each object's region at any
    resolution (pooled to each map's); names (B, L, N): 1 where token l names object n."""
    shares, defined = [], []
    for a in maps:
        side = int(a.shape[1] ** 0.5)
        regions = (names @ F.adaptive_avg_pool2d(boxes, side).flatten(2)).clamp(max=1)  # (B, L, S*S)
        attention = a[:, :, -names.shape[1]:].transpose(1, 2)  # (B, L, S*S)
        total = attention.sum(-1)
        shares.append((attention * regions).sum(-1) / total.clamp_min(1e-12))
        defined.append((names.amax(-1) > 0) & (total > 0))
    return torch.stack(shares), torch.stack(defined)


def grounding_loss(maps: list[torch.Tensor], boxes: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al. 2024, eq. 2): the share of a caption token's cross-attention that falls
    outside the objects its word names, squared, averaged over the maps and every grounded token read
    (`attention_shares`' arguments)."""
    shares, defined = attention_shares(maps, boxes, names)
    return ((1 - shares[defined]) ** 2).mean() if defined.any() else boxes.new_zeros(())
