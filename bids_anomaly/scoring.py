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
    # Per-scan median/spread standardisation of the z-map (:func:`scan_baseline`); False for
    # bundles written before it existed.
    scan_baseline: bool = False
    # Gaussian smoothing (sigma in voxels) of the median-filtered map: an extended low-contrast
    # deviation (oedema) adds up; 0 for bundles written before it existed.
    smooth_sigma: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NormativeMaps:
    """Voxel-wise mean and standard deviation of the healthy signed residual, (C, X, Y, Z).

    ``sd`` already includes its floor, so ``(residual - mean) / sd`` is the z-map."""

    mean: np.ndarray
    sd: np.ndarray

    # How the bundle stores the maps (half the size; smooth maps lose ~1e-3 relative).
    STORAGE_DTYPE = np.float16

    def z(self, residual: np.ndarray) -> np.ndarray:
        """Per-contrast z-map of a signed residual (C, X, Y, Z)."""
        return (residual - self.mean) / self.sd

    def as_stored(self) -> NormativeMaps:
        """The maps exactly as scoring will load them from the bundle (rounded through
        ``STORAGE_DTYPE``, back in float32): thresholds must be computed on these."""
        return NormativeMaps(self.mean.astype(self.STORAGE_DTYPE).astype(np.float32),
                             self.sd.astype(self.STORAGE_DTYPE).astype(np.float32))


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


@dataclass
class Calibration:
    """Healthy reference, measured on held-out healthy participants the model never saw.

    ``thresholds`` are voxel-FPR quantiles of the statmap before the cluster filter;
    ``mask_fpr`` is what the shipped mask (threshold + cluster filter) actually flags on the
    same calibration scans. ``normative`` (voxel-wise residual statistics) is stored beside
    the card in the bundle; bundles without it standardise the model's raw residual by the
    pooled ``mu`` and ``sd``."""

    mu: float
    sd: float
    thresholds: dict[str, float]
    default_fpr: str
    healthy_scores: list[float]
    params: ScoringParams = field(default_factory=ScoringParams)
    participants: list[str] = field(default_factory=list)
    normative: NormativeMaps | None = field(default=None, repr=False, compare=False)
    normative_info: dict = field(default_factory=dict)
    mask_fpr: dict[str, float] = field(default_factory=dict)
    # Median over the reference scans of their per-contrast robust z spread (scan_baseline).
    scan_spread: list[float] | None = None

    @property
    def reference(self) -> dict:
        """How many healthy scans the percentiles and thresholds rest on, and a warning."""
        return reference_status(len(self.healthy_scores))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "normative"}
        d["params"] = self.params.to_dict()
        d["reference"] = self.reference
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        d = {k: v for k, v in d.items() if k not in ("normative", "reference")}
        d["params"] = ScoringParams(**d.get("params", {}))
        return cls(**d)


def anomaly_map(model, volume: np.ndarray, brain: np.ndarray, normative: NormativeMaps | None,
                device: str = "cpu", scan_spread: list[float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruction and raw anomaly map (X, Y, Z).

    With normative maps: the mean over contrasts of |z| of the signed residual
    ``volume - reconstruction`` (after :func:`scan_baseline` when ``scan_spread`` is given);
    without (older bundles): the model's own residual."""
    if normative is None:
        return model.residual(volume, brain, device=device)
    recon = model.reconstruct(volume, brain, device=device)
    return recon, statmap_from_residual(volume - recon, brain, normative, scan_spread)


def statmap_from_residual(residual: np.ndarray, brain: np.ndarray, normative: NormativeMaps,
                          scan_spread: list[float] | None = None) -> np.ndarray:
    """Mean over contrasts of |z| of a signed residual (X, Y, Z), 0 outside the brain."""
    z = normative.z(residual)
    if scan_spread is not None:
        z = scan_baseline(z, brain, scan_spread)
    return (np.abs(z).mean(axis=0) * brain).astype(np.float32)


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


# The healthy reference behind percentiles and the scan-level flag (see ``reference_status``).
MIN_REFERENCE_SCANS = 2  # a standard deviation needs two scores: below, no percentile at all
RECOMMENDED_REFERENCE_SCANS = 10  # below, reports and cards warn (see ``reference_status``)


def reference_status(n: int) -> dict:
    """How far ``n`` healthy reference scores support a percentile and a 95th-percentile flag.

    Percentiles come from the Student-t *predictive* distribution of a new healthy score given
    ``n`` reference scores (normal model, unknown mean and sd), so the flag threshold widens by
    itself as ``n`` shrinks and a new healthy scan exceeds the 95th percentile 5% of the time
    whatever ``n`` is (under the normal model). Two scores are the minimum for any percentile;
    below ``RECOMMENDED_REFERENCE_SCANS`` the threshold is wide (t multiplier 1.92 at n = 10
    against 1.645 for a known normal; 2.60 at n = 4, 7.7 at n = 2) and rests on the normality
    assumption alone, so cards and reports carry a warning."""
    n = int(n)
    if n < MIN_REFERENCE_SCANS:
        level = "refused"
        msg = (f"the healthy reference has {n} scan(s): at least {MIN_REFERENCE_SCANS} are "
               "needed for a percentile, so no percentile or flag is given")
    elif n < RECOMMENDED_REFERENCE_SCANS:
        level = "warning"
        msg = (f"the healthy reference has only {n} scans (recommended: at least "
               f"{RECOMMENDED_REFERENCE_SCANS}); percentiles and the flag threshold rest on a "
               "normal model fitted to them and are wide and uncertain")
    else:
        level = "ok"
        msg = ""
    return {"n_scans": n, "minimum": MIN_REFERENCE_SCANS,
            "recommended": RECOMMENDED_REFERENCE_SCANS, "level": level, "message": msg}


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
    flagged: bool | None  # None: the healthy reference is too small for a flag
    threshold: float
    clusters: pd.DataFrame


def score_volume(model, volume: np.ndarray, brain: np.ndarray, calib: Calibration,
                 affine: np.ndarray, device: str = "cpu") -> ScanResult:
    """Reconstruct, standardise, threshold and score one template-space volume."""
    recon, raw = anomaly_map(model, volume, brain, calib.normative, device=device,
                             scan_spread=calib.scan_spread if calib.params.scan_baseline
                             else None)
    anomaly, eroded = postprocess(raw, brain, calib.params)
    statmap = to_statmap(anomaly, eroded, calib.mu, calib.sd)
    thr = float(calib.thresholds[calib.default_fpr])
    mask = threshold_mask(statmap, thr, calib.params.min_cluster_voxels)
    score = scan_score(statmap, eroded, calib.params.top_fraction)
    pct = percentile_among(score, calib.healthy_scores)
    flagged = bool(pct >= calib.params.flag_percentile) if np.isfinite(pct) else None
    return ScanResult(recon, statmap, mask, score, pct, flagged, thr,
                      clusters_table(statmap, mask, affine))
