"""Convolutional bottleneck autoencoder on 2D axial slices (Baur et al. 2021 style baseline).

The same slices, crop and training loop as the dae, but the input is the clean slice and the
network must squeeze it through a dense latent vector: what it cannot restore is anomalous.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import register
from .slice_model import SLICE_DEFAULTS, SliceModel


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                         nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2))


def _up(cin: int, cout: int) -> nn.Sequential:
    # Nearest upsampling + conv: no checkerboard artefacts in the residual maps.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(cin, cout, 3, padding=1),
                         nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2))


class ConvEncoder(nn.Module):
    """Stride-2 conv blocks down to a (C_last, h / 2^n, w / 2^n) feature map, flattened."""

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        chans = [in_channels, *channels]
        self.blocks = nn.Sequential(*[_down(a, b) for a, b in zip(chans[:-1], chans[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)


class ConvDecoder(nn.Module):
    """Latent vector → dense → mirrored upsampling conv blocks; the last one (mirroring the
    encoder's first) upsamples straight to a linear output conv, sparing full-resolution
    feature maps."""

    def __init__(self, out_channels: int, channels: list[int], latent: int,
                 bottom: tuple[int, int]):
        super().__init__()
        self.bottom = (channels[-1], *bottom)
        self.fc = nn.Sequential(nn.Linear(latent, int(np.prod(self.bottom))), nn.LeakyReLU(0.2))
        chans = channels[::-1]
        self.blocks = nn.Sequential(*[_up(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.out = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(channels[0], out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.fc(z).view(-1, *self.bottom)))


def halving_factor(channels: list[int]) -> tuple[int, str]:
    """The crop multiple of the conv encoder: one halving per level."""
    return 2 ** len(channels), "2**len(channels)"


def bottom_shape(crop: list[int], channels: list[int], type_name: str) -> tuple[int, int]:
    """The feature-map size at the bottleneck; the crop must halve cleanly at every level."""
    f = halving_factor(channels)[0]
    if len(channels) < 1 or any(int(c) % f for c in crop):
        raise ValueError(
            f"model '{type_name}': crop {list(crop)} must be divisible by 2**len(channels) = {f}"
        )
    return int(crop[0]) // f, int(crop[1]) // f


class BottleneckAE(nn.Module):
    def __init__(self, in_channels: int, channels: list[int], latent: int,
                 bottom: tuple[int, int]):
        super().__init__()
        self.encoder = ConvEncoder(in_channels, channels)
        self.fc = nn.Linear(channels[-1] * bottom[0] * bottom[1], latent)
        self.decoder = ConvDecoder(in_channels, channels, latent, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc(self.encoder(x)))


@register
class AEModel(SliceModel):
    """Conv encoder → dense latent → mirrored decoder, trained to reproduce clean slices."""

    type_name = "ae"
    defaults = {
        **SLICE_DEFAULTS,
        "channels": [32, 64, 128, 256],
        "latent": 128,
    }

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        hp = self.hparams
        bottom = bottom_shape(hp["crop"], hp["channels"], self.type_name)
        self.net = BottleneckAE(len(self.contrasts), list(hp["channels"]), int(hp["latent"]),
                                bottom)

    def crop_multiple(self) -> tuple[int, str]:
        return halving_factor(self.hparams["channels"])
