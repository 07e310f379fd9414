"""Calibration on held-out healthy participants: residual statistics and FPR thresholds."""

from __future__ import annotations

import numpy as np

from .scoring import Calibration, ScoringParams, postprocess, scan_score, to_statmap

FPRS = ("0.01", "0.001")


def calibrate(model, volumes: list[np.ndarray], masks: list[np.ndarray],
              params: ScoringParams = ScoringParams(), fprs: tuple[str, ...] = FPRS,
              default_fpr: str = "0.001", device: str = "cpu",
              participants: list[str] | None = None) -> Calibration:
    """Thresholds at voxel false-positive rates and the healthy per-scan score distribution.

    Healthy residuals are pooled across the calibration scans; the statmap is the residual
    standardised by their mean and standard deviation, and each threshold is the
    ``1 - fpr`` quantile of the healthy statmap values inside the eroded brain.
    """
    if not volumes:
        raise ValueError("calibration needs at least one held-out healthy scan")
    anomalies = []
    for vol, msk in zip(volumes, masks):
        _, raw = model.residual(vol, msk, device=device)
        anomalies.append(postprocess(raw, msk, params))
    pooled = np.concatenate([a[e] for a, e in anomalies])
    mu, sd = float(pooled.mean()), float(pooled.std()) or 1.0
    z = (pooled - mu) / sd
    thresholds = {f: float(np.quantile(z, 1.0 - float(f))) for f in fprs}
    scores = [scan_score(to_statmap(a, e, mu, sd), e, params.top_fraction) for a, e in anomalies]
    return Calibration(mu=mu, sd=sd, thresholds=thresholds, default_fpr=default_fpr,
                       healthy_scores=[float(s) for s in scores], params=params,
                       participants=list(participants or []))
