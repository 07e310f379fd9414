"""N4 bias-field correction with SimpleITK, inside the brain mask."""

from __future__ import annotations

import numpy as np


def n4_correct(
    data: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, ...],
    shrink: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    threads: int = 1,
) -> np.ndarray:
    """Return ``data`` divided by the N4 bias field estimated on a shrunk copy inside ``mask``."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    arr = data.astype(np.float32)
    lo = float(arr[mask].min()) if mask.any() else float(arr.min())
    shifted = arr - lo + 1.0  # N4 works in log space: intensities must be positive
    # SimpleITK arrays are z, y, x.
    img = sitk.GetImageFromArray(np.ascontiguousarray(shifted.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    msk.CopyInformation(img)
    small = sitk.Shrink(img, [shrink] * 3) if shrink > 1 else img
    small_mask = sitk.Shrink(msk, [shrink] * 3) if shrink > 1 else msk
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(img)
    bias = np.exp(sitk.GetArrayFromImage(log_bias).transpose(2, 1, 0))
    return (shifted / bias + lo - 1.0).astype(np.float32)
