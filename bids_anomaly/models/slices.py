"""2D slices of template-space volumes, for slice-wise networks.

A *view* is the orientation slices are cut in: ``axial`` (planes of constant z, the default),
``coronal`` (constant y) or ``sagittal`` (constant x). :func:`to_view` moves a volume's axes so
that the view's slice axis is last; the slicing functions below then always cut the last axis.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

# For each view: the spatial axes of (X, Y, Z) in the order (in-plane, in-plane, slice axis).
VIEW_AXES: dict[str, tuple[int, int, int]] = {
    "axial": (0, 1, 2),
    "coronal": (0, 2, 1),
    "sagittal": (1, 2, 0),
}


def to_view(arr: np.ndarray, view: str) -> np.ndarray:
    """(…, X, Y, Z) → (…, in-plane, in-plane, slice axis) of ``view`` (a view of the array)."""
    lead = arr.ndim - 3
    return arr.transpose(*range(lead), *(lead + a for a in VIEW_AXES[view]))


def from_view(arr: np.ndarray, view: str) -> np.ndarray:
    """The inverse of :func:`to_view`."""
    lead = arr.ndim - 3
    inverse = np.argsort(VIEW_AXES[view])
    return arr.transpose(*range(lead), *(lead + int(a) for a in inverse))


@functools.lru_cache(maxsize=8)
def template_resolution(shape: tuple[int, ...]) -> int | None:
    """The resolution (mm) of the template grid that has ``shape``; None for any other grid.

    Only a grid about as wide as the template at some resolution is compared, so small test
    grids load nothing but the coarse template."""
    from ..core.templates import RESOLUTIONS, load_template

    shape = tuple(int(s) for s in shape)
    coarse = load_template(max(RESOLUTIONS))
    width_mm = coarse.shape[0] * coarse.resolution
    for res in RESOLUTIONS:
        if abs(width_mm / res - shape[0]) <= 2 and load_template(res).shape == shape:
            return res
    return None


def crop_voxels(crop_mm, resolution: float, multiple: int) -> list[int]:
    """An in-plane crop of at least ``crop_mm`` millimetres in voxels of ``resolution`` mm,
    each side rounded up to a multiple of ``multiple`` (the network's downsampling factor)."""
    return [int(math.ceil(float(mm) / resolution / multiple - 1e-9)) * multiple
            for mm in crop_mm]


def crop_box(mask: np.ndarray, size: tuple[int, int]) -> tuple[slice, slice]:
    """A fixed in-plane (X, Y) crop of ``size`` centred on the brain mask's bounding box."""
    xs, ys = np.nonzero(mask.any(axis=2))
    box = []
    for idx, n, full in ((xs, size[0], mask.shape[0]), (ys, size[1], mask.shape[1])):
        centre = (int(idx.min()) + int(idx.max()) + 1) // 2
        start = int(np.clip(centre - n // 2, 0, max(0, full - n)))
        box.append(slice(start, start + n))
    return box[0], box[1]


def pad_to(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero-pad the two leading spatial axes of (C, X, Y, Z) up to ``size`` if smaller."""
    px = max(0, size[0] - arr.shape[1])
    py = max(0, size[1] - arr.shape[2])
    if px or py:
        arr = np.pad(arr, ((0, 0), (0, px), (0, py), (0, 0)))
    return arr


def volume_to_slices(volume: np.ndarray, mask: np.ndarray, box, min_brain: float = 0.0,
                     context: int = 0):
    """(C, X, Y, Z) → tensors (N, C, h, w) of axial slices and their z indices.

    With ``context`` k > 0 each slice carries its k neighbours on either side as channels:
    (N, C·(2k+1), h, w), ordered z-k … z+k (C contrasts each), zero beyond the volume."""
    vol = pad_to(volume * mask[None], (box[0].stop, box[1].stop))
    msk = pad_to(mask[None].astype(np.float32), (box[0].stop, box[1].stop))[0]
    v = vol[:, box[0], box[1], :]
    if context > 0:
        padded = np.pad(v, ((0, 0), (0, 0), (0, 0), (context, context)))
        depth = v.shape[-1]
        v = np.concatenate([padded[..., d : d + depth] for d in range(2 * context + 1)])
    m = msk[box[0], box[1], :]
    frac = m.mean(axis=(0, 1))
    keep = np.nonzero(frac > min_brain)[0]
    x = torch.from_numpy(np.ascontiguousarray(v[..., keep].transpose(3, 0, 1, 2)))
    mk = torch.from_numpy(np.ascontiguousarray(m[..., keep].transpose(2, 0, 1)))[:, None]
    return x.float(), mk.float(), keep


def slices_to_volume(slices: np.ndarray, keep: np.ndarray, box, shape) -> np.ndarray:
    """Inverse of :func:`volume_to_slices` (regions outside the crop are zero)."""
    c = slices.shape[1]
    full = np.zeros((c, max(shape[0], box[0].stop), max(shape[1], box[1].stop), shape[2]),
                    np.float32)
    full[:, box[0], box[1], keep] = slices.transpose(1, 2, 3, 0)
    return full[:, : shape[0], : shape[1], :]
