"""The GPU scoring math (torch) against the scipy reference, run here on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_anomaly.calibration import statmap_torch as st
from bids_anomaly.calibration.out_of_fold import calibrate
from bids_anomaly.calibration.types import ScoringParams
from bids_anomaly.inference.scoring import score_volume


class _Smooth:
    """A stand-in model: its reconstruction is the volume smoothed (a residual with
    structure at edges, like a real one)."""

    contrasts = ["T1w"]

    def reconstruct(self, volume, mask, device="cpu"):
        return np.stack([ndimage.gaussian_filter(c, 1.5) for c in volume]).astype(np.float32)


def _brain(shape=(40, 44, 36)):
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2
    r = np.sqrt((((idx - c[:, None, None, None]) / (c[:, None, None, None] * 0.8)) ** 2).sum(0))
    return r < 1.0


def _scan(rng, brain, lesion=False):
    vol = (ndimage.gaussian_filter(rng.standard_normal(brain.shape), 1.0) * 2 + 5) * brain
    if lesion:
        vol[18:24, 20:26, 15:20] *= 1.8
    return vol.astype(np.float32)[None]


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
def test_filters_match_scipy(sigma):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 23, 17)).astype(np.float32)
    m = rng.random((20, 23, 17)) > 0.3
    t = torch.from_numpy(x)
    assert np.array_equal(st.median3(t).numpy(), ndimage.median_filter(x, size=3))
    for it in (1, 2):
        assert np.array_equal(st.erode(torch.from_numpy(m), it).numpy(),
                              ndimage.binary_erosion(m, iterations=it))
    if sigma:
        np.testing.assert_allclose(st.gaussian_filter(t, sigma).numpy(),
                                   ndimage.gaussian_filter(x, sigma), atol=1e-5)


@pytest.mark.parametrize("smooth,baseline,csf,local", [
    (1.0, True, 1.0, 0.0), (0.0, False, 1.0, 0.0), (2.0, True, 1.0, 0.0), (1.0, True, 0.5, 0.0),
    (1.0, True, 0.5, 4.0)])
def test_torch_backend_gives_the_scipy_statmap(smooth, baseline, csf, local):
    """Same statmap (to float32 rounding), the same mask and scan score on either backend."""
    rng = np.random.default_rng(3)
    brain = _brain()
    params = ScoringParams(erosion=2, median_size=3, min_cluster_voxels=8,
                           scan_baseline=baseline, smooth_sigma=smooth, csf_weight=csf,
                           local_baseline_sigma=local)
    fit = [_scan(rng, brain) for _ in range(6)]
    held = [_scan(rng, brain) for _ in range(4)]
    cal = calibrate(_Smooth(), held, [brain] * 4, params, normative_volumes=fit,
                    normative_masks=[brain] * 6)
    for lesion in (False, True):
        vol = _scan(rng, brain, lesion)
        ref = score_volume(_Smooth(), vol, brain, cal, np.eye(4), backend="numpy")
        got = score_volume(_Smooth(), vol, brain, cal, np.eye(4), backend="torch")
        np.testing.assert_allclose(got.statmap, ref.statmap, atol=2e-4, rtol=1e-4)
        near = np.abs(ref.statmap - ref.threshold) < 1e-3  # a voxel on the threshold may flip
        assert np.array_equal(got.mask | near, ref.mask | near)
        assert got.score == pytest.approx(ref.score, rel=1e-4, abs=1e-4)
        if lesion:
            assert ref.mask[18:24, 20:26, 15:20].any()


@pytest.mark.parametrize("level", [0.4, 0.0])
def test_csf_weights_match_scipy(level):
    """The CSF-dark weights the GPU path computes for itself are the CPU's: by the fixed
    level and by the quantile, on a brain narrower than the Gaussian (scipy reflects again
    and again at the faces)."""
    from bids_anomaly.calibration.statmap import csf_weights

    rng = np.random.default_rng(5)
    brain = _brain()
    vol = _scan(rng, brain)
    vol[0, 16:24, 18:26, 14:22] *= 0.3  # a ventricle: darker than 0.4 of the local level
    params = ScoringParams(csf_weight=0.5, csf_level=level)
    ref = csf_weights(vol, brain, params)
    got = st.csf_weights(torch.from_numpy(vol), torch.from_numpy(brain), params).numpy()
    assert (ref == 0.5).sum() > 100
    assert np.mean(got != ref) < 1e-4  # a voxel exactly on the level may flip
    assert st.csf_weights(torch.from_numpy(vol), torch.from_numpy(brain),
                          ScoringParams(csf_weight=1.0)) is None


def test_auto_backend_is_numpy_on_the_cpu():
    rng = np.random.default_rng(4)
    brain = _brain()
    params = ScoringParams(smooth_sigma=1.0, scan_baseline=True)
    cal = calibrate(_Smooth(), [_scan(rng, brain) for _ in range(3)], [brain] * 3, params,
                    normative_volumes=[_scan(rng, brain) for _ in range(3)],
                    normative_masks=[brain] * 3)
    vol = _scan(rng, brain, True)
    auto = score_volume(_Smooth(), vol, brain, cal, np.eye(4))
    ref = score_volume(_Smooth(), vol, brain, cal, np.eye(4), backend="numpy")
    assert np.array_equal(auto.statmap, ref.statmap)
