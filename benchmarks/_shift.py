"""The visible scanner-shift set: what differs between scanners and is not disease.

Applied to native healthy images, then run through the whole preprocessing; for measuring
only (never for training or calibration).
"""

from __future__ import annotations

import numpy as np


def scanner_shifts(data: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Scanner/protocol changes that are not disease, applied to a native image."""
    from scipy import ndimage

    x = data.astype(np.float32)
    top = float(np.percentile(x[x > 0], 99.5))
    bias = np.exp(0.25 * ndimage.gaussian_filter(rng.standard_normal(x.shape), 15) /
                  max(1e-6, ndimage.gaussian_filter(rng.standard_normal(x.shape), 15).std()))
    small = ndimage.zoom(x, (0.5, 0.5, 1.0), order=1)
    smooth = ndimage.gaussian_filter(x, 1.0)
    # Grey/white contrast: intensities around the image median pushed apart (a tissue warp).
    mid = float(np.median(x[x > 0.1 * top]))
    return {
        "sharpen": np.clip(x + 1.0 * (x - smooth), 0, None),
        "contrast": np.clip(mid + 1.3 * (x - mid), 0, None) * (x > 0.05 * top)
        + x * (x <= 0.05 * top),
        "quantised": np.round(x / top * 31) * top / 31,
        "gamma0.6": top * np.clip(x / top, 0, None) ** 0.6,
        "gamma1.5": top * np.clip(x / top, 0, None) ** 1.5,
        "thick6mm": ndimage.uniform_filter1d(x, 3, axis=2),
        "lowres": ndimage.zoom(small, np.array(x.shape) / np.array(small.shape), order=1),
        "noise": np.abs(x + rng.normal(0, 0.04 * top, x.shape)
                        + 1j * rng.normal(0, 0.04 * top, x.shape)).astype(np.float32),
        "bias": x * bias.astype(np.float32),
    }
