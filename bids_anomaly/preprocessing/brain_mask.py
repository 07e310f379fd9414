"""Brain extraction: deepbet (weights from its wheel), detection of skull-stripped input."""

from __future__ import annotations

import functools

import nibabel as nb
import numpy as np
from scipy import ndimage

STRIPPED_MAX_ML = 2300.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels that differ from the background value (estimated on the image border)."""
    border = np.concatenate(
        [data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()]
    )
    bg = float(np.median(border))
    span = float(np.percentile(data, 99.5) - np.percentile(data, 0.5)) or 1.0
    fg = np.abs(data - bg) > 0.01 * span
    fg = ndimage.binary_opening(fg, iterations=1)
    fg = _largest_component(fg)
    return ndimage.binary_fill_holes(fg)


def skull_stripped_mask(img: nb.Nifti1Image) -> np.ndarray | None:
    """The brain mask of an already skull-stripped image, or None if the head is intact.

    An intact head (skull, scalp, often neck) has a foreground well above any brain volume;
    a stripped image's foreground is the brain itself (BraTS, open MS data).
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    fg = foreground_mask(data)
    vol_ml = float(fg.sum()) * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    if 300.0 < vol_ml < STRIPPED_MAX_ML:
        return fg
    return None


@functools.lru_cache(maxsize=1)
def _deepbet(device: str):
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=not device.startswith("cuda"))


def deepbet_mask(img: nb.Nifti1Image, device: str = "cpu") -> np.ndarray:
    """deepbet's brain mask on the image grid (its weights ship in the deepbet wheel)."""
    bet = _deepbet(device)
    _, mask_img, _ = bet.run(img)
    return np.asarray(mask_img.dataobj).reshape(img.shape[:3]) > 0
