"""Scoring parameters, normative residual maps and a bundle's calibration (types)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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
    # Weight of CSF-dark voxels in the raw map (the darkest ``csf_quantile`` of the scan's
    # first contrast inside the brain, relative to its local level over a Gaussian of
    # ``csf_sigma`` voxels): their deviations mostly measure the size of the CSF spaces (age,
    # atrophy, mass effect), which healthy people vary in more than a small reference covers
    # (:func:`~.statmap.csf_weights`). 1: off, as for bundles written before it existed.
    csf_weight: float = 1.0
    csf_quantile: float = 0.1
    csf_sigma: float = 15.0
    # CSF-dark by a fixed level instead: below ``csf_level`` of the local level (0: by
    # ``csf_quantile``). It follows how much CSF a scan has, so a brain with little CSF does
    # not lend the weighting to its dark lesions.
    csf_level: float = 0.0
    # Signed z minus its slowly varying part (:func:`~.statmap.local_baseline`), voxels; 0 off.
    local_baseline_sigma: float = 0.0

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
