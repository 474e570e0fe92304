"""A layout stage: caption -> where each object goes and what it is, drawn before the image.

unCLIP's decoder decides what each place in the image becomes while the digits are still mostly noise, and every
place reads every word (docs/results/scenes.md, "Where the decoder reads each word"): two named digits come out as a coin toss.
Layout-first systems (Make-A-Scene's token maps, GLIGEN's grounding boxes, LLM-grounded diffusion's boxes from
a language model) first decide the boxes, then draw an image conditioned on them. Here a small Transformer reads
the caption's CLIP token features (through bidirectional text layers of its own first: CLIP's text tower is causal,
so the token of the first digit in "a 3 left of a 7" has seen neither "left" nor the 7) and writes the objects
autoregressively in the order the caption names them, each as its label fields (for scenes: digit, colour; drawn
apart from each other, `LayoutModel.inputs`) then its box (x0, y0, x1, y1 on a `GRID` x `GRID` lattice over the
image), then the next object or the end; the decoder reads the layout painted as a map (`layout_map`), which
modulates every residual block (SPADE; unclip/models/unet.py).

A layout is a (B, N, F) long tensor: N object slots, F = len(fields) + 4 tokens an object, -1 in every slot
past a layout's last object.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import LayoutModelConfig
from unclip.errors import ConfigError
from unclip.layouts import BOX, GRID
from unclip.models.layers import identity_transformer



class LayoutModel(nn.Module):
    """p(layout | caption) as a sequence: BOS, then each object's F tokens, then STOP (or N objects). One
    vocabulary holds every field's values, the GRID + 1 box coordinates and STOP; which part a position may
    write is fixed by its place in an object (`allowed`)."""

    def __init__(self, cfg: LayoutModelConfig, text_width: int):
        super().__init__()
        if not cfg.fields:
            raise ConfigError("layout fields are set from the data when training (scenes)")
        self.config = cfg
        self.per_object = len(cfg.fields) + BOX
        self.offsets = [sum(cfg.fields[:i]) for i in range(len(cfg.fields))] + [sum(cfg.fields)] * BOX
        self.stop = sum(cfg.fields) + GRID + 1
        self.length = cfg.max_objects * self.per_object + 1  # the last place can only say STOP
        w = cfg.width
        self.tokens = nn.Embedding(self.stop + 2, w)  # + STOP, BOS
        self.place = nn.Parameter(torch.randn(self.length, w) * 0.02)
        self.unseen = nn.Parameter(torch.zeros(w))  # what a place writing an object's later field is given (`inputs`)
        self.text_in = nn.Linear(text_width, w)
        self.text_encoder = identity_transformer(w, cfg.heads, cfg.text_layers) if cfg.text_layers else None
        layer = nn.TransformerDecoderLayer(w, cfg.heads, 4 * w, cfg.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, self.stop + 1))
        allowed = torch.zeros(self.length, self.stop + 1, dtype=torch.bool)
        for i in range(self.length):
            k = i % self.per_object
            if i < self.length - 1:
                lo = self.offsets[k]
                allowed[i, lo: lo + (cfg.fields[k] if k < len(cfg.fields) else GRID + 1)] = True
            allowed[i, self.stop] = k == 0 and i > 0  # an object ends a layout only whole, and one has at least one
        self.register_buffer("allowed", allowed, persistent=False)

    def sequence(self, layout: torch.Tensor) -> torch.Tensor:
        """(B, N, F) layouts -> (B, length) targets in the shared vocabulary, STOP after the last object and -100
        (ignored) after it."""
        B, N, _ = layout.shape
        present = layout[:, :, 0] >= 0  # (B, N)
        seq = (layout + torch.tensor(self.offsets, device=layout.device)).masked_fill(~present[..., None], -100)
        seq = torch.cat([seq.flatten(1), torch.full((B, 1), -100, device=layout.device)], 1)
        count = present.sum(1)
        seq[torch.arange(B), count * self.per_object] = self.stop
        return seq

    def forward(self, previous: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """previous (B, P): the tokens written so far (-100 read as STOP); text (B, L, W), text_mask (B, L): the
        caption's CLIP token features. Returns the logits (B, P + 1, V) of each next token, masked to what may
        be written there."""
        B, P = previous.shape
        bos = torch.full((B, 1), self.stop + 1, device=previous.device)
        x = self.inputs(self.tokens(torch.cat([bos, previous.clamp(min=0).masked_fill(previous < 0, self.stop)], 1)))
        x = x + self.place[: P + 1]
        causal = nn.Transformer.generate_square_subsequent_mask(P + 1, device=x.device, dtype=torch.bool)
        memory = self.text_in(text)
        if self.text_encoder is not None:
            memory = self.text_encoder(memory, src_key_padding_mask=~text_mask)
        h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~text_mask)
        return self.head(h).masked_fill(~self.allowed[: P + 1], float("-inf"))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded tokens (B, P, W) each place reads (place j: the token written at j - 1), with an object's fields
        drawn apart: a place writing a field after the object's first reads `unseen` instead of the fields before it,
        and the place writing its first box corner reads the sum of them all. So an object's colour is read off the
        caption, never guessed from its digit: a pair no training scene shows (a red 0, CoGenT's held-out pairs) is as
        likely as its words make it, where a model that saw the digit first learns that 0s are never red."""
        n = len(self.config.fields)
        if n < 2:
            return x
        k = torch.arange(x.shape[1], device=x.device) % self.per_object  # which token of an object each place writes
        together = sum(x.roll(s, 1) for s in range(n))  # place j: the tokens read at j, ..., j - n + 1
        x = torch.where((k == n)[:, None], together, x)
        return torch.where(((k > 0) & (k < n))[:, None], self.unseen.to(x.dtype), x)

    def token_nll(self, layout: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, net=None,
                  reduction: str = "none") -> torch.Tensor:
        """(B, length) each token's negative log-likelihood under teacher forcing, 0 past a layout's STOP (`reduction`
        "mean": their mean over the tokens up to each STOP); `net`: the module to call (this one, or its DDP wrapper)."""
        target = self.sequence(layout)
        logits = (net or self)(target[:, :-1], text, text_mask)
        return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction=reduction)

    def loss(self, layout: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, net=None) -> torch.Tensor:
        """The cross-entropy of the layouts' sequences, a mean over their tokens."""
        return self.token_nll(layout, text, text_mask, net, reduction="mean")

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_mask: torch.Tensor, generator: torch.Generator,
               temperature: float = 1.0, box_temperature: Optional[float] = None) -> torch.Tensor:
        """Layouts (B, N, F) for captions' token features, drawn token by token (at `temperature`, the boxes' corners
        at `box_temperature` when given; 0: the most likely token each time). A box's corners are put in order
        (x0 <= x1, y0 <= y1)."""
        B = text.shape[0]
        seq = torch.empty(B, 0, dtype=torch.long, device=text.device)
        ended = torch.zeros(B, dtype=torch.bool, device=text.device)
        for i in range(self.length):
            logits = self.forward(seq, text, text_mask)[:, -1]
            t = temperature if box_temperature is None or i % self.per_object < len(self.config.fields) else box_temperature
            if t > 0:
                probs = (logits / t).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(ended, self.stop)
            ended |= token == self.stop
            seq = torch.cat([seq, token[:, None]], 1)
            if ended.all():
                break
        seq = F.pad(seq, (0, self.length - seq.shape[1]), value=self.stop)[:, :-1]
        objects = seq.view(B, self.config.max_objects, self.per_object)
        present = objects[:, :, 0] != self.stop
        layout = (objects - torch.tensor(self.offsets, device=seq.device)).masked_fill(~present[..., None], -1)
        box = layout[..., -BOX:]
        lo, hi = torch.minimum(box[..., :2], box[..., 2:]), torch.maximum(box[..., :2], box[..., 2:])
        return torch.cat([layout[..., :-BOX], lo, hi], -1)
