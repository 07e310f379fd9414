"""Convolutional bottleneck autoencoder on 2D axial slices (Baur et al. 2021 style baseline).

The same slices, crop and training loop as the dae, but the input is the clean slice and the
network must squeeze it through a dense latent vector: what it cannot restore is anomalous.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..training import LossFn, TorchTrainer
from .base import AnomalyModel, FitContext, register
from .slices import crop_box, slices_to_volume, volume_to_slices


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


def bottom_shape(crop: list[int], channels: list[int], type_name: str) -> tuple[int, int]:
    """The feature-map size at the bottleneck; the crop must halve cleanly at every level."""
    f = 2 ** len(channels)
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


class SliceModel(AnomalyModel):
    """Shared plumbing of slice-wise networks: crop box, fit via TorchTrainer, reconstruction,
    tensors-only state (``net.*`` and ``crop_box``). Subclasses set ``self.net``."""

    net: nn.Module
    loss_fn: LossFn | None = None  # None: the trainer's masked MSE

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        self.box: tuple[slice, slice] | None = None

    def _box(self, mask: np.ndarray):
        if self.box is None:
            self.box = crop_box(mask, tuple(self.hparams["crop"]))
        return self.box

    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        return clean

    def _forward_recon(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def fit(self, volumes, masks, ctx: FitContext) -> dict:
        union = np.any(np.stack(masks), axis=0)
        box = self._box(union)
        xs, ms = zip(*[volume_to_slices(v, m, box, self.hparams["min_brain"])[:2]
                       for v, m in zip(volumes, masks)])
        val = [volume_to_slices(v, m, box, self.hparams["min_brain"])[:2]
               for v, m in zip(ctx.val_volumes, ctx.val_masks)]
        trainer = TorchTrainer(self.net, self.hparams, ctx)
        return trainer.fit(
            torch.cat(xs), torch.cat(ms),
            torch.cat([v[0] for v in val]) if val else None,
            torch.cat([v[1] for v in val]) if val else None,
            make_input=self.make_input,
            loss_fn=self.loss_fn,
        )

    @torch.no_grad()
    def reconstruct(self, volume, mask, device="cpu"):
        box = self._box(mask)
        x, m, keep = volume_to_slices(volume, mask, box, 0.0)
        self.net.to(device).eval()
        out = []
        use_amp = device.startswith("cuda")
        for i in range(0, len(x), 64):
            xb = x[i : i + 64].to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", enabled=use_amp):
                out.append(self._forward_recon(xb).float().cpu())
        rec = torch.cat(out).numpy() * m.numpy()
        return slices_to_volume(rec, keep, box, self.shape) * mask[None]

    def state_dict(self):
        state = {f"net.{k}": v.detach().cpu().contiguous()
                 for k, v in self.net.state_dict().items()}
        if self.box is not None:
            state["crop_box"] = torch.tensor([self.box[0].start, self.box[1].start])
        return state

    def load_state_dict(self, state):
        net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        self.net.load_state_dict(net)
        if "crop_box" in state:
            x0, y0 = (int(v) for v in state["crop_box"])
            cx, cy = self.hparams["crop"]
            self.box = (slice(x0, x0 + cx), slice(y0, y0 + cy))


@register
class AEModel(SliceModel):
    """Conv encoder → dense latent → mirrored decoder, trained to reproduce clean slices."""

    type_name = "ae"
    defaults = {
        "channels": [32, 64, 128, 256],
        "latent": 128,
        "crop": [96, 112],
        "batch_size": 16,
        "lr": 1e-3,
        "epochs": 40,
        "patience": 10,
        "max_minutes": 15.0,
        "shift": 4,
        "min_brain": 0.0,
    }

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        hp = self.hparams
        bottom = bottom_shape(hp["crop"], hp["channels"], self.type_name)
        self.net = BottleneckAE(len(self.contrasts), list(hp["channels"]), int(hp["latent"]),
                                bottom)
