"""A small convolutional autoencoder whose latent space a decoder can draw in (Rombach et al. 2022, sec. 3).

The image is first folded into patch x patch pixel groups (space-to-depth, lossless, as the decoder's U-Net does)
and unfolded at the end, since on a CPU a network's cost is its top level. Each side is then a stack of residual
blocks, one level per width; the encoder halves the side between levels with a strided convolution, the decoder
doubles it with nearest-neighbour upsampling and a convolution. The encoder's last
convolution gives the mean and log-variance of a diagonal Gaussian per latent element (the KL-regularised variant);
`encode` returns the mean, normalised per channel by statistics of training latents (`set_statistics`), so that the
latents a decoder diffuses have zero mean and unit variance as its noise does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import AutoencoderModelConfig
from unclip.errors import ConfigError
from unclip.models.unet import norm

INIT_LOGVAR = -6.0  # the posterior's initial log-variance


class Block(nn.Module):
    """GroupNorm-SiLU-conv twice, with a skip (a 1x1 convolution where the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


def level(c_in: int, c_out: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(Block(c_in if i == 0 else c_out, c_out) for i in range(blocks)))


class Autoencoder(nn.Module):
    """encode(images (B, C, S, S) in [-1, 1]) -> latents (B, L, S/f, S/f); decode(latents) -> images, f = patch x
    2^(levels - 1)."""

    def __init__(self, cfg: AutoencoderModelConfig):
        super().__init__()
        self.config = cfg
        w, n = cfg.widths, len(cfg.widths)
        if cfg.image_size % self.factor:
            raise ConfigError(f"autoencoder image_size {cfg.image_size} is not a multiple of its downsampling factor "
                              f"{self.factor} (patch x 2 to the power of len(widths) - 1)")
        folded = cfg.image_channels * cfg.patch**2
        down: list[nn.Module] = [nn.PixelUnshuffle(cfg.patch), nn.Conv2d(folded, w[0], 3, padding=1)]
        for i in range(n):
            down.append(level(w[max(0, i - 1)], w[i], cfg.blocks))
            if i < n - 1:
                down.append(nn.Conv2d(w[i], w[i], 3, stride=2, padding=1))
        moments = nn.Conv2d(w[-1], 2 * cfg.latent_channels, 3, padding=1)
        with torch.no_grad():  # the posterior starts narrow (std e^-3): at unit variance its noise drowns the latents,
            moments.weight[cfg.latent_channels:].zero_()  # and the decoder learns from noise for hundreds of steps
            moments.bias[cfg.latent_channels:].fill_(INIT_LOGVAR)
        down += [norm(w[-1]), nn.SiLU(), moments]
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1)]
        for i in reversed(range(n)):
            up.append(level(w[min(n - 1, i + 1)], w[i], cfg.blocks))
            if i > 0:
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i], w[i], 3, padding=1)]
        up += [norm(w[0]), nn.SiLU(), nn.Conv2d(w[0], folded, 3, padding=1), nn.PixelShuffle(cfg.patch)]
        self.decoder = nn.Sequential(*up)
        # per-channel mean and standard deviation of training latents (set_statistics), saved with the weights
        self.register_buffer("shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("scale", torch.ones(cfg.latent_channels))

    @property
    def factor(self) -> int:
        return self.config.patch * 2 ** (len(self.config.widths) - 1)

    @property
    def latent_size(self) -> int:
        return self.config.image_size // self.factor

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance (clamped, as LDM's) of images `x`, before normalisation."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised latents (the posterior's mean): what a latent decoder diffuses."""
        return (self.moments(x)[0] - self._view(self.shift)) / self._view(self.scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images, clamped to [-1, 1]."""
        return self.decoder(z * self._view(self.scale) + self._view(self.shift)).clamp(-1, 1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> their images through the latents (the posterior's mean)."""
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (reconstruction from a sample of the posterior, unclamped; KL to N(0, I), mean per element)."""
        mean, logvar = self.moments(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()
        return self.decoder(z), kl

    @torch.no_grad()
    def set_statistics(self, batches) -> None:
        """Set `shift` and `scale` to the per-channel mean and standard deviation of the posterior means of `batches`
        (an iterable of image batches)."""
        means = torch.cat([self.moments(x)[0].transpose(0, 1).flatten(1) for x in batches], dim=1)
        self.shift.copy_(means.mean(dim=1))
        self.scale.copy_(means.std(dim=1).clamp(min=1e-6))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image of images in [-1, 1] (B,), over their [0, 1] range."""
    mse = F.mse_loss(x, y, reduction="none").flatten(1).mean(dim=1) / 4.0
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))
