"""Residual → statmap math shared by calibration and scoring: normative maps,
per-scan baseline, smoothing, statmap, scan score, thresholded mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from .types import NormativeMaps, ScoringParams


def fit_normative(residuals: Iterable[tuple[np.ndarray, np.ndarray]], smooth_sigma: float = 1.0,
                  sd_floor: float = 0.5) -> NormativeMaps:
    """Voxel-wise statistics of healthy signed residuals ``(residual (C,X,Y,Z), brain mask)``.

    Running sums (one scan in memory at a time); both maps are smoothed with a Gaussian of
    ``smooth_sigma`` voxels, and the standard deviation is floored in quadrature by
    ``sd_floor`` times its in-brain median, so a voxel that happened to vary little in a small
    healthy cohort cannot turn noise into a huge z."""
    total, total_sq, count = residual_sums(residuals)
    if total is None:
        raise ValueError("normative statistics need at least one healthy scan")
    return normative_from_sums(total, total_sq, count, smooth_sigma, sd_floor)


def residual_sums(residuals: Iterable[tuple[np.ndarray, np.ndarray]]):
    """Running sums (sum, sum of squares, count) of signed residuals inside their masks;
    ``(None, None, None)`` for no residuals."""
    total = total_sq = count = None
    for res, mask in residuals:
        m = mask.astype(np.float64)[None]
        r = res.astype(np.float64) * m
        if total is None:
            total, total_sq, count = np.zeros_like(r), np.zeros_like(r), np.zeros(mask.shape)
        total += r
        total_sq += r * r
        count += mask
    return total, total_sq, count


def normative_from_sums(total: np.ndarray, total_sq: np.ndarray, count: np.ndarray,
                        smooth_sigma: float = 1.0, sd_floor: float = 0.5) -> NormativeMaps:
    """:func:`fit_normative` from running sums (so that scans can be left out by subtraction)."""
    n = np.maximum(count, 1.0)[None]
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    sd = np.sqrt(var)
    if smooth_sigma > 0:
        mean = np.stack([ndimage.gaussian_filter(c, smooth_sigma) for c in mean])
        sd = np.stack([ndimage.gaussian_filter(c, smooth_sigma) for c in sd])
    inside = count > 1
    typical = np.array([np.median(c[inside]) if inside.any() else 1.0 for c in sd])
    typical = np.maximum(typical, 1e-6)[:, None, None, None]
    sd = np.where(inside[None], np.sqrt(sd**2 + (sd_floor * typical) ** 2), typical)
    mean = np.where(inside[None], mean, 0.0)
    return NormativeMaps(mean.astype(np.float32), sd.astype(np.float32))


def anomaly_map(model, volume: np.ndarray, brain: np.ndarray, normative: NormativeMaps | None,
                device: str = "cpu", scan_spread: list[float] | None = None,
                weights: np.ndarray | None = None, local_sigma: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction and raw anomaly map (X, Y, Z).

    With normative maps: the mean over contrasts of |z| of the signed residual
    ``volume - reconstruction`` (:func:`statmap_from_residual`: local and per-scan baselines),
    times ``weights`` (:func:`csf_weights`) when given; without (older bundles): the model's
    own residual."""
    if normative is None:
        return model.residual(volume, brain, device=device)
    recon = model.reconstruct(volume, brain, device=device)
    return recon, statmap_from_residual(volume - recon, brain, normative, scan_spread, weights,
                                        local_sigma)


def statmap_from_residual(residual: np.ndarray, brain: np.ndarray, normative: NormativeMaps,
                          scan_spread: list[float] | None = None,
                          weights: np.ndarray | None = None, local_sigma: float = 0.0
                          ) -> np.ndarray:
    """Mean over contrasts of |z| of a signed residual (X, Y, Z): z less its slowly varying
    part (:func:`local_baseline`, ``local_sigma`` > 0), then :func:`scan_baseline` when
    ``scan_spread`` is given; times ``weights`` when given, 0 outside the brain."""
    z = local_baseline(normative.z(residual), brain, local_sigma)
    if scan_spread is not None:
        z = scan_baseline(z, brain, scan_spread)
    raw = np.abs(z).mean(axis=0) * brain
    if weights is not None:
        raw = raw * weights
    return raw.astype(np.float32)


# |z| above which a voxel stops pulling the local baseline (:func:`local_baseline`).
LOCAL_BASELINE_CLIP = 1.0


def local_baseline(z: np.ndarray, brain: np.ndarray, sigma: float,
                   clip: float = LOCAL_BASELINE_CLIP) -> np.ndarray:
    """Subtract the slowly varying part of a signed z-map (C, X, Y, Z): per contrast, a
    Gaussian of ``sigma`` voxels inside the brain of z clipped to ±``clip``. Shading left by
    N4 shows as a smooth signed residual; a lesion, clipped, moves the local level little.
    ``sigma`` 0: unchanged."""
    if sigma <= 0:
        return z
    inside = brain.astype(bool)
    return np.stack([c - _masked_smooth(np.clip(c, -clip, clip), inside, sigma)
                     for c in z]).astype(np.float32)


def csf_weights(volume: np.ndarray, brain: np.ndarray, params: ScoringParams
                ) -> np.ndarray | None:
    """Per-voxel weights of the raw map: ``params.csf_weight`` on the scan's CSF-dark voxels,
    1 elsewhere; None when the weight is 1 (off).

    CSF-dark: the first contrast (the T1w) relative to its local brain level (a Gaussian of
    ``csf_sigma`` voxels inside the brain, so residual shading does not pick the darker side
    of the head) below ``csf_level`` of that level, or (``csf_level`` 0) below its own
    ``csf_quantile`` inside the brain. On a T1w that is CSF (0.4 of the local level is about
    the darkest tenth of an adult brain): ventricles and sulci, whose size varies with age and
    atrophy and is displaced by a mass, beyond what a small healthy reference covers. A lesion
    as dark as CSF is down-weighted too, but not removed."""
    if params.csf_weight == 1.0:
        return None
    inside = brain.astype(bool)
    if not inside.any():
        return None
    t1 = volume[0].astype(np.float32)
    rel = t1 / np.maximum(_masked_smooth(t1, inside, params.csf_sigma), 1e-6)
    level = (params.csf_level if params.csf_level > 0
             else np.quantile(rel[inside], params.csf_quantile))
    return np.where(inside & (rel < level), params.csf_weight, 1.0).astype(np.float32)


def robust_spread(z: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-contrast median and MAD-based sd (1.4826 × MAD) of a z-map (C, X, Y, Z) in the brain."""
    vals = z[:, brain]
    med = np.median(vals, axis=1)
    mad = 1.4826 * np.median(np.abs(vals - med[:, None]), axis=1)
    return med, np.maximum(mad, 1e-6)


def scan_baseline(z: np.ndarray, brain: np.ndarray, reference_spread: list[float]) -> np.ndarray:
    """Let the scan's healthy majority set its own baseline: per contrast, subtract the
    in-brain median of z and divide by the scan's robust spread relative to the healthy
    reference's (``reference_spread``: the median over reference scans), when larger.

    A scan from another scanner whose residual is shifted or wider everywhere is brought back
    to the reference's scale; lesions, a small minority of the brain, move the median and the
    MAD little, and a quiet scan is never amplified."""
    med, spread = robust_spread(z, brain)
    scale = np.maximum(1.0, spread / np.asarray(reference_spread, dtype=np.float64))
    return ((z - med[:, None, None, None]) / scale[:, None, None, None]).astype(np.float32)


def postprocess(raw: np.ndarray, mask: np.ndarray, params: ScoringParams
                ) -> tuple[np.ndarray, np.ndarray]:
    """Median-filter the residual and keep it inside the brain mask eroded by ``erosion``."""
    eroded = mask.astype(bool)
    if params.erosion > 0:
        eroded = ndimage.binary_erosion(eroded, iterations=params.erosion)
    out = raw.astype(np.float32)
    if params.median_size > 1:
        out = ndimage.median_filter(out, size=params.median_size)
    if params.smooth_sigma > 0:
        out = _masked_smooth(out, eroded, params.smooth_sigma)
    return out * eroded, eroded


def _masked_smooth(values: np.ndarray, inside: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``values`` within ``inside`` (normalised convolution: the zeros
    outside the brain do not pull the brain's edge down)."""
    w = inside.astype(np.float32)
    num = ndimage.gaussian_filter(values * w, sigma)
    den = ndimage.gaussian_filter(w, sigma)
    return np.where(inside, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)


def to_statmap(anomaly: np.ndarray, eroded: np.ndarray, mu: float, sd: float) -> np.ndarray:
    """Standardise against the healthy residual distribution (0 outside the eroded brain)."""
    z = (anomaly - mu) / (sd if sd > 0 else 1.0)
    return np.where(eroded, z, 0.0).astype(np.float32)


def scan_score(statmap: np.ndarray, eroded: np.ndarray, top_fraction: float) -> float:
    """Mean of the top ``top_fraction`` of in-brain statmap values (robust to lone voxels)."""
    vals = statmap[eroded]
    if vals.size == 0:
        return float("nan")
    k = max(1, int(round(top_fraction * vals.size)))
    return float(np.mean(np.partition(vals, vals.size - k)[-k:]))


def threshold_mask(statmap: np.ndarray, threshold: float, min_cluster_voxels: int) -> np.ndarray:
    """Binary mask of ``statmap > threshold`` without clusters smaller than the minimum."""
    mask = statmap > threshold
    if min_cluster_voxels > 1 and mask.any():
        lab, n = ndimage.label(mask)
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= min_cluster_voxels
        mask = keep[lab]
    return mask
