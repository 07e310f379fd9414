"""Denoising autoencoder with coarse noise (Kascenas et al. 2022), 2D axial slices."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..training import TorchTrainer
from .base import AnomalyModel, FitContext, register
from .slices import crop_box, slices_to_volume, volume_to_slices


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
class DAEModel(AnomalyModel):
    """MONAI 2D U-Net that removes coarse noise; what it cannot restore is anomalous."""

    type_name = "dae"
    defaults = {
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "crop": [96, 112],
        "noise_std": 0.2,
        "noise_scale": 8,
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
        self.box: tuple[slice, slice] | None = None

    def _box(self, mask: np.ndarray):
        if self.box is None:
            self.box = crop_box(mask, tuple(self.hparams["crop"]))
        return self.box

    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        noise = coarse_noise(clean, self.hparams["noise_std"], self.hparams["noise_scale"], gen)
        return clean + noise * mask

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
                out.append(self.net(xb).float().cpu())
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
