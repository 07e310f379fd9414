"""Scoring and calibration: thresholds at FPRs, clusters, scores, percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from bids_anomaly.calibration.out_of_fold import calibrate
from bids_anomaly.calibration.statmap import scan_score, threshold_mask
from bids_anomaly.calibration.types import ScoringParams
from bids_anomaly.inference.scoring import clusters_table, percentile_among


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
    assert df.darker_fraction.isna().all()  # no reconstruction given
    signed = np.where(np.arange(20)[:, None, None] < 10, -0.3, 0.2) * np.ones((20, 20, 20))
    df = clusters_table(stat, stat > 0, affine, signed)
    assert df.darker_fraction.tolist() == [0.0, 1.0]  # right: brighter; left: darker


def test_scan_score_and_percentile():
    stat = np.zeros((10, 10, 10), np.float32)
    brain = np.ones_like(stat, bool)
    stat[0, 0, :] = 10.0
    assert scan_score(stat, brain, 0.01) == 10.0
    assert percentile_among(5.0, [1.0, 1.1, 0.9]) > 99
    assert percentile_among(1.0, [1.0, 1.1, 0.9]) < 60


def test_flag_score_is_the_flag_percentile():
    from bids_anomaly.inference.scoring import flag_score

    healthy = [3.8, 4.5, 4.7, 4.1]
    thr = flag_score(healthy, 95.0)
    assert abs(percentile_among(thr, healthy) - 95.0) < 1e-6
    assert thr > max(healthy) - 0.5


class _Mean:
    """A stand-in model whose reconstruction is zero: the residual is the volume itself."""

    contrasts = ["T1w"]

    def reconstruct(self, volume, mask, device="cpu"):
        return np.zeros_like(volume)


def _noisy(rng, shape, sd_map):
    return (rng.standard_normal(shape) * sd_map).astype(np.float32)[None]


def test_normative_calibration_evens_out_noisy_regions_and_hits_nominal_fpr():
    """Voxel-wise statistics: a region where healthy residuals vary 4x more must not hold
    most false positives, and the thresholds keep their nominal rate on fresh healthy scans."""
    rng = np.random.default_rng(1)
    shape = (32, 32, 32)
    mask = np.ones(shape, bool)
    sd_map = np.ones(shape, np.float32)
    sd_map[:8] = 4.0  # a quarter of the brain is noisy in every healthy scan
    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1)
    fit = [_noisy(rng, shape, sd_map) for _ in range(40)]
    held = [_noisy(rng, shape, sd_map) for _ in range(3)]
    cal = calibrate(_Mean(), held, [mask] * 3, params, normative_volumes=fit,
                    normative_masks=[mask] * 40)
    assert cal.normative is not None and cal.normative.mean.shape == (1, *shape)
    assert cal.normative.sd[0, :8].mean() > 3 * cal.normative.sd[0, 8:].mean()
    from bids_anomaly.calibration.statmap import anomaly_map

    fresh = _noisy(rng, shape, sd_map)
    _, stat = anomaly_map(_Mean(), fresh, mask, cal.normative)
    for fpr, thr in cal.thresholds.items():
        hits = stat > thr
        assert float(fpr) / 2 <= hits.mean() <= float(fpr) * 2
    hits = stat > cal.thresholds["0.01"]
    # Raw residuals would put nearly every hit in the noisy quarter; the z-map spreads them
    # (not evenly: the sd floor deliberately damps z where healthy residuals barely vary).
    assert hits[:8].sum() < 0.7 * hits.sum()


def test_normative_maps_travel_in_the_bundle(tmp_path):
    from bids_anomaly.models.base import FitContext
    from bids_anomaly.models.bundle import load_bundle, save_bundle
    from bids_anomaly.models.registry import get_model_class

    rng = np.random.default_rng(2)
    shape = (12, 14, 10)
    mask = np.zeros(shape, bool)
    mask[2:10, 2:12, 2:8] = True
    vols = [(rng.random((1, *shape)) * mask).astype(np.float32) for _ in range(4)]
    model = get_model_class("zscore")(["T1w"], shape)
    model.fit(vols[:3], [mask] * 3, FitContext())
    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1)
    cal = calibrate(model, vols[3:], [mask], params, normative_volumes=vols[:3],
                    normative_masks=[mask] * 3)
    card = {"name": "t", "template": "MNI152NLin2009aSym", "resolution": 2}
    bundle = load_bundle(save_bundle(tmp_path / "b", model, card, cal))
    got = bundle.calibration.normative
    np.testing.assert_allclose(got.mean, cal.normative.mean, atol=2e-3, rtol=1e-2)
    np.testing.assert_allclose(got.sd, cal.normative.sd, rtol=1e-2)
    assert bundle.calibration.thresholds == cal.thresholds
    assert bundle.calibration.normative_info["n_scans"] == 3


def test_csf_dark_voxels_count_at_their_weight_in_calibration_and_scoring():
    """The darkest tenth of a scan's brain (CSF on a T1w) weighs ``csf_weight`` in the raw
    map, at calibration as at scoring: a deviation there counts half, the same deviation in
    tissue counts fully, and the thresholds still hold their nominal rate on healthy scans."""
    from bids_anomaly.calibration.out_of_fold import calibrate_out_of_fold
    from bids_anomaly.calibration.statmap import csf_weights
    from bids_anomaly.inference.scoring import score_volume

    rng = np.random.default_rng(5)
    shape = (24, 24, 24)
    brain = np.ones(shape, bool)
    tissue = np.where(np.indices(shape)[0] < 4, 0.2, 1.0).astype(np.float32)  # 1/6 is "CSF"

    class Healthy:  # reconstructs every scan as the noise-free anatomy
        contrasts = ["T1w"]

        def reconstruct(self, volume, mask, device="cpu"):
            return tissue[None].copy()

    def scan():
        return (tissue + 0.05 * rng.standard_normal(shape)).astype(np.float32)[None]

    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1, csf_weight=0.5)
    assert csf_weights(scan(), brain, ScoringParams()) is None
    w = csf_weights(scan(), brain, params)
    assert (w == 0.5).mean() == pytest.approx(0.1, abs=0.005)
    assert np.all(w[4:] == 1.0)  # only CSF-dark voxels
    # By a fixed level: the CSF voxels (1/6 of this brain, about 0.2-0.45 of their local
    # level) and nothing else, however much CSF there is.
    level = csf_weights(scan(), brain, ScoringParams(csf_weight=0.5, csf_level=0.4))
    assert (level[:4] == 0.5).mean() > 0.98 and np.all(level[4:] == 1.0)

    healthy = [scan() for _ in range(12)]
    cal = calibrate_out_of_fold([v - tissue[None] for v in healthy], [brain] * 12, params,
                                weights=[csf_weights(v, brain, params) for v in healthy])
    fresh = [score_volume(Healthy(), scan(), brain, cal, np.eye(4)) for _ in range(4)]
    assert np.mean([r.mask.mean() for r in fresh]) <= 2 * float(cal.default_fpr)

    dev = scan()
    dev[0, 1, 5:9, 5:9] -= 0.5  # as dark a deviation in CSF ...
    dev[0, 12, 5:9, 5:9] -= 0.5  # ... as in tissue
    res = score_volume(Healthy(), dev, brain, cal, np.eye(4))
    plain = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1)
    raw = score_volume(Healthy(), dev, brain, calibrate_out_of_fold(
        [v - tissue[None] for v in healthy], [brain] * 12, plain), np.eye(4))
    assert res.statmap[1, 5:9, 5:9].mean() < 0.6 * raw.statmap[1, 5:9, 5:9].mean()
    assert res.statmap[12, 5:9, 5:9].mean() == pytest.approx(raw.statmap[12, 5:9, 5:9].mean(),
                                                             rel=0.05)


def test_local_baseline_quiets_smooth_shading_and_keeps_a_sharp_lesion():
    """A slowly varying residual (shading that N4 left behind, a gentle intensity ramp across
    the head) is not an anomaly: with the local baseline it stays within 2x the nominal rate,
    without it the mask fills; a sharp lesion scores as before."""
    from bids_anomaly.calibration.out_of_fold import calibrate_out_of_fold
    from bids_anomaly.inference.scoring import score_volume

    rng = np.random.default_rng(7)
    shape = (32, 32, 32)
    brain = np.ones(shape, bool)
    tissue = np.ones(shape, np.float32)

    class Healthy:  # reconstructs every scan as the unshaded anatomy
        contrasts = ["T1w"]

        def reconstruct(self, volume, mask, device="cpu"):
            return tissue[None].copy()

    def scan():
        return (tissue + 0.05 * rng.standard_normal(shape)).astype(np.float32)[None]

    shade = (1 + 0.05 * np.cos(np.pi * np.indices(shape)[0] / 31)).astype(np.float32)
    healthy = [scan() for _ in range(12)]
    lesion = scan()
    lesion[0, 12:16, 12:16, 12:16] -= 0.5
    shaded = [scan() * shade for _ in range(4)]
    rates, lesion_z = {}, {}
    for sigma in (0.0, 4.0):
        params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1,
                               local_baseline_sigma=sigma)
        cal = calibrate_out_of_fold([v - tissue[None] for v in healthy], [brain] * 12, params)
        rates[sigma] = np.mean([score_volume(Healthy(), v, brain, cal, np.eye(4)).mask.mean()
                                for v in shaded])
        res = score_volume(Healthy(), lesion, brain, cal, np.eye(4))
        assert res.mask[12:16, 12:16, 12:16].all()
        lesion_z[sigma] = res.statmap[12:16, 12:16, 12:16].mean()
    nominal = float(cal.default_fpr)
    assert rates[4.0] <= 2 * nominal < rates[0.0] / 1.5
    assert lesion_z[4.0] == pytest.approx(lesion_z[0.0], rel=0.05)
