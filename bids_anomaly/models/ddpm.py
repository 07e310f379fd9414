"""Denoising diffusion model on 2D axial slices, scored by partial-noise restoration.

Training: the standard noise-prediction objective of DDPM (Ho et al. 2020) with MONAI's
``DiffusionModelUNet`` and the linear beta schedule of MONAI's ``DDPMScheduler`` (1000 steps).
Slices are mapped from the normalised intensity range [0, 1.5] to [-1, 1] for the diffusion.

Scoring (AnoDDPM, Wyatt et al. 2022; pDDPM, Behrendt et al. 2023): the input is noised to
``t_start`` (of 1000) and restored with ``steps`` deterministic DDIM steps (eta = 0, strided
timesteps ``t_start → 0``), so a volume costs ``steps`` network passes per slice: practical on
a CPU. Noise that hides a lesion is filled in with healthy tissue; the residual is the anomaly
map. Self-attention is off at every level by default (``attention_lowest``: at the lowest
level); MONAI's middle block always has one, so a fourth level keeps its token count small
(12 × 14 for the default 192 × 224 mm crop at 2 mm, 24 × 28 at 1 mm). Default size: ~0.74 M
parameters, chosen for a CPU (2 mm: about 2.3 s per training batch of 16 and 0.8 s per
denoising pass of 16 slices, 1 thread). The initial noise comes from a generator seeded
with ``seed`` for every volume, so the reconstruction is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register
from .slice_model import SLICE_DEFAULTS, SliceModel

LOW, HIGH = 0.0, 1.5  # the normalised intensity range (see preprocessing: clip at 1.5)


def to_diffusion(x: torch.Tensor) -> torch.Tensor:
    return (x - LOW) * (2.0 / (HIGH - LOW)) - 1.0


def from_diffusion(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) * ((HIGH - LOW) / 2.0) + LOW


class NoisePredictor(nn.Module):
    """forward((noisy, t, noise)) → (predicted noise, noise): the trainer's calling convention
    (one input object) around ``DiffusionModelUNet(x, timesteps)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, inp):
        noisy, t, noise = inp
        return self.unet(noisy, t), noise


@register
class DDPMModel(SliceModel):
    """Diffusion model that restores partially noised slices; what it repaints is anomalous."""

    type_name = "ddpm"
    defaults = {
        **SLICE_DEFAULTS,
        "channels": [16, 32, 32, 64],
        "attention_lowest": False,
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "num_head_channels": 16,
        "timesteps": 1000,
        "t_start": 250,
        "steps": 10,
        "seed": 0,
        "lr": 2e-4,
        "epochs": 60,
        "patience": 15,
    }

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler

        hp = self.hparams
        if not 0 < int(hp["t_start"]) <= int(hp["timesteps"]):
            raise ValueError("model 'ddpm': t_start must be in 1..timesteps")
        n = len(self.contrasts)
        unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=n, out_channels=n,
            channels=tuple(int(c) for c in hp["channels"]),
            attention_levels=(False,) * (len(hp["channels"]) - 1) + (bool(hp["attention_lowest"]),),
            num_res_blocks=int(hp["num_res_blocks"]),
            norm_num_groups=int(hp["norm_num_groups"]),
            num_head_channels=int(hp["num_head_channels"]),
        )
        self.net = NoisePredictor(unet)
        sched = DDPMScheduler(num_train_timesteps=int(hp["timesteps"]), schedule="linear_beta")
        self.alphas_cumprod = sched.alphas_cumprod.float().clone()

    def crop_multiple(self) -> tuple[int, str]:
        return 2 ** (len(self.hparams["channels"]) - 1), "2**(len(channels) - 1)"

    # -- training --------------------------------------------------------------------------
    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        """(x_t, t, eps): the clean slice noised to a random timestep (draws from ``gen``)."""
        n = clean.shape[0]
        t = torch.randint(0, int(self.hparams["timesteps"]), (n,), generator=gen,
                          device=gen.device)
        noise = torch.randn(clean.shape, generator=gen, device=gen.device).to(clean.device,
                                                                             clean.dtype)
        abar = self.alphas_cumprod.to(t.device)[t].to(clean.device).view(n, 1, 1, 1)
        noisy = abar.sqrt() * to_diffusion(clean) + (1 - abar).sqrt() * noise
        return noisy, t.to(clean.device), noise

    def loss_fn(self, out, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The standard epsilon MSE over the whole slice (the background must be restored
        too, or the partial-noise restoration would leave noise there)."""
        pred, noise = out
        return F.mse_loss(pred.float(), noise.float())

    # -- scoring ---------------------------------------------------------------------------
    def restore(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise ``x`` to ``t_start`` and denoise with ``steps`` DDIM steps (eta = 0)."""
        hp = self.hparams
        t0, steps = int(hp["t_start"]), max(1, int(hp["steps"]))
        abar = self.alphas_cumprod.to(x.device)
        ts = torch.linspace(t0 - 1, 0, steps).round().long().tolist()
        ts = sorted(set(ts), reverse=True)
        noise = torch.randn(x.shape, generator=gen).to(x.device, torch.float32)
        a = abar[ts[0]]
        xt = a.sqrt() * to_diffusion(x.float()) + (1 - a).sqrt() * noise
        unet = self.net.unet
        for i, t in enumerate(ts):
            a = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=x.device)
            eps = unet(xt, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
            eps = eps.float()
            x0 = ((xt - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)
            xt = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return from_diffusion(xt)

    def _forward_recon(self, x: torch.Tensor) -> torch.Tensor:
        return self.restore(x, self._gen)

    @torch.no_grad()
    def reconstruct(self, volume, mask, device="cpu"):
        self._gen = torch.Generator().manual_seed(int(self.hparams["seed"]))
        return super().reconstruct(volume, mask, device=device)
