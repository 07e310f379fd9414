"""Learned intensity standardisation (normalisation stage 2): maths, robustness, bundle card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_anomaly.preprocessing.normalise import normalise_intensity
from bids_anomaly.preprocessing.standardise import (
    PERCENTILES,
    IntensityStandardisation,
    apply_standardisation,
    learn_standardisation,
    scan_landmarks,
    standardisation_from_card,
    standardise_for_bundle,
)

SHAPE = (40, 48, 36)
_ZZ, _YY, _XX = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
_R = np.sqrt(((_ZZ - 20) / 18) ** 2 + ((_YY - 24) / 22) ** 2 + ((_XX - 18) / 16) ** 2)
MASK = _R < 1


def _raw(seed: int) -> np.ndarray:
    """Three-tissue phantom (WM 34%, GM 46%, CSF 20% of the brain) at a random scanner scale."""
    rng = np.random.default_rng(seed)
    tissue = np.where(_R < 0.7, 0.85, np.where(_R < 0.93, 0.6, 0.25))
    x = tissue * (1 + 0.06 * rng.standard_normal(SHAPE))
    return (rng.uniform(200, 900) * x + rng.uniform(-50, 50)).astype(np.float32)


def _stage1(raw: np.ndarray) -> np.ndarray:
    return normalise_intensity(raw, MASK)[None]


@pytest.fixture(scope="module")
def std() -> IntensityStandardisation:
    vols = [_stage1(_raw(s)) for s in range(6)]
    return learn_standardisation(vols, [MASK] * len(vols), ["T1w"])


def test_cohort_scan_lands_on_the_standard_landmarks(std):
    assert std.contrasts == ["T1w"] and std.n_scans == 6
    assert std.percentiles == PERCENTILES and max(std.percentiles) <= 90
    out = apply_standardisation(_stage1(_raw(2)), MASK, std)
    assert out.dtype == np.float32 and out.shape == (1, *SHAPE)
    assert np.all(out[:, ~MASK] == 0)
    got = np.percentile(out[0][MASK], std.percentiles)
    np.testing.assert_allclose(got, std.standard["T1w"], atol=1e-3)


def test_invariant_to_positive_affine_rescale(std):
    x = _stage1(_raw(7))
    a = apply_standardisation(x, MASK, std)
    b = apply_standardisation(x * 3 + 5, MASK, std)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bright_lesion_leaves_healthy_tissue_alone(std):
    raw = _raw(10)
    n_blob = int(0.05 * MASK.sum())
    dist = np.where(MASK, (_ZZ - 14) ** 2 + (_YY - 18) ** 2 + (_XX - 14) ** 2, 1e9)
    blob = np.zeros(SHAPE, bool)
    blob.ravel()[np.argsort(dist.ravel(), kind="stable")[:n_blob]] = True
    lesioned = raw.copy()
    lesioned[blob] *= 1.5
    a = apply_standardisation(_stage1(raw), MASK, std)[0]
    b = apply_standardisation(_stage1(lesioned), MASK, std)[0]
    healthy = MASK & ~blob
    rel = np.abs(b[healthy] - a[healthy]) / np.maximum(a[healthy], 1e-2)
    assert np.median(rel) < 0.01
    assert np.percentile(rel, 95) < 0.02
    assert rel.max() < 0.03
    assert b[blob].mean() > 1.3 * a[blob].mean()  # the lesion stays bright


def test_map_is_monotone_even_with_tied_landmarks(std):
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1.4, (1, *SHAPE)).astype(np.float32)
    vol[0, : SHAPE[0] // 3] = 0.0  # a third of the brain at one value: tied low landmarks
    lm = scan_landmarks(vol[0][MASK], std.percentiles)
    assert np.all(np.diff(lm) > 0)
    out = apply_standardisation(vol, MASK, std)
    assert np.all(np.isfinite(out))
    order = np.argsort(vol[0][MASK], kind="stable")
    assert np.all(np.diff(out[0][MASK][order]) >= 0)
    assert out.min() >= 0 and out.max() <= 1.5


def test_extrapolation_uses_the_wide_inner_slopes(std):
    vol = _stage1(_raw(3))
    src = scan_landmarks(vol[0][MASK], std.percentiles)
    dst = np.asarray(std.standard["T1w"])
    probe = vol.copy()
    i = np.flatnonzero(MASK.ravel())[0]
    probe.reshape(-1)[i] = src[-1] + 0.05  # one voxel just above the top landmark
    out = apply_standardisation(probe, MASK, std)
    slope = (dst[-1] - dst[-2]) / (src[-1] - src[-2])  # p50 -> p75 with the default landmarks
    assert std.top_span == (50.0, 75.0)
    assert out.reshape(-1)[i] == pytest.approx(dst[-1] + 0.05 * slope, rel=1e-3)


def test_missing_contrast_is_named(std):
    vol = np.stack([_stage1(_raw(1))[0]] * 2)
    with pytest.raises(ValueError, match="FLAIR"):
        apply_standardisation(vol, MASK, std, ["T1w", "FLAIR"])
    with pytest.raises(ValueError, match="2 channels"):
        apply_standardisation(vol, MASK, std)


def test_dict_round_trip_and_validation(std):
    d = json.loads(json.dumps(std.to_dict()))
    back = IntensityStandardisation.from_dict(d)
    assert back == std
    with pytest.raises(ValueError, match="90"):
        IntensityStandardisation((50.0, 99.0), {"T1w": (0.5, 1.0)}, top_span=(50.0, 99.0))


def test_bundle_card_hook(std):
    vol = _stage1(_raw(4))
    old = {"contrasts": ["T1w"], "normalisation": {"method": "per-volume", "clip": 1.5}}
    assert standardisation_from_card(old) is None
    assert standardise_for_bundle(vol, MASK, old) is vol  # older bundles: scored as before
    card = {"contrasts": ["T1w"], "normalisation": {"standardisation": std.to_dict()}}
    np.testing.assert_array_equal(standardise_for_bundle(vol, MASK, card),
                                  apply_standardisation(vol, MASK, std))


def test_fit_bundle_learns_on_fit_participants_and_records_it(tmp_path):
    """fit_bundle (zscore, template grid) writes the learned stage into the card."""
    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.models.bundle import load_bundle
    from bids_anomaly.training.fit import FitInputs, fit_bundle

    from .model_inputs import write_preprocessed

    template = load_template(2)
    rng = np.random.default_rng(0)
    images = [normalise_intensity(template.t1 * rng.uniform(0.5, 2.0)
                                  * (1 + 0.05 * rng.standard_normal(template.shape)),
                                  template.mask) for _ in range(4)]
    jsons = [j for j, _ in write_preprocessed(tmp_path, template.affine, images, template.mask)]
    subjects = [f"sub-{k}" for k in range(4)]
    inputs = FitInputs(preproc_jsons=jsons, subjects=subjects, scan_ids=subjects,
                       contrasts=["T1w"], model_type="zscore", model_name="z", model_config={},
                       preproc=PreprocConfig().to_dict(), folds=2,
                       dataset="synthetic", seed=0, device="cpu", threads=1, checkpoint=None,
                       resume=False)
    bundle = load_bundle(fit_bundle(inputs, tmp_path / "bundle"))
    norm = bundle.card["normalisation"]
    assert norm["per_volume"]["median_target"] == 0.7
    std = standardisation_from_card(bundle.card)
    assert std is not None and std.contrasts == ["T1w"]
    # The landmarks are learned on the whole healthy cohort (every fold calibrates on it).
    assert std.n_scans == len(bundle.card["training"]["participants"]) == 4
