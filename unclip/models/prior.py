"""The diffusion prior of DALL-E 2 (Ramesh et al. 2022, sec. 2.2): text -> CLIP image embedding.

A Transformer reads [text tokens, text embedding, timestep, noised image embedding, query] and the
output at the query is the denoiser's prediction (v, x0 or eps, as configured). Every position
attends to every other (the paper's causal mask only matters for its single readout position);
padding tokens are masked.

The diffusion runs over unit-norm CLIP embeddings scaled by sqrt(D), or with `whiten`, over those embeddings
whitened by the residual covariance of the image embeddings given the text embeddings (`residual_whitening`):
`encode` and `decode` map between CLIP space and the diffusion's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import PriorModelConfig
from unclip.models.layers import TimestepMLP, drop_condition


def embed_scale(dim: int) -> float:
    """Unit-norm CLIP embeddings are scaled by sqrt(D) so each coordinate has about unit variance."""
    return dim**0.5


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorModelConfig, embed_dim: int, text_width: int, text_context: int,
                 text_embed_dim: Optional[int] = None):
        """`embed_dim`: CLIP's image embeddings'; the caption's embedding is as wide unless `text_embed_dim` says
        otherwise (a pretrained text encoder's)."""
        super().__init__()
        self.config, self.embed_dim = cfg, embed_dim
        w = cfg.width
        text_embed_dim = text_embed_dim or embed_dim
        self.text_tokens_in = nn.Linear(text_width, w)
        self.text_embed_in = nn.Linear(text_embed_dim, w)
        self.x_in = nn.Linear(embed_dim, w)
        self.time = TimestepMLP(w, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.positions = nn.Parameter(torch.randn(text_context + 4, w) * 0.02)
        self.null_text_embed = nn.Parameter(torch.zeros(text_embed_dim))
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, embed_dim))
        self.scale = embed_scale(embed_dim)
        if cfg.whiten:  # set by set_whitening before training, then saved and loaded with the weights
            # the untrained prior then draws the residuals' Gaussian: it starts with a spread of the right size
            nn.init.zeros_(self.out[1].weight)
            nn.init.zeros_(self.out[1].bias)
            self.register_buffer("embed_mean", torch.zeros(embed_dim))
            self.register_buffer("whitening", torch.eye(embed_dim))
            self.register_buffer("coloring", torch.eye(embed_dim))

    def set_whitening(self, mean: torch.Tensor, whitening: torch.Tensor, coloring: torch.Tensor) -> None:
        for name, value in (("embed_mean", mean), ("whitening", whitening), ("coloring", coloring)):
            getattr(self, name).copy_(value)

    def encode(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (B, D) -> the data the diffusion runs over."""
        x = emb * self.scale
        return (x - self.embed_mean) @ self.whitening if self.config.whiten else x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion's data -> unit-norm CLIP image embeddings (B, D)."""
        return F.normalize(x @ self.coloring + self.embed_mean if self.config.whiten else x, dim=-1)

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
        *body, last = self.transformer.layers
        for layer in body:
            seq = layer(seq, src_key_padding_mask=pad)
        return self.out(readout(last, seq, pad))  # (B, D)


def readout(layer: nn.TransformerEncoderLayer, seq: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The last position's output (B, w) of a pre-norm `layer` over `seq` (B, N, w) with padding `pad` (B, N): the
    layer computed for that position alone (the others' outputs are never read): about a fifth of the prior's sampling
    time on the CPU. Its attention is written out: nn.MultiheadAttention's first cross-attention call in a process
    costs 0.4 s on the CPU."""
    attn, x = layer.self_attn, layer.norm1(seq)
    width, heads = x.shape[-1], attn.num_heads
    q = F.linear(x[:, -1:], attn.in_proj_weight[:width], attn.in_proj_bias[:width])
    k, v = F.linear(x, attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, -1)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  (B, heads, n, w / heads)
    h = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=~pad[:, None, None])  # (B, heads, 1, .)
    h = seq[:, -1] + attn.out_proj(h.flatten(1))  # (B, w)
    return h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))


def residual_whitening(x: torch.Tensor, text: torch.Tensor, floor: float = 1e-4) -> tuple[torch.Tensor, ...]:
    """(mean, whitening, coloring): the affine map z = (x - mean) @ whitening under which what the captions leave
    open is white, and its inverse x = z @ coloring + mean.

    x (N, D) are image embeddings at the prior's scale, text (N, E) their captions' text embeddings. A ridge fit
    x ~ [text, 1] A leaves residuals of covariance U diag(lam) U^T (its eigenvalues floored at `floor` times the
    largest, or times x's variance a coordinate when the fit leaves almost nothing); whitening = U diag(lam)^-1/2.
    For a class of digits that spreads 0.35 a coordinate, unevenly over directions, the noise of a unit-variance
    diffusion then meets data of unit variance in every direction.
    """
    x, text = x.double(), text.double()
    features = torch.cat([text, torch.ones(len(text), 1, dtype=text.dtype, device=text.device)], 1)
    gram = features.T @ features
    ridge = 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    residual = x - features @ torch.linalg.solve(gram + ridge, features.T @ x)
    lam, U = torch.linalg.eigh(residual.T @ residual / len(x))
    lam = lam.clamp(min=floor * max(lam.max().item(), x.var(0).mean().item()))
    return x.mean(0).float(), (U * lam.rsqrt()).float(), (U * lam.sqrt()).T.float()
