"""Shared plumbing of slice-wise networks (dae, ae, vae, ddpm): crop, training, reconstruction.

The in-plane crop is sized in millimetres (``crop_mm``) and converted to voxels at the
template's resolution, rounded up to a multiple of the network's downsampling factor. The
resolved crop is written back to the hyper-parameters (``crop`` in voxels, ``crop_mm`` its
size in mm), so the model card states both. Bundles from before ``crop_mm`` carry ``crop`` in
voxels: an explicit ``crop`` wins and keeps them loading and scoring as before.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .base import AnomalyModel, FitContext
from .slices import (
    crop_box,
    crop_voxels,
    slices_to_volume,
    template_resolution,
    volume_to_slices,
)
from .trainer import LossFn, TorchTrainer

LOG = logging.getLogger("bids_anomaly")

INFERENCE_SEED = 20221  # seed of inference-time corruption (see ``inference_inputs``)

# Training defaults shared by every slice model (each may override some).
SLICE_DEFAULTS: dict = {
    "crop": None,  # in voxels; None: from crop_mm at the template's resolution
    # The template's brain box is 146 × 181 mm (MNI152NLin2009aSym, 1 and 2 mm): ≥ 20 mm margins.
    "crop_mm": [192, 224],
    "batch_size": 16,
    "lr": 1e-3,
    "epochs": 40,
    "patience": 10,
    "max_minutes": 15.0,
    "shift": 4,
    "aug_gamma": 0.1,
    "aug_bias": 0.1,
    "aug_affine": 5.0,
    "aug_contrast": 0.0,  # domain randomisation, off by default (see bids_anomaly.augment)
    "aug_blur": 0.0,
    "aug_warp": 0.0,  # anatomical randomisation: local expansion/contraction (see augment)
    "min_brain": 0.0,
}


class SliceModel(AnomalyModel):
    """Shared plumbing of slice-wise networks: crop box, fit via TorchTrainer, reconstruction,
    tensors-only state (``net.*`` and ``crop_box``). Subclasses set ``self.net``."""

    net: nn.Module
    loss_fn: LossFn | None = None  # None: the trainer's masked MSE

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        self._resolve_crop(hparams or {})
        self.box: tuple[slice, slice] | None = None

    def crop_multiple(self) -> tuple[int, str]:
        """The factor the network downsamples a slice by, and how it follows from the
        hyper-parameters: each side of the crop must be a multiple of it."""
        return 1, "1"

    def _resolve_crop(self, given: dict) -> None:
        """Set ``crop`` (voxels) and ``crop_mm`` (its size in mm; None off the template grid)."""
        hp, name = self.hparams, self.type_name
        res = template_resolution(self.shape)
        factor, expr = self.crop_multiple()
        if hp["crop"] is None:
            if res is None:
                raise ValueError(f"model '{name}': grid {list(self.shape)} is not a template "
                                 "grid, so crop_mm has no voxel size; set 'crop' in voxels")
            hp["crop"] = crop_voxels(hp["crop_mm"], res, factor)
        else:
            hp["crop"] = [int(c) for c in hp["crop"]]
            if given.get("crop_mm") is not None and res is not None and \
                    [c * res for c in hp["crop"]] != [float(v) for v in given["crop_mm"]]:
                raise ValueError(f"model '{name}': crop {hp['crop']} voxels at {res} mm is not "
                                 f"crop_mm {list(given['crop_mm'])}; set one of them")
        if len(hp["crop"]) != 2 or any(c % factor for c in hp["crop"]):
            raise ValueError(f"model '{name}': crop {hp['crop']} must be divisible by "
                             f"{expr} = {factor}")
        hp["crop_mm"] = [c * res for c in hp["crop"]] if res is not None else None

    def _box(self, mask: np.ndarray):
        if self.box is None:
            self.box = crop_box(mask, tuple(self.hparams["crop"]))
            _warn_if_cut(mask, self.hparams["crop"], self.type_name)
        return self.box

    @property
    def context(self) -> int:
        """Neighbouring slices on each side given to the network as channels (2.5D); 0: 2D."""
        return int(self.hparams.get("context", 0) or 0)

    @property
    def stacked_channels(self) -> int:
        """Channels of the network's input and output: every contrast at 2k+1 slices."""
        return len(self.contrasts) * (2 * self.context + 1)

    def _slices(self, volume: np.ndarray, mask: np.ndarray, box, min_brain: float):
        return volume_to_slices(volume, mask, box, min_brain, self.context)

    def make_input(self, clean: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        return clean

    def _forward_recon(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def inference_inputs(self, x: torch.Tensor, m: torch.Tensor,
                         gen: torch.Generator) -> list[torch.Tensor]:
        """The network inputs whose reconstructions are averaged at inference (the slices
        themselves by default; a model may corrupt them as in training, several times)."""
        return [x]

    def fit(self, volumes, masks, ctx: FitContext) -> dict:
        union = np.any(np.stack(masks), axis=0)
        box = self._box(union)
        xs, ms = zip(*[self._slices(v, m, box, self.hparams["min_brain"])[:2]
                       for v, m in zip(volumes, masks)])
        val = [self._slices(v, m, box, self.hparams["min_brain"])[:2]
               for v, m in zip(ctx.val_volumes, ctx.val_masks)]
        trainer = TorchTrainer(self.net, self.hparams, ctx, model=self.type_name)
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
        x, m, keep = self._slices(volume, mask, box, 0.0)
        self.net.to(device).eval()
        out = []
        # Inference is float32 on every device, whatever autocast a caller has switched on:
        # calibration (maybe on a GPU) and scoring (maybe on a CPU) must compute the same maps.
        kind = torch.device(device).type
        # Inference draws are seeded per call: calibration and scoring see the same noise.
        gen = torch.Generator().manual_seed(INFERENCE_SEED)
        for i in range(0, len(x), 64):
            xb = x[i : i + 64].to(device, non_blocking=True)
            mb = m[i : i + 64].to(device, non_blocking=True)
            with torch.autocast(device_type=kind, enabled=False):
                recs = [self._forward_recon(inp).float() for inp in
                        self.inference_inputs(xb, mb, gen)]
                out.append((sum(recs) / len(recs)).cpu())
        c, k = len(self.contrasts), self.context
        rec = torch.cat(out)[:, k * c : (k + 1) * c].numpy() * m.numpy()  # the central slice
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


def _warn_if_cut(mask: np.ndarray, crop: list[int], name: str) -> None:
    """Log when the brain's in-plane bounding box does not fit in the crop (the rest of the
    brain would be reconstructed as zero)."""
    xs, ys = np.nonzero(mask.any(axis=2))
    if not len(xs):
        return
    extent = [int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    if extent[0] > crop[0] or extent[1] > crop[1]:
        LOG.warning("model '%s': the brain's bounding box (%d × %d voxels) exceeds the crop "
                    "(%d × %d); what lies outside is reconstructed as zero (enlarge crop_mm)",
                    name, *extent, *crop)
