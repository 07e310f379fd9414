"""Denoising autoencoder with coarse noise (Kascenas et al. 2022), 2D axial slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register
from .slice_model import SLICE_DEFAULTS, SliceModel


def coarse_noise(x: torch.Tensor, std: float, scale: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn at 1/scale resolution, upsampled bilinearly with a random offset."""
    n, c, h, w = x.shape
    gh, gw = h // scale + 2, w // scale + 2
    noise = torch.randn(n, c, gh, gw, generator=generator, device="cpu").to(x.device) * std
    up = F.interpolate(noise, size=(gh * scale, gw * scale), mode="bilinear", align_corners=False)
    ox, oy = torch.randint(0, scale, (2,), generator=generator).tolist()
    return up[:, :, ox : ox + h, oy : oy + w]


@register
class DAEModel(SliceModel):
    """MONAI 2D U-Net that removes coarse noise; what it cannot restore is anomalous."""

    type_name = "dae"
    defaults = {
        **SLICE_DEFAULTS,
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "noise_std": 0.5,  # 0.2 left lesions half-reconstructed (quality bench)
        "noise_scale": 8,
    }

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        from monai.networks.nets import UNet

        self.net = UNet(
            spatial_dims=2,
            in_channels=len(self.contrasts),
            out_channels=len(self.contrasts),
            channels=tuple(self.hparams["channels"]),
            strides=tuple(self.hparams["strides"]),
            num_res_units=0,
            norm="instance",
        )

    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        noise = coarse_noise(clean, self.hparams["noise_std"], self.hparams["noise_scale"], gen)
        return clean + noise * mask
