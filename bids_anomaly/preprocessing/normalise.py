"""Intensity normalisation inside the brain."""

from __future__ import annotations

import numpy as np

CLIP = 1.5
MEDIAN_TARGET = 0.7


def normalise_intensity(data: np.ndarray, mask: np.ndarray, low: float = 0.5) -> np.ndarray:
    """Map the brain's ``low`` percentile to 0 and its median to 0.7; clip at 1.5.

    The median, unlike a high percentile, barely moves when a large hyper-intense lesion
    fills a few percent of the brain, so lesions do not rescale the healthy tissue. Robust to
    inputs that were already z-scored or rescaled: only ranks inside the brain matter.
    """
    out = np.zeros_like(data, dtype=np.float32)
    if not mask.any():
        return out
    vals = data[mask]
    lo, med = np.percentile(vals, [low, 50.0])
    scale = float(med - lo) or 1.0
    out[mask] = np.clip((vals - lo) / scale * MEDIAN_TARGET, 0.0, CLIP)
    return out
