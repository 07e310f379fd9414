"""Input sanity checks: every failure is a DataError that names the file and the problem."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import DataError

MIN_VOXEL_MM = 0.2
MAX_VOXEL_MM = 8.0
MAX_VOXELS = 512**3
MIN_FOV_MM = 60.0


def load_checked(path: Path | str) -> nb.Nifti1Image:
    """Load a structural image and check that it can be used; return a 3D float32 image.

    Accepts 3D images and 4D images with a single volume. Raises :class:`DataError` for
    unreadable or truncated files, wrong dimensionality, non-finite voxels, implausible
    voxel sizes, a singular affine, a tiny field of view, huge dimensions or an empty image.
    """
    path = Path(path)
    try:
        img = nb.load(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file does not exist") from exc
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI image ({exc})") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(
            f"{path}: expected a 3D image (or 4D with one volume), got shape {img.shape}"
        )
    if int(np.prod(shape)) > MAX_VOXELS:
        raise DataError(f"{path}: image dimensions {shape} are too large (> 512^3 voxels)")
    if min(shape) < 8:
        raise DataError(f"{path}: image dimensions {shape} are too small for a brain scan")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms < MIN_VOXEL_MM) or np.any(
        zooms > MAX_VOXEL_MM
    ):
        raise DataError(
            f"{path}: implausible voxel size {tuple(np.round(zooms, 3).tolist())} mm "
            f"(expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm)"
        )
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(f"{path}: the image affine is singular or not finite")
    fov = np.asarray(shape) * np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(fov < MIN_FOV_MM):
        raise DataError(
            f"{path}: field of view {tuple(np.round(fov, 1).tolist())} mm "
            "is too small for a whole brain"
        )
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise DataError(f"{path}: file is truncated or corrupt ({exc})") from exc
    if not np.all(np.isfinite(data)):
        n_bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: contains {n_bad} NaN or infinite voxels")
    if float(data.max()) == float(data.min()):
        raise DataError(f"{path}: image is constant ({float(data.min())}): no brain to analyse")
    out = nb.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def check_brain(mask: np.ndarray, zooms: tuple[float, ...], path: Path | str) -> None:
    """Refuse a brain mask whose volume is not that of a brain (no brain in the scan)."""
    vol_ml = float(mask.sum()) * float(np.prod(zooms[:3])) / 1000.0
    if vol_ml < 300.0:
        raise DataError(
            f"{path}: brain extraction found {vol_ml:.0f} mL of brain (expected 800-2000 mL); "
            "the scan may not contain a brain"
        )
