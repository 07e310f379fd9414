"""The MNI152NLin2009aSym template and its tissue maps, from nilearn's package data (offline)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nb
import numpy as np

TEMPLATE_NAME = "MNI152NLin2009aSym"
RESOLUTIONS = (1, 2)


@dataclass(frozen=True)
class Template:
    """Template images on one grid. Arrays are float32 (t1, gm, wm) and bool (mask)."""

    name: str
    resolution: int
    affine: np.ndarray
    t1: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)  # type: ignore[return-value]

    @property
    def csf(self) -> np.ndarray:
        """CSF probability: what is inside the mask and neither grey nor white matter."""
        return np.clip(self.mask.astype(np.float32) - self.gm - self.wm, 0.0, 1.0)

    def image(self, data: np.ndarray, dtype=np.float32) -> nb.Nifti1Image:
        """Wrap ``data`` (template-grid array) in a NIfTI image with the template affine."""
        img = nb.Nifti1Image(np.asarray(data, dtype=dtype), self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=4)
        img.set_sform(self.affine, code=4)
        return img


@functools.lru_cache(maxsize=4)
def load_template(resolution: int = 2) -> Template:
    """Load the template at 1 or 2 mm from nilearn's bundled files (no download)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"template resolution must be one of {RESOLUTIONS}, got {resolution}")
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    wm_img = datasets.load_mni152_wm_template(resolution=resolution)
    mask = np.asarray(mask_img.dataobj) > 0.5
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32) * mask
    gm = np.asarray(gm_img.dataobj, dtype=np.float32) * mask
    wm = np.asarray(wm_img.dataobj, dtype=np.float32) * mask
    for arr in (t1, gm, wm):
        arr.setflags(write=False)
    mask.setflags(write=False)
    return Template(TEMPLATE_NAME, resolution, t1_img.affine.copy(), t1, mask, gm, wm)
