"""Calibration: voxel-wise normative residual maps, FPR thresholds, healthy score distribution."""

from __future__ import annotations

import numpy as np

from .statmap import (
    anomaly_map,
    csf_weights,
    fit_normative,
    local_baseline,
    normative_from_sums,
    postprocess,
    residual_sums,
    robust_spread,
    scan_score,
    statmap_from_residual,
    threshold_mask,
    to_statmap,
)
from .types import Calibration, NormativeMaps, ScoringParams

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

        # Thresholds are computed with the maps exactly as the bundle stores them.
        normative = fit_normative(residuals(), NORMATIVE_SMOOTH_SIGMA,
                                  NORMATIVE_SD_FLOOR).as_stored()
        info = {"n_scans": len(normative_volumes), "smooth_sigma_voxels": NORMATIVE_SMOOTH_SIGMA,
                "sd_floor": NORMATIVE_SD_FLOOR,
                "storage_dtype": np.dtype(NormativeMaps.STORAGE_DTYPE).name,
                "statmap": "median-filtered mean over contrasts of |(residual - mean) / sd|"}
    anomalies = []
    for vol, msk in zip(volumes, masks):
        weights = csf_weights(vol, msk, params) if normative is not None else None
        _, raw = anomaly_map(model, vol, msk, normative, device=device, weights=weights,
                             local_sigma=params.local_baseline_sigma)
        anomalies.append(postprocess(raw, msk, params))
    pooled = np.concatenate([a[e] for a, e in anomalies])
    if normative is None:
        mu, sd = float(pooled.mean()), float(pooled.std()) or 1.0
    else:
        mu, sd = 0.0, 1.0  # the statmap is already a z-map
    z = (pooled - mu) / sd
    thresholds = {f: float(np.quantile(z, 1.0 - float(f))) for f in fprs}
    statmaps = [(to_statmap(a, e, mu, sd), e) for a, e in anomalies]
    scores = [scan_score(s, e, params.top_fraction) for s, e in statmaps]
    return Calibration(mu=mu, sd=sd, thresholds=thresholds, default_fpr=default_fpr,
                       healthy_scores=[float(s) for s in scores], params=params,
                       participants=list(participants or []), normative=normative,
                       normative_info=info,
                       mask_fpr=observed_mask_fpr(statmaps, thresholds, params))


def observed_mask_fpr(statmaps: list[tuple[np.ndarray, np.ndarray]],
                      thresholds: dict[str, float], params: ScoringParams) -> dict[str, float]:
    """Fraction of the eroded brain that the shipped mask (threshold, then the cluster filter)
    flags on healthy statmaps ``(statmap, eroded brain)``, pooled over scans, per FPR key."""
    out = {}
    for fpr, thr in thresholds.items():
        hits = sum(int(threshold_mask(s, thr, params.min_cluster_voxels)[e].sum())
                   for s, e in statmaps)
        out[fpr] = hits / max(1, sum(int(e.sum()) for _, e in statmaps))
    return out


def calibrate_out_of_fold(residuals: list[np.ndarray], masks: list[np.ndarray],
                          params: ScoringParams = ScoringParams(), fprs: tuple[str, ...] = FPRS,
                          default_fpr: str = "0.001",
                          participants: list[str] | None = None,
                          weights: list[np.ndarray | None] | None = None) -> Calibration:
    """The healthy reference from signed residuals of scans no model that made them had seen.

    ``residuals[i]`` (C, X, Y, Z) is ``volume - reconstruction`` of healthy scan ``i`` by a
    model that never trained on it (out-of-fold at ``train``; a new site's controls at
    ``calibrate``). All of them set the shipped voxel-wise normative maps. Each scan's own
    statmap, behind the thresholds, the healthy scores and the observed mask FPR, is computed
    against the maps of the *other* scans (leave one out), so a scan never standardises
    itself: the thresholds stay honest for a new scan although every healthy scan serves.
    With fewer than three scans no leave-one-out map exists and the shipped maps are used
    (in-sample, optimistic; the card's reference status then warns anyway).

    ``weights[i]``: scan ``i``'s raw-map weights (:func:`~.statmap.csf_weights` of its
    volume), as scoring will weight a new scan; None: unweighted."""
    if not residuals:
        raise ValueError("calibration needs at least one healthy scan")
    pairs = list(zip(residuals, masks))
    total, total_sq, count = residual_sums(pairs)
    shipped = _maps_from_sums(total, total_sq, count)
    loo = len(pairs) >= 3

    def own_maps(res: np.ndarray, msk: np.ndarray) -> NormativeMaps:
        if not loo:
            return shipped
        own_t, own_sq, own_c = residual_sums([(res, msk)])
        return _maps_from_sums(total - own_t, total_sq - own_sq, count - own_c)

    spread = None
    if params.scan_baseline:  # the reference's typical per-scan spread of z
        spreads = [robust_spread(local_baseline(own_maps(r, m).z(r), m,
                                                params.local_baseline_sigma), m)[1]
                   for r, m in pairs]
        spread = [float(v) for v in np.median(np.stack(spreads), axis=0)]
    statmaps = []
    for (res, msk), w in zip(pairs, weights or [None] * len(pairs), strict=True):
        raw = statmap_from_residual(res, msk, own_maps(res, msk), spread, w,
                                    params.local_baseline_sigma)
        a, e = postprocess(raw, msk, params)
        statmaps.append((to_statmap(a, e, 0.0, 1.0), e))
    pooled = np.concatenate([s[e] for s, e in statmaps])
    thresholds = {f: float(np.quantile(pooled, 1.0 - float(f))) for f in fprs}
    scores = [scan_score(s, e, params.top_fraction) for s, e in statmaps]
    info = {"n_scans": len(pairs), "smooth_sigma_voxels": NORMATIVE_SMOOTH_SIGMA,
            "sd_floor": NORMATIVE_SD_FLOOR,
            "storage_dtype": np.dtype(NormativeMaps.STORAGE_DTYPE).name,
            "residuals": "out-of-fold: each scan reconstructed by a model that never saw it",
            "thresholds": ("leave-one-out: each scan's statmap against the maps of the others"
                           if loo else "in-sample (fewer than 3 scans)"),
            "statmap": "median-filtered mean over contrasts of |(residual - mean) / sd|"}
    return Calibration(mu=0.0, sd=1.0, thresholds=thresholds, default_fpr=default_fpr,
                       healthy_scores=[float(s) for s in scores], params=params,
                       participants=list(participants or []), normative=shipped,
                       normative_info=info,
                       mask_fpr=observed_mask_fpr(statmaps, thresholds, params),
                       scan_spread=spread)


def _maps_from_sums(total, total_sq, count) -> NormativeMaps:
    """Normative maps from running sums, rounded as the bundle stores them."""
    return normative_from_sums(total, total_sq, count, NORMATIVE_SMOOTH_SIGMA,
                               NORMATIVE_SD_FLOOR).as_stored()
