"""Scoring and calibration: thresholds at FPRs, clusters, scores, percentiles."""

from __future__ import annotations

import numpy as np

from bids_anomaly.calibration import calibrate
from bids_anomaly.scoring import (
    ScoringParams,
    clusters_table,
    percentile_among,
    scan_score,
    threshold_mask,
)


class _Noise:
    """A stand-in model whose residual is the volume itself (calibration mechanics only)."""

    def residual(self, volume, mask, device="cpu"):
        return volume, volume[0] * mask


def test_calibrated_thresholds_hit_nominal_fpr():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    mask = np.ones(shape, bool)
    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1)
    healthy = [rng.standard_normal(shape).astype(np.float32)[None] for _ in range(3)]
    cal = calibrate(_Noise(), healthy, [mask] * 3, params)
    fresh = rng.standard_normal(shape).astype(np.float32)
    z = (fresh - cal.mu) / cal.sd
    for fpr, thr in cal.thresholds.items():
        observed = float((z > thr).mean())
        assert float(fpr) / 2 <= observed <= float(fpr) * 2
    assert len(cal.healthy_scores) == 3


def test_threshold_mask_drops_small_clusters():
    stat = np.zeros((20, 20, 20), np.float32)
    stat[2:6, 2:6, 2:6] = 5
    stat[15, 15, 15] = 5
    mask = threshold_mask(stat, 3.0, min_cluster_voxels=8)
    assert mask.sum() == 64 and not mask[15, 15, 15]


def test_clusters_table_sizes_and_coordinates():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20, -20, -20]
    stat = np.zeros((20, 20, 20), np.float32)
    stat[2:4, 10:12, 10:12] = 4.0  # x = -20 + 2*2.5 = -15 → left
    stat[15:18, 10:13, 10:13] = 6.0  # right, larger
    df = clusters_table(stat, stat > 0, affine)
    assert list(df.cluster_id) == [1, 2]
    np.testing.assert_allclose(df.size_mm3, [27 * 8.0, 8 * 8.0])
    assert df.hemisphere.tolist() == ["right", "left"]
    assert df.peak_z.tolist() == [6.0, 4.0]
    assert df.centroid_x.iloc[1] == -15.0


def test_scan_score_and_percentile():
    stat = np.zeros((10, 10, 10), np.float32)
    brain = np.ones_like(stat, bool)
    stat[0, 0, :] = 10.0
    assert scan_score(stat, brain, 0.01) == 10.0
    assert percentile_among(5.0, [1.0, 1.1, 0.9]) > 99
    assert percentile_among(1.0, [1.0, 1.1, 0.9]) < 60


def test_flag_score_is_the_flag_percentile():
    from bids_anomaly.scoring import flag_score

    healthy = [3.8, 4.5, 4.7, 4.1]
    thr = flag_score(healthy, 95.0)
    assert abs(percentile_among(thr, healthy) - 95.0) < 1e-6
    assert thr > max(healthy) - 0.5
