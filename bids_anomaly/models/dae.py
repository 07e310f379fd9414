"""Denoising autoencoder with coarse noise (Kascenas et al. 2022), 2D axial slices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import register
from .slice_model import SLICE_DEFAULTS, SliceModel
from .synthetic_anomalies import insert_anomalies


def coarse_noise(x: torch.Tensor, std: float, scale: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn at 1/scale resolution, upsampled bilinearly with a random offset."""
    n, c, h, w = x.shape
    gh, gw = h // scale + 2, w // scale + 2
    dev = generator.device  # the CPU, or the GPU for a GPU-resident training loop
    noise = torch.randn(n, c, gh, gw, generator=generator, device=dev).to(x.device) * std
    up = F.interpolate(noise, size=(gh * scale, gw * scale), mode="bilinear", align_corners=False)
    ox, oy = torch.randint(0, scale, (2,), generator=generator, device=dev).tolist()
    return up[:, :, ox : ox + h, oy : oy + w]


def checkerboard(h: int, w: int, size: int, offset: tuple[int, int], phase: int,
                 device) -> torch.Tensor:
    """(h, w) float mask of alternate ``size``-voxel squares (1: hidden), shifted by ``offset``."""
    i = (torch.arange(h, device=device) + offset[0]) // size
    j = (torch.arange(w, device=device) + offset[1]) // size
    return (((i[:, None] + j[None, :]) % 2) == phase).float()


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
        # Several noise scales (coarse-noise grid factors): each training batch draws one, and
        # inference draws cycle through them; empty: ``noise_scale`` alone.
        "noise_scales": [],
        # Dropout on the U-Net's top (half-resolution) skip connection: 1.0 removes it, so
        # sharp-edged content must pass the bottleneck; 0 keeps the plain MONAI U-Net (and
        # bundles written before this key existed, whose cards lack it, load as 0).
        "skip_dropout": 1.0,
        # Probability that a training slice gets a synthetic anomaly to restore
        # (:mod:`.synthetic_anomalies`); 0: coarse noise only.
        "anomaly_p": 0.0,
        # Inference: average the reconstructions of this many copies of the scan corrupted
        # with the training noise (scaled by infer_noise); 0 reconstructs the clean scan.
        # Noisy copies stop the network from copying what it sees, lesions included.
        "infer_draws": 4,
        "infer_noise": 1.0,
        # 2.5D: the network sees (and restores) this many neighbouring slices on each side
        # as extra channels; the scan's reconstruction is the central slice. 0: 2D slices.
        "context": 1,
        # A stronger smooth bias field in training than the other slice models (±30%, not
        # ±10%): shading that N4 leaves behind is reconstructed, not flagged. With context 1
        # this kept the bias-shifted healthy copies unflagged (benchmarks/model_search.py).
        "aug_bias": 0.3,
        # Inpainting: squares of this many voxels (a checkerboard, through the context slices)
        # are hidden from the network, which must fill them in from their surroundings; at
        # inference each voxel's reconstruction comes from the passes that hid it, so a
        # lesion is never shown to the network that reconstructs it. 0: off.
        "mask_patch": 0,
        # Anatomy the network is told rather than asked to restore: where the scan's CSF is
        # (a binary indicator of standardised intensity below this level, given as extra
        # channels that no noise covers). Ventricle and sulcus size vary between healthy
        # people; told where they are, the network restores the tissue around them instead
        # of filling them in. 0: off.
        "csf_channel": 0.0,
        # Training loss: "mse" (the mean of what the noise may hide) or "l1" (its median).
        "loss": "mse",
    }

    legacy_defaults = {"skip_dropout": 0.0, "anomaly_p": 0.0, "infer_draws": 0, "context": 0,
                       "aug_bias": 0.1}

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        from monai.networks.nets import UNet

        self.net = UNet(
            spatial_dims=2,
            in_channels=self.stacked_channels * (2 if self._csf_level() > 0 else 1),
            out_channels=self.stacked_channels,
            channels=tuple(self.hparams["channels"]),
            strides=tuple(self.hparams["strides"]),
            num_res_units=0,
            norm="instance",
        )
        if self.hparams.get("loss", "mse") == "l1":
            self.loss_fn = masked_l1
        elif self.hparams.get("loss", "mse") != "mse":
            raise ValueError(f"dae: loss must be 'mse' or 'l1', not {self.hparams['loss']!r}")
        p = float(self.hparams["skip_dropout"])
        if p > 0:  # the outermost SkipConnection of MONAI's UNet: (down, skip, up)
            self.net.model[1] = TopSkipDropout(self.net.model[1].submodule, p)

    def crop_multiple(self) -> tuple[int, str]:
        return math.prod(int(s) for s in self.hparams["strides"]), "the product of strides"

    def _csf_level(self) -> float:
        return float(self.hparams.get("csf_channel", 0.0) or 0.0)

    def _with_csf(self, noisy: torch.Tensor, seen: torch.Tensor, mask: torch.Tensor):
        """``noisy`` with the CSF indicator of ``seen`` (the uncorrupted input) appended."""
        level = self._csf_level()
        if level <= 0:
            return noisy
        # One bit per voxel: where CSF is, not how dark (a graded channel would hand the
        # network a noise-free copy of every dark voxel, lesions included).
        csf = ((seen < level) & (seen > 1e-3)).float() * mask
        return torch.cat([noisy, csf], dim=1)

    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        x = clean
        if float(self.hparams["anomaly_p"]) > 0:
            x = insert_anomalies(clean, mask, float(self.hparams["anomaly_p"]), gen)
        seen = x
        scales = self._scales()
        # One scale draws nothing extra, so single-scale training is what it was before.
        scale = scales[int(torch.randint(len(scales), (1,), generator=gen, device=gen.device))] \
            if len(scales) > 1 else scales[0]
        x = x + self._noise(clean, float(self.hparams["noise_std"]), scale, gen) * mask
        size = int(self.hparams.get("mask_patch", 0) or 0)
        if size > 0:
            off = torch.randint(0, size, (2,), generator=gen, device=gen.device).tolist()
            phase = int(torch.randint(0, 2, (1,), generator=gen, device=gen.device))
            hide = checkerboard(x.shape[-2], x.shape[-1], size, off, phase, x.device)
            x = x * (1.0 - hide)
        return self._with_csf(x, seen, mask)

    def _noise(self, x: torch.Tensor, std: float, scale: int, gen: torch.Generator):
        """Coarse noise for every contrast, the same on a slice's neighbours (a noise blob
        spans several slices, so the context cannot be averaged to see through it)."""
        reps = 2 * self.context + 1
        noise = coarse_noise(x[:, : x.shape[1] // reps], std, scale, gen)
        return noise.repeat(1, reps, 1, 1) if reps > 1 else noise

    def _scales(self) -> list[int]:
        return [int(v) for v in self.hparams["noise_scales"]] or [int(self.hparams["noise_scale"])]

    def inference_inputs(self, x, m, gen):
        draws = int(self.hparams["infer_draws"])
        if draws <= 0:
            return [self._with_csf(x, x, m)]
        std = float(self.hparams["noise_std"]) * float(self.hparams["infer_noise"])
        scales = self._scales()
        return [self._with_csf(x + self._noise(x, std, scales[d % len(scales)], gen) * m, x, m)
                for d in range(draws)]

    def inference_weights(self, x, m, gen):
        size = int(self.hparams.get("mask_patch", 0) or 0)
        if size <= 0:
            return super().inference_weights(x, m, gen)
        pairs = []
        for d, inp in enumerate(self.inference_inputs(x, m, gen)):
            # Each draw's checkerboard is shifted by a fraction of a square, so the squares'
            # edges (filled from nearer context) fall in different places.
            step = (d * size) // max(1, int(self.hparams["infer_draws"]))
            for phase in (0, 1):
                hide = checkerboard(x.shape[-2], x.shape[-1], size, (step, step), phase,
                                    x.device)
                pairs.append((inp * (1.0 - hide), hide))
        return pairs


def masked_l1(out: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error inside the brain (the trainer's masked MSE, with |·|)."""
    return F.l1_loss(out.float() * mask, clean * mask)


class TopSkipDropout(torch.nn.Module):
    """MONAI's SkipConnection (concatenate input and submodule output) with channel dropout
    on the input half; at ``p`` = 1 the input half is always zero (no skip at all)."""

    def __init__(self, submodule: torch.nn.Module, p: float):
        super().__init__()
        self.submodule = submodule
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.submodule(x)
        if self.p >= 1.0:
            skip = torch.zeros_like(x)
        else:
            skip = F.dropout2d(x, self.p, self.training)
        return torch.cat([skip, y], dim=1)
