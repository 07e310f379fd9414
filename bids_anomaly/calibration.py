"""Calibration: voxel-wise normative residual maps, FPR thresholds, healthy score distribution."""

from __future__ import annotations

import numpy as np

from .scoring import (
    Calibration,
    ScoringParams,
    anomaly_map,
    fit_normative,
    postprocess,
    scan_score,
    to_statmap,
)

FPRS = ("0.01", "0.001")
NORMATIVE_SMOOTH_SIGMA = 1.0
NORMATIVE_SD_FLOOR = 0.5


def calibrate(model, volumes: list[np.ndarray], masks: list[np.ndarray],
              params: ScoringParams = ScoringParams(), fprs: tuple[str, ...] = FPRS,
              default_fpr: str = "0.001", device: str = "cpu",
              participants: list[str] | None = None,
              normative_volumes: list[np.ndarray] | None = None,
              normative_masks: list[np.ndarray] | None = None) -> Calibration:
    """Thresholds at voxel false-positive rates and the healthy per-scan score distribution.

    With ``normative_volumes`` (healthy scans, in practice the model's own training scans):
    the voxel-wise mean and standard deviation of the signed residual are estimated on them,
    and the statmap is the median-filtered mean |z| over contrasts. Without: the model's raw
    residual, standardised by its pooled mean and sd on ``volumes`` (older bundles).

    ``volumes`` are held-out healthy scans the model never saw: each threshold is the
    ``1 - fpr`` quantile of their statmap values inside the eroded brain, and their per-scan
    scores are the reference for percentiles. Keeping them apart from the normative scans is
    what makes the thresholds honest when the model fits its training scans better than new
    ones.
    """
    if not volumes:
        raise ValueError("calibration needs at least one held-out healthy scan")
    normative, info = None, {}
    if normative_volumes:
        masks_n = normative_masks or []

        def residuals():
            for vol, msk in zip(normative_volumes, masks_n):
                yield vol - model.reconstruct(vol, msk, device=device), msk

        normative = fit_normative(residuals(), NORMATIVE_SMOOTH_SIGMA, NORMATIVE_SD_FLOOR)
        info = {"n_scans": len(normative_volumes), "smooth_sigma_voxels": NORMATIVE_SMOOTH_SIGMA,
                "sd_floor": NORMATIVE_SD_FLOOR,
                "statmap": "median-filtered mean over contrasts of |(residual - mean) / sd|"}
    anomalies = []
    for vol, msk in zip(volumes, masks):
        _, raw = anomaly_map(model, vol, msk, normative, device=device)
        anomalies.append(postprocess(raw, msk, params))
    pooled = np.concatenate([a[e] for a, e in anomalies])
    if normative is None:
        mu, sd = float(pooled.mean()), float(pooled.std()) or 1.0
    else:
        mu, sd = 0.0, 1.0  # the statmap is already a z-map
    z = (pooled - mu) / sd
    thresholds = {f: float(np.quantile(z, 1.0 - float(f))) for f in fprs}
    scores = [scan_score(to_statmap(a, e, mu, sd), e, params.top_fraction) for a, e in anomalies]
    return Calibration(mu=mu, sd=sd, thresholds=thresholds, default_fpr=default_fpr,
                       healthy_scores=[float(s) for s in scores], params=params,
                       participants=list(participants or []), normative=normative,
                       normative_info=info)
