"""Shared plumbing of slice-wise networks (dae, ae, vae): crop, training, reconstruction."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..training import LossFn, TorchTrainer
from .base import AnomalyModel, FitContext
from .slices import crop_box, slices_to_volume, volume_to_slices

# Training defaults shared by every slice model (each may override some).
SLICE_DEFAULTS: dict = {
    "crop": [96, 112],
    "batch_size": 16,
    "lr": 1e-3,
    "epochs": 40,
    "patience": 10,
    "max_minutes": 15.0,
    "shift": 4,
    "aug_gamma": 0.1,
    "aug_bias": 0.1,
    "aug_affine": 5.0,
    "min_brain": 0.0,
}


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
