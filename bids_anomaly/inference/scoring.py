"""From a raw residual to calibrated outputs: statmap, mask, clusters, per-scan score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from ..calibration.statmap import (
    anomaly_map,
    csf_weights,
    postprocess,
    scan_score,
    threshold_mask,
    to_statmap,
)
from ..calibration.types import MIN_REFERENCE_SCANS, Calibration


def _predictive(healthy: list[float]) -> tuple[float, float, int] | None:
    """(mean, predictive scale, degrees of freedom) of a new healthy score, or None (< 2)."""
    h = np.asarray([x for x in healthy if np.isfinite(x)], dtype=float)
    if h.size < MIN_REFERENCE_SCANS:
        return None
    sd = max(float(h.std(ddof=1)), 1e-6 * max(1.0, abs(float(h.mean()))))
    return float(h.mean()), sd * math.sqrt(1.0 + 1.0 / h.size), int(h.size - 1)


def percentile_among(score: float, healthy: list[float]) -> float:
    """Percentile (0-100) of ``score`` under the predictive distribution of a healthy score.

    NaN when the reference has fewer than ``MIN_REFERENCE_SCANS`` scores."""
    from scipy.stats import t as student_t

    fit = _predictive(list(healthy))
    if fit is None or not np.isfinite(score):
        return float("nan")
    mean, scale, dof = fit
    return float(100.0 * student_t.cdf((score - mean) / scale, dof))


def flag_score(healthy: list[float], flag_percentile: float) -> float:
    """The per-scan score at which a scan is flagged (the ``flag_percentile`` of healthy)."""
    from scipy.stats import t as student_t

    fit = _predictive(list(healthy))
    if fit is None:
        return float("nan")
    mean, scale, dof = fit
    return float(mean + scale * student_t.ppf(flag_percentile / 100.0, dof))


CLUSTER_COLUMNS = ["cluster_id", "size_mm3", "peak_z", "mean_z", "centroid_x", "centroid_y",
                   "centroid_z", "hemisphere", "darker_fraction"]


def clusters_table(statmap: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                   signed: np.ndarray | None = None) -> pd.DataFrame:
    """One row per connected cluster of ``mask``, largest first, in template mm coordinates.

    ``signed`` (X, Y, Z): the scan minus its pseudo-healthy reconstruction, averaged over
    contrasts; ``darker_fraction`` is the share of the cluster's voxels where the scan is
    darker than expected (n/a without it). On a T1w, a cluster that is darker throughout and
    sits on CSF is often an enlarged ventricle or sulcus (ageing, mass effect) rather than a
    focal lesion: a reviewer sees it at once."""
    lab, n = ndimage.label(mask)
    vox_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for i in range(1, n + 1):
        sel = lab == i
        ijk = np.argwhere(sel).mean(axis=0)
        xyz = affine[:3, :3] @ ijk + affine[:3, 3]
        hemi = "left" if xyz[0] < -2 else "right" if xyz[0] > 2 else "midline"
        vals = statmap[sel]
        darker = round(float((signed[sel] < 0).mean()), 3) if signed is not None else np.nan
        rows.append([0, float(sel.sum()) * vox_mm3, float(vals.max()), float(vals.mean()),
                     *(round(float(c), 1) for c in xyz), hemi, darker])
    df = pd.DataFrame(rows, columns=CLUSTER_COLUMNS)
    df = df.sort_values("size_mm3", ascending=False).reset_index(drop=True)
    df["cluster_id"] = np.arange(1, len(df) + 1)
    return df


@dataclass
class ScanResult:
    """Template-space outputs of scoring one scan."""

    recon: np.ndarray
    statmap: np.ndarray
    mask: np.ndarray
    score: float
    percentile: float
    flagged: bool | None  # None: the healthy reference is too small for a flag
    threshold: float
    clusters: pd.DataFrame


def score_volume(model, volume: np.ndarray, brain: np.ndarray, calib: Calibration,
                 affine: np.ndarray, device: str = "cpu", backend: str = "auto") -> ScanResult:
    """Reconstruct, standardise, threshold and score one template-space volume.

    ``backend``: ``numpy`` (scipy, the reference), ``torch`` (the same math on ``device``:
    :mod:`~bids_anomaly.calibration.statmap_torch`) or ``auto`` (torch on CUDA for bundles
    with normative maps, else numpy). Cluster labelling runs on the CPU either way."""
    spread = calib.scan_spread if calib.params.scan_baseline else None
    if backend == "auto":
        backend = ("torch" if str(device).startswith("cuda") and calib.normative is not None
                   and calib.params.median_size in (1, 3) else "numpy")
    thr = float(calib.thresholds[calib.default_fpr])
    if backend == "torch":
        recon, statmap, score = _statmap_on_device(model, volume, brain, calib, spread, device)
    else:
        weights = csf_weights(volume, brain, calib.params) if calib.normative is not None \
            else None
        recon, raw = anomaly_map(model, volume, brain, calib.normative, device=device,
                                 scan_spread=spread, weights=weights,
                                 local_sigma=calib.params.local_baseline_sigma)
        anomaly, eroded = postprocess(raw, brain, calib.params)
        statmap = to_statmap(anomaly, eroded, calib.mu, calib.sd)
        score = scan_score(statmap, eroded, calib.params.top_fraction)
    mask = threshold_mask(statmap, thr, calib.params.min_cluster_voxels)
    pct = percentile_among(score, calib.healthy_scores)
    flagged = bool(pct >= calib.params.flag_percentile) if np.isfinite(pct) else None
    return ScanResult(recon, statmap, mask, score, pct, flagged, thr,
                      clusters_table(statmap, mask, affine, (volume - recon).mean(axis=0)))


def _statmap_on_device(model, volume: np.ndarray, brain: np.ndarray, calib: Calibration,
                       spread: list[float] | None, device: str
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """(reconstruction, statmap, scan score) with the post-processing on ``device``."""
    import torch

    from ..calibration import statmap_torch as st

    if calib.normative is None:
        raise ValueError("the torch backend needs a bundle with normative maps")
    recon = model.reconstruct(volume, brain, device=device)
    with torch.no_grad():
        vol = torch.as_tensor(volume, dtype=torch.float32, device=device)
        rec = torch.as_tensor(recon, dtype=torch.float32, device=device)
        b = torch.as_tensor(np.asarray(brain, bool), device=device)
        w = st.csf_weights(vol, b, calib.params)
        raw = st.raw_map(vol, rec, b, calib.normative, spread, w,
                         calib.params.local_baseline_sigma)
        anomaly, eroded = st.postprocess(raw, b, calib.params)
        sd = calib.sd if calib.sd > 0 else 1.0
        statmap = torch.where(eroded, (anomaly - calib.mu) / sd, torch.zeros_like(anomaly))
        score = st.scan_score(statmap, eroded, calib.params.top_fraction)
        return recon, statmap.cpu().numpy().astype(np.float32), score
