"""Intensity normalisation inside the brain."""

from __future__ import annotations

import numpy as np

CLIP = 1.5


def normalise_intensity(data: np.ndarray, mask: np.ndarray, low: float = 0.5,
                        high: float = 99.0) -> np.ndarray:
    """Map the brain's ``low``..``high`` percentiles to 0..1, clip at 1.5, zero outside.

    Robust to inputs that were already z-scored or rescaled: only ranks inside the brain matter.
    """
    out = np.zeros_like(data, dtype=np.float32)
    if not mask.any():
        return out
    vals = data[mask]
    lo, hi = np.percentile(vals, [low, high])
    scale = float(hi - lo) or 1.0
    out[mask] = np.clip((vals - lo) / scale, 0.0, CLIP)
    return out
