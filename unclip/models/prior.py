"""The diffusion prior of DALL-E 2 (Ramesh et al. 2022, sec. 2.2): text -> CLIP image embedding.

A Transformer reads [text tokens, text embedding, timestep, noised image embedding, query] and the
output at the query is the denoiser's prediction (v, x0 or eps, as configured). Every position
attends to every other (the paper's causal mask only matters for its single readout position);
padding tokens are masked.
"""
from __future__ import annotations

import torch
from torch import nn

from unclip.config import PriorModelConfig
from unclip.models.layers import TimestepMLP, drop_condition


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorModelConfig, embed_dim: int, text_width: int, text_context: int):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.text_tokens_in = nn.Linear(text_width, w)
        self.text_embed_in = nn.Linear(embed_dim, w)
        self.x_in = nn.Linear(embed_dim, w)
        self.time = TimestepMLP(w, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.positions = nn.Parameter(torch.randn(text_context + 4, w) * 0.02)
        self.null_text_embed = nn.Parameter(torch.zeros(embed_dim))
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, embed_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_embed: torch.Tensor, text_tokens: torch.Tensor,
                token_mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """x: noised image embedding (B, D); text_embed (B, D); text_tokens (B, L, W); token_mask (B, L) True
        for real tokens; drop (B,) True where the text condition is dropped. Returns (B, D)."""
        B, L = x.shape[0], text_tokens.shape[1]  # L may be shorter than the context: trailing padding is cut
        text_embed = drop_condition(text_embed, self.null_text_embed, drop)
        token_mask = token_mask & ~drop[:, None]  # a dropped caption shows no tokens at all
        seq = torch.cat([
            self.text_tokens_in(text_tokens),  # (B, L, w)
            self.text_embed_in(text_embed)[:, None],
            self.time(t)[:, None],
            self.x_in(x)[:, None],
            self.query.expand(B, 1, -1),
        ], dim=1) + torch.cat([self.positions[:L], self.positions[-4:]])  # (B, L + 4, w)
        pad = torch.cat([~token_mask, torch.zeros(B, 4, dtype=torch.bool, device=x.device)], dim=1)
        h = self.transformer(seq, src_key_padding_mask=pad)
        return self.out(h[:, -1])  # (B, D)
