"""N4 bias-field correction inside the brain mask: SimpleITK (the default), or antspyx's N4.

SimpleITK is the product's N4. ``BIDS_ANOMALY_N4_BACKEND=antspyx`` (read by the process
that builds the workflow, see :func:`n4_backend_from_env`) runs ANTs' N4 through antspyx
instead, with the same shrink factor, iterations, convergence threshold and B-spline mesh:
for an environment without SimpleITK (the GPU benchmark carries its packages as wheels, and
SimpleITK's alone would not fit). The two are close but not the same bytes; the backend is
recorded in ``preproc.json`` and the scores record, and it is part of the preprocessing
node's hash, so work directories never mix the two.
"""

from __future__ import annotations

import os

import numpy as np

N4_BACKENDS = ("simpleitk", "antspyx")
N4_BACKEND_ENV = "BIDS_ANOMALY_N4_BACKEND"
# SimpleITK's N4BiasFieldCorrectionImageFilter defaults, spelled out for the antspyx path.
_CONVERGENCE_THRESHOLD = 0.001
_CONTROL_POINTS = 4
_SPLINE_ORDER = 3


def n4_backend_from_env() -> str:
    """The N4 backend ``BIDS_ANOMALY_N4_BACKEND`` asks for (default ``simpleitk``)."""
    value = os.environ.get(N4_BACKEND_ENV, "").strip().lower() or "simpleitk"
    if value not in N4_BACKENDS:
        raise ValueError(f"{N4_BACKEND_ENV}={value!r}: expected one of {', '.join(N4_BACKENDS)}")
    return value


def n4_correct(
    data: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, ...],
    shrink: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    threads: int = 1,
    backend: str = "simpleitk",
) -> np.ndarray:
    """Return ``data`` divided by the N4 bias field estimated on a shrunk copy inside ``mask``."""
    if backend not in N4_BACKENDS:
        raise ValueError(f"unknown N4 backend {backend!r}: expected one of {N4_BACKENDS}")
    arr = data.astype(np.float32)
    lo = float(arr[mask].min()) if mask.any() else float(arr.min())
    shifted = arr - lo + 1.0  # N4 works in log space: intensities must be positive
    if backend == "antspyx":
        bias = _ants_bias_field(shifted, mask, spacing, shrink, iterations)
    else:
        bias = _sitk_bias_field(shifted, mask, spacing, shrink, iterations, threads)
    return (shifted / bias + lo - 1.0).astype(np.float32)


def _sitk_bias_field(shifted, mask, spacing, shrink, iterations, threads) -> np.ndarray:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
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
    return np.exp(sitk.GetArrayFromImage(log_bias).transpose(2, 1, 0))


def _ants_bias_field(shifted, mask, spacing, shrink, iterations) -> np.ndarray:
    """ANTs' N4 (antspyx) with SimpleITK's settings: the bias field on the full grid.

    ANTs runs single-threaded here as everywhere in the pipeline (registration.py): its
    thread count is read once per process, before antspyx's first call."""
    from .registration import _single_threaded

    _single_threaded()
    import ants

    sp = tuple(float(s) for s in spacing)
    img = ants.from_numpy(np.ascontiguousarray(shifted, dtype=np.float32), spacing=sp)
    msk = ants.from_numpy(np.ascontiguousarray(mask.astype(np.float32)), spacing=sp)
    field = ants.n4_bias_field_correction(
        img, mask=msk, shrink_factor=int(shrink), rescale_intensities=False,
        convergence={"iters": list(iterations), "tol": _CONVERGENCE_THRESHOLD},
        spline_param=[_CONTROL_POINTS - _SPLINE_ORDER] * 3, return_bias_field=True)
    return field.numpy().astype(np.float32)
