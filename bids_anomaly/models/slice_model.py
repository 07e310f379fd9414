"""Shared plumbing of slice-wise networks (dae, ae, vae, ddpm): crop, training, reconstruction.

The in-plane crop is sized in millimetres (``crop_mm``) and converted to voxels at the
template's resolution, rounded up to a multiple of the network's downsampling factor. The
resolved crop is written back to the hyper-parameters (``crop`` in voxels, ``crop_mm`` its
size in mm), so the model card states both. Bundles from before ``crop_mm`` carry ``crop`` in
voxels: an explicit ``crop`` wins and keeps them loading and scoring as before.

``views`` lists the orientations slices are cut in, axial first. With more than one, the model
holds one network per view (each the same architecture, trained in turn on the same scans,
the time budget shared), and its reconstruction combines the views' (``view_combine``, the
mean by default): a voxel is restored from three different 2D neighbourhoods, so what one
view copies or misses the others need not. The axial network is the single-view model
itself (its weights ``net.*``, its checkpoint ``ctx.checkpoint``); a coronal or sagittal one
crops the axial crop's X or Y side by the whole grid's height, and stores its tensors under
``<view>.``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import AnomalyModel, FitContext
from .slices import (
    VIEW_AXES,
    crop_box,
    crop_voxels,
    from_view,
    slices_to_volume,
    template_resolution,
    to_view,
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
    # Slice orientations, axial first; one network per view, reconstructions combined
    # voxel by voxel (view_combine): "mean", "median", or "closest" (the view's
    # reconstruction nearest the scan: a voxel is anomalous only if no view restores it).
    "views": ["axial"],
    "view_combine": "mean",
}


class SliceModel(AnomalyModel):
    """Shared plumbing of slice-wise networks: crop box, fit via TorchTrainer, reconstruction,
    tensors-only state (``net.*`` and ``crop_box``). Subclasses set ``self.net``."""

    net: nn.Module
    loss_fn: LossFn | None = None  # None: the trainer's masked MSE

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        views = [str(v) for v in self.hparams["views"]] or ["axial"]
        if views[0] != "axial" and len(views) > 1 or len(set(views)) != len(views) or \
                any(v not in VIEW_AXES for v in views):
            raise ValueError(f"model '{self.type_name}': views {views} must be distinct "
                             f"names of {sorted(VIEW_AXES)}, axial first")
        self.hparams["views"] = views
        if self.hparams["view_combine"] not in VIEW_COMBINE:
            raise ValueError(f"model '{self.type_name}': view_combine "
                             f"{self.hparams['view_combine']!r} is not one of {VIEW_COMBINE}")
        self.view = views[0]
        self._resolve_crop(hparams or {})
        self.box: tuple[slice, slice] | None = None
        self._others: list[SliceModel] | None = None  # built on first use (see view_models)

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

    def view_models(self) -> list[SliceModel]:
        """The model of every view: this one (the first view), then one per further view.

        The further ones are built on first use, after the subclass has built ``net``, so the
        first view's initial weights are those of a single-view model with the same seed."""
        if self._others is None:
            self._others = [type(self)(self.contrasts, self.shape, self._view_hparams(v))
                            for v in self.hparams["views"][1:]]
        return [self, *self._others]

    def _view_hparams(self, view: str) -> dict:
        """A further view's hyper-parameters: its own in-plane crop (the axial crop's X or Y
        side by the grid's height, rounded up to the crop multiple)."""
        hp = self.hparams
        factor = self.crop_multiple()[0]
        height = int(math.ceil(self.shape[2] / factor)) * factor
        crop = [hp["crop"][0] if view == "coronal" else hp["crop"][1], height]
        return {**hp, "views": [view], "crop": crop, "crop_mm": None}

    def _box(self, mask: np.ndarray):
        """The in-plane crop of this model's view (``mask`` already in the view's axes)."""
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
        models = self.view_models()
        if len(models) == 1:
            return self._fit_view(volumes, masks, ctx)
        histories = {}
        for model in models:  # the time budget is shared: each view gets its part
            ckpt = ctx.checkpoint
            if ckpt and model is not self:
                path = Path(ckpt)
                ckpt = str(path.with_name(f"{path.stem}-{model.view}{path.suffix}"))
            LOG.info("model '%s': training the %s view (%d of %d)", self.type_name,
                     model.view, len(histories) + 1, len(models))
            histories[model.view] = model._fit_view(
                volumes, masks, replace(ctx, checkpoint=ckpt),
                max_minutes=float(self.hparams["max_minutes"]) / len(models))
        best = [h["best_epoch"] for h in histories.values() if h.get("best_epoch")]
        losses = [h["best_val_loss"] for h in histories.values()
                  if h.get("best_val_loss") is not None]
        return {**histories[self.view],
                "best_epoch": int(np.median(best)) if best else None,
                "best_val_loss": float(np.mean(losses)) if losses else None,
                "views": {v: {"best_epoch": h.get("best_epoch"),
                              "best_val_loss": h.get("best_val_loss"),
                              "epochs_run": len(h.get("history", []))}
                          for v, h in histories.items()}}

    def _fit_view(self, volumes, masks, ctx: FitContext,
                  max_minutes: float | None = None) -> dict:
        """Train this view's network alone."""
        volumes = [to_view(v, self.view) for v in volumes]
        masks = [to_view(m, self.view) for m in masks]
        union = np.any(np.stack(masks), axis=0)
        box = self._box(union)
        xs, ms = zip(*[self._slices(v, m, box, self.hparams["min_brain"])[:2]
                       for v, m in zip(volumes, masks)])
        val = [self._slices(to_view(v, self.view), to_view(m, self.view), box,
                            self.hparams["min_brain"])[:2]
               for v, m in zip(ctx.val_volumes, ctx.val_masks)]
        # What the run's fingerprint sees: the axial network trains as a single-view model
        # does (its checkpoints resume either way); a further view adds its name.
        hp = {k: v for k, v in self.hparams.items() if k != "views"}
        if self.view != "axial":
            hp["view"] = self.view
        if max_minutes is not None:
            hp["max_minutes"] = max_minutes
        trainer = TorchTrainer(self.net, hp, ctx, model=self.type_name)
        return trainer.fit(
            torch.cat(xs), torch.cat(ms),
            torch.cat([v[0] for v in val]) if val else None,
            torch.cat([v[1] for v in val]) if val else None,
            make_input=self.make_input,
            loss_fn=self.loss_fn,
        )

    def reconstruct(self, volume, mask, device="cpu"):
        models = self.view_models()
        if len(models) == 1:
            return self._reconstruct_view(volume, mask, device)
        return combine_views(np.stack([m._reconstruct_view(volume, mask, device)
                                       for m in models]), volume, self.hparams["view_combine"])

    @torch.no_grad()
    def _reconstruct_view(self, volume, mask, device="cpu"):
        """This view's reconstruction, on the (C, X, Y, Z) grid of ``volume``."""
        volume, vmask = to_view(volume, self.view), to_view(mask, self.view)
        box = self._box(vmask)
        x, m, keep = self._slices(volume, vmask, box, 0.0)
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
        rec = slices_to_volume(rec, keep, box, volume.shape[1:]) * vmask[None]
        return np.ascontiguousarray(from_view(rec, self.view))

    def state_dict(self):
        state = {f"net.{k}": v.detach().cpu().contiguous()
                 for k, v in self.net.state_dict().items()}
        if self.box is not None:
            state["crop_box"] = torch.tensor([self.box[0].start, self.box[1].start])
        for other in self.view_models()[1:]:
            state.update({f"{other.view}.{k}": v for k, v in other.state_dict().items()})
        return state

    def load_state_dict(self, state):
        for other in self.view_models()[1:]:
            prefix = f"{other.view}."
            other.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                   if k.startswith(prefix)})
        net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        self.net.load_state_dict(net)
        if "crop_box" in state:
            x0, y0 = (int(v) for v in state["crop_box"])
            cx, cy = self.hparams["crop"]
            self.box = (slice(x0, x0 + cx), slice(y0, y0 + cy))


VIEW_COMBINE = ("mean", "median", "closest")


def combine_views(recs: np.ndarray, volume: np.ndarray, how: str) -> np.ndarray:
    """One reconstruction (C, X, Y, Z) from the views' (V, C, X, Y, Z), voxel by voxel."""
    if how == "median":
        return np.median(recs, axis=0)
    if how == "closest":  # per voxel and contrast, the view nearest the scan
        pick = np.abs(recs - volume[None]).argmin(axis=0)
        return np.take_along_axis(recs, pick[None], axis=0)[0]
    return recs.mean(axis=0)


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
