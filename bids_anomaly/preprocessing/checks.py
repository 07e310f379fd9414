"""Input sanity checks: every failure is a DataError that names the file and the problem."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..core.errors import DataError
from .brain_mask import image_support

MIN_VOXEL_MM = 0.2
MAX_VOXEL_MM = 8.0
MAX_VOXELS = 512**3
MIN_FOV_MM = 60.0

# Brain mask sanity (see check_brain). Measured on the 40 real development scans (deepbet, and
# the "already stripped" masks) vs a 113 mL ball of noise on zeros (deepbet: a 2.0-2.5 L mask).
# mask / image foreground: real <= 1.31 (deepbet on stripped BraTS; 0.10-0.38 for T1w with
# skull), ball 15-22. Margin 2.3x on the real side, 5x on the ball's.
MAX_MASK_TO_SUPPORT = 3.0
# fraction of the mask inside the image foreground: real >= 0.75, ball 0.03-0.05
MIN_MASK_IN_SUPPORT = 1.0 / 3.0
# principal extents of the mask (99 % of it): real 100-178 mm, shortest/longest 0.66-0.79
# (synthetic test heads up to 193 mm); no head is 260 mm long. They catch slabs, rods and
# sheets, not the ball (its mask is round).
MIN_EXTENT_MM = 50.0
MAX_EXTENT_MM = 260.0
MIN_FLATNESS = 0.3
# largest connected piece / whole mask: real >= 0.9999
MIN_LARGEST_PIECE = 0.5


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


def check_brain(
    mask: np.ndarray,
    zooms: tuple[float, ...],
    path: Path | str,
    data: np.ndarray | None = None,
) -> None:
    """Refuse a brain mask that is not a brain: too small, not shaped like a brain, or (given
    the image ``data``) far larger than the image's content or lying on its background.

    The image criteria catch a brain extractor that "finds" a brain in an image without a head
    (a ball of noise on zeros got a 1.6-2.5 L deepbet mask). Margins on 40 real scans (healthy
    and elderly with skull, skull-stripped BraTS and MNI): mask/foreground <= 1.31, inside
    >= 0.75; principal extents 100-178 mm, shortest/longest >= 0.66, one piece (>= 99.99 %).
    """
    mask = np.asarray(mask, dtype=bool)
    voxel_ml = float(np.prod(zooms[:3])) / 1000.0
    vol_ml = float(mask.sum()) * voxel_ml
    if vol_ml < 300.0:
        raise DataError(
            f"{path}: brain extraction found {vol_ml:.0f} mL of brain (expected 800-2000 mL); "
            "the scan may not contain a brain"
        )
    if data is not None:
        _check_mask_against_image(mask, data, voxel_ml, vol_ml, path)
    _check_mask_shape(mask, zooms, vol_ml, path)


def _check_mask_against_image(mask, data, voxel_ml, vol_ml, path) -> None:
    support, _ = image_support(np.asarray(data).reshape(mask.shape))
    fg_ml = float(support.sum()) * voxel_ml
    ratio = vol_ml / max(fg_ml, voxel_ml)
    if ratio > MAX_MASK_TO_SUPPORT:
        raise DataError(
            f"{path}: brain mask ({vol_ml:.0f} mL) is {ratio:.1f}x the image's foreground "
            f"({fg_ml:.0f} mL of non-background voxels): the image may not contain a head"
        )
    inside = float((mask & support).sum()) / float(mask.sum())
    if inside < MIN_MASK_IN_SUPPORT:
        raise DataError(
            f"{path}: {100 * (1 - inside):.0f}% of the brain mask ({vol_ml:.0f} mL) lies on the "
            f"image background (foreground {fg_ml:.0f} mL): the image may not contain a head "
            "or brain extraction failed"
        )


def mask_principal_extents(mask: np.ndarray, zooms: tuple[float, ...]) -> np.ndarray:
    """Lengths (mm, largest first) of the mask along its principal axes, any orientation.

    Robust: the 0.5-99.5 percentiles of the voxels' positions along each axis (an ellipsoid
    measures 92 % of its diameters), so a thin fringe (background noise taken into the
    "already stripped" mask of a noisy image) does not count.
    """
    xyz = np.argwhere(mask).astype(np.float64) * np.asarray(zooms[:3], dtype=np.float64)
    xyz -= xyz.mean(axis=0)
    _, axes = np.linalg.eigh(np.cov(xyz.T))
    lo, hi = np.percentile(xyz @ axes, [0.5, 99.5], axis=0)
    return np.sort(hi - lo)[::-1]


def _check_mask_shape(mask, zooms, vol_ml, path) -> None:
    lab, n = ndimage.label(mask)
    piece = mask
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        largest = float(sizes.max()) / float(sizes.sum())
        if largest < MIN_LARGEST_PIECE:
            raise DataError(
                f"{path}: brain mask ({vol_ml:.0f} mL) is scattered in {n} pieces, the largest "
                f"only {largest:.0%} of it: not a brain"
            )
        piece = lab == int(np.argmax(sizes)) + 1
    ext = mask_principal_extents(piece, zooms)
    if ext[0] > MAX_EXTENT_MM or ext[-1] < MIN_EXTENT_MM or ext[-1] < MIN_FLATNESS * ext[0]:
        sizes_mm = " x ".join(f"{e:.0f}" for e in ext)
        raise DataError(
            f"{path}: brain mask ({vol_ml:.0f} mL) is not shaped like a brain: {sizes_mm} mm "
            f"along its principal axes (99 % of it; expected {MIN_EXTENT_MM:.0f}-"
            f"{MAX_EXTENT_MM:.0f} mm, the shortest at least {MIN_FLATNESS:.0%} of the longest)"
        )
