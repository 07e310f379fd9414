"""From a raw residual to calibrated outputs: statmap, mask, clusters, per-scan score."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage


@dataclass(frozen=True)
class ScoringParams:
    """Post-processing and scoring choices (stored in the bundle with the calibration)."""

    erosion: int = 2
    median_size: int = 3
    min_cluster_voxels: int = 8
    top_fraction: float = 0.01
    flag_percentile: float = 95.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NormativeMaps:
    """Voxel-wise mean and standard deviation of the healthy signed residual, (C, X, Y, Z).

    ``sd`` already includes its floor, so ``(residual - mean) / sd`` is the z-map."""

    mean: np.ndarray
    sd: np.ndarray

    def z(self, residual: np.ndarray) -> np.ndarray:
        """Per-contrast z-map of a signed residual (C, X, Y, Z)."""
        return (residual - self.mean) / self.sd


def fit_normative(residuals: Iterable[tuple[np.ndarray, np.ndarray]], smooth_sigma: float = 1.0,
                  sd_floor: float = 0.5) -> NormativeMaps:
    """Voxel-wise statistics of healthy signed residuals ``(residual (C,X,Y,Z), brain mask)``.

    Running sums (one scan in memory at a time); both maps are smoothed with a Gaussian of
    ``smooth_sigma`` voxels, and the standard deviation is floored in quadrature by
    ``sd_floor`` times its in-brain median, so a voxel that happened to vary little in a small
    healthy cohort cannot turn noise into a huge z."""
    total = total_sq = count = None
    for res, mask in residuals:
        m = mask.astype(np.float64)[None]
        r = res.astype(np.float64) * m
        if total is None:
            total, total_sq, count = np.zeros_like(r), np.zeros_like(r), np.zeros(mask.shape)
        total += r
        total_sq += r * r
        count += mask
    if total is None:
        raise ValueError("normative statistics need at least one healthy scan")
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


@dataclass
class Calibration:
    """Healthy reference, measured on held-out healthy participants the model never saw.

    ``normative`` (voxel-wise residual statistics) is stored beside the card in the bundle;
    bundles without it standardise the model's raw residual by the pooled ``mu`` and ``sd``."""

    mu: float
    sd: float
    thresholds: dict[str, float]
    default_fpr: str
    healthy_scores: list[float]
    params: ScoringParams = field(default_factory=ScoringParams)
    participants: list[str] = field(default_factory=list)
    normative: NormativeMaps | None = field(default=None, repr=False, compare=False)
    normative_info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "normative"}
        d["params"] = self.params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        d = {k: v for k, v in d.items() if k != "normative"}
        d["params"] = ScoringParams(**d.get("params", {}))
        return cls(**d)


def anomaly_map(model, volume: np.ndarray, brain: np.ndarray, normative: NormativeMaps | None,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction and raw anomaly map (X, Y, Z).

    With normative maps: the mean over contrasts of |z| of the signed residual
    ``volume - reconstruction``; without (older bundles): the model's own residual."""
    if normative is None:
        return model.residual(volume, brain, device=device)
    recon = model.reconstruct(volume, brain, device=device)
    z = normative.z(volume - recon)
    return recon, (np.abs(z).mean(axis=0) * brain).astype(np.float32)


def postprocess(raw: np.ndarray, mask: np.ndarray, params: ScoringParams
                ) -> tuple[np.ndarray, np.ndarray]:
    """Median-filter the residual and keep it inside the brain mask eroded by ``erosion``."""
    eroded = mask.astype(bool)
    if params.erosion > 0:
        eroded = ndimage.binary_erosion(eroded, iterations=params.erosion)
    out = raw.astype(np.float32)
    if params.median_size > 1:
        out = ndimage.median_filter(out, size=params.median_size)
    return out * eroded, eroded


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


def _healthy_fit(healthy: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of the healthy scores (sd floored at 10% of the mean)."""
    h = np.asarray(healthy, dtype=float)
    mean = float(h.mean())
    sd = float(h.std(ddof=1)) if h.size > 1 else 0.0
    return mean, max(sd, 0.1 * abs(mean), 1e-6)


def percentile_among(score: float, healthy: list[float]) -> float:
    """Percentile of ``score`` under a normal fit to the healthy scores (0-100)."""
    if len(healthy) == 0 or not np.isfinite(score):
        return float("nan")
    mean, sd = _healthy_fit(healthy)
    return float(100.0 * 0.5 * (1.0 + math.erf((score - mean) / (sd * math.sqrt(2.0)))))


def flag_score(healthy: list[float], flag_percentile: float) -> float:
    """The per-scan score at which a scan is flagged (the ``flag_percentile`` of healthy)."""
    from statistics import NormalDist

    if len(healthy) == 0:
        return float("nan")
    mean, sd = _healthy_fit(healthy)
    return float(mean + sd * NormalDist().inv_cdf(flag_percentile / 100.0))


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


CLUSTER_COLUMNS = ["cluster_id", "size_mm3", "peak_z", "mean_z", "centroid_x", "centroid_y",
                   "centroid_z", "hemisphere"]


def clusters_table(statmap: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """One row per connected cluster of ``mask``, largest first, in template mm coordinates."""
    lab, n = ndimage.label(mask)
    vox_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for i in range(1, n + 1):
        sel = lab == i
        ijk = np.argwhere(sel).mean(axis=0)
        xyz = affine[:3, :3] @ ijk + affine[:3, 3]
        hemi = "left" if xyz[0] < -2 else "right" if xyz[0] > 2 else "midline"
        vals = statmap[sel]
        rows.append([0, float(sel.sum()) * vox_mm3, float(vals.max()), float(vals.mean()),
                     *(round(float(c), 1) for c in xyz), hemi])
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
    flagged: bool
    threshold: float
    clusters: pd.DataFrame


def score_volume(model, volume: np.ndarray, brain: np.ndarray, calib: Calibration,
                 affine: np.ndarray, device: str = "cpu") -> ScanResult:
    """Reconstruct, standardise, threshold and score one template-space volume."""
    recon, raw = anomaly_map(model, volume, brain, calib.normative, device=device)
    anomaly, eroded = postprocess(raw, brain, calib.params)
    statmap = to_statmap(anomaly, eroded, calib.mu, calib.sd)
    thr = float(calib.thresholds[calib.default_fpr])
    mask = threshold_mask(statmap, thr, calib.params.min_cluster_voxels)
    score = scan_score(statmap, eroded, calib.params.top_fraction)
    pct = percentile_among(score, calib.healthy_scores)
    return ScanResult(recon, statmap, mask, score, pct,
                      bool(np.isfinite(pct) and pct >= calib.params.flag_percentile), thr,
                      clusters_table(statmap, mask, affine))
