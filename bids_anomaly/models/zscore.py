"""Voxel-wise normative model: mean and standard deviation of healthy intensities."""

from __future__ import annotations

import numpy as np
import torch

from .base import AnomalyModel, FitContext, register


@register
class ZScoreModel(AnomalyModel):
    """Not learned: the healthy mean is the reconstruction, |x - mean| / std the residual."""

    type_name = "zscore"
    learned = False
    defaults = {"min_std": 0.05, "smooth_sigma": 1.0}
    # CSF-dark voxels at half weight (benchmarks/model_search.py, zscore+smooth1+csfw05):
    # BraTS AUPRC 0.279 -> 0.323, synthetic IXI lesions 0.611 -> 0.667, NiChart mask
    # FPR 2.8% -> 2.1%, no shifted healthy scan flagged; with the signed z's slowly varying
    # part removed and CSF-dark as below 0.4 of the local level (zscore+smooth1+csfl04+local8,
    # 3 seeds): BraTS 0.336, IXI 0.686, NiChart 2.3%.
    scoring_defaults = {"csf_weight": 0.5, "csf_level": 0.4, "local_baseline_sigma": 8.0}

    def fit(self, volumes, masks, ctx: FitContext) -> dict:
        from scipy import ndimage

        stack = np.stack([v * m[None] for v, m in zip(volumes, masks)])  # N, C, X, Y, Z
        count = np.stack(masks).sum(axis=0).astype(np.float32)
        denom = np.maximum(count, 1.0)[None]
        mean = stack.sum(axis=0) / denom
        var = ((stack - mean[None]) ** 2 * np.stack(masks)[:, None]).sum(axis=0) / denom
        std = np.sqrt(var)
        sigma = float(self.hparams["smooth_sigma"])
        if sigma > 0:
            std = np.stack([ndimage.gaussian_filter(s, sigma) for s in std])
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.std = np.ascontiguousarray(np.maximum(std, float(self.hparams["min_std"])),
                                        dtype=np.float32)
        return {"n_volumes": len(volumes)}

    def reconstruct(self, volume, mask, device="cpu"):
        return self.mean * mask[None]

    def residual(self, volume, mask, device="cpu"):
        recon = self.reconstruct(volume, mask)
        return recon, (np.abs(volume - recon) / self.std).mean(axis=0) * mask

    def state_dict(self):
        return {"mean": torch.from_numpy(np.ascontiguousarray(self.mean)),
                "std": torch.from_numpy(np.ascontiguousarray(self.std))}

    def load_state_dict(self, state):
        mean = state["mean"].numpy().astype(np.float32)
        std = state["std"].numpy().astype(np.float32)
        want = (len(self.contrasts), *self.shape)
        if mean.shape != want or std.shape != want:
            # Without this, a card naming other contrasts would broadcast silently.
            raise ValueError(f"zscore weights have shape {tuple(mean.shape)}, but the card's "
                             f"contrasts {self.contrasts} and shape need {want}")
        self.mean, self.std = mean, std
