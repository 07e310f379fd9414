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


def _fill_holes(mask: np.ndarray, in_plane: int | None = None) -> np.ndarray:
    """Fill what the background cannot reach from the array border (3D, or slice by slice).

    ``in_plane`` = axis: fill each slice across that axis in 2D (connectivity within the slice,
    border = the slice's edges), which also closes a head cut open by the field of view.
    """
    structure = ndimage.generate_binary_structure(3, 1)
    faces = [0, 1, 2]
    if in_plane is not None:
        keep = [slice(None)] * 3
        keep[in_plane] = 1
        flat = np.zeros_like(structure)
        flat[tuple(keep)] = structure[tuple(keep)]
        structure = flat
        faces.remove(in_plane)
    lab, _ = ndimage.label(~mask, structure=structure)
    edge = [np.moveaxis(lab, ax, 0)[[0, -1]].ravel() for ax in faces]
    outside = np.zeros(int(lab.max()) + 1, bool)
    outside[np.unique(np.concatenate(edge))] = True
    outside[0] = False  # label 0 = the mask itself
    return ~outside[lab]


def image_support(data: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Where the image has content: voxels clearly off the background, holes filled.

    The background value and its noise are the median and MAD of the array border (a
    constant negative background, as in BraTS, or Rician noise around a raw head both work);
    "clearly off" = more than 5 noise SDs and 1 % of the robust intensity span (capped at
    10 % so a border that cuts through the head cannot hide the head). Dark tissue enclosed
    by brighter tissue (CSF, skull) is filled in 3D and slice by slice along each axis. Errors
    lean towards a larger support, so checks against it cannot fire on a real head.
    """
    data = np.asarray(data, dtype=np.float32)
    border = np.concatenate(
        [data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()]
    )
    bg = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - bg)))
    lo, hi = np.percentile(data, [0.5, 99.5])
    span = float(hi - lo) or float(data.max() - data.min()) or 1.0
    thr = min(max(0.01 * span, 5.0 * noise), 0.1 * span)
    fg = np.abs(data - bg) > thr
    support = _fill_holes(fg)
    for axis in range(3):
        support |= _fill_holes(fg, in_plane=axis)
    return support, {"background": bg, "noise": noise, "threshold": thr}


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
