"""The healthy reference: who chooses the epoch, who sets thresholds, how far few scans go."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bids_anomaly.calibration.out_of_fold import calibrate
from bids_anomaly.calibration.statmap import anomaly_map, postprocess, threshold_mask, to_statmap
from bids_anomaly.calibration.types import (
    MIN_REFERENCE_SCANS,
    RECOMMENDED_REFERENCE_SCANS,
    ScoringParams,
    reference_status,
)
from bids_anomaly.core.errors import BundleError
from bids_anomaly.core.reference import file_sha256, reference_role
from bids_anomaly.inference.scoring import flag_score, percentile_among
from bids_anomaly.models.base import AnomalyModel, FitContext, register
from bids_anomaly.models.bundle import CARD, load_bundle, save_bundle, sha256
from bids_anomaly.models.registry import get_model_class

SEEN: dict = {}


class _Probe(AnomalyModel):
    """A learned model that records what ``fit`` was given (each scan's brain mask lacks as
    many voxels as its participant's label) and reconstructs nothing."""

    type_name = "probe-test"
    defaults: dict = {}

    def fit(self, volumes, masks, ctx: FitContext) -> dict:
        full = int(SEEN["full"])
        SEEN["calls"].append((sorted(full - int(m.sum()) for m in masks),
                              sorted(full - int(m.sum()) for m in ctx.val_masks)))
        return {"history": [], "best_epoch": 1, "best_val_loss": 0.0}

    def reconstruct(self, volume, mask, device="cpu"):
        return np.zeros_like(volume)

    def state_dict(self):
        return {"w": torch.zeros(1)}

    def load_state_dict(self, state):
        pass


@pytest.fixture
def probe_model():
    """``_Probe`` in the model registry for one test only (other tests list the registry)."""
    from bids_anomaly.models.base import REGISTRY

    register(_Probe)
    yield _Probe
    REGISTRY.pop(_Probe.type_name, None)


def _preproc_cohort(tmp_path, n: int):
    """``n`` template-space scans on disk; participant k's brain mask lacks k voxels."""
    from bids_anomaly.core.templates import load_template

    from .model_inputs import write_preprocessed

    template = load_template(2)
    SEEN["full"] = int(template.mask.sum())
    inside = np.argwhere(template.mask)
    rng = np.random.default_rng(0)
    masks, images = [], []
    for k in range(n):
        mask = template.mask.copy()
        mask[tuple(inside[: k + 1].T)] = False
        masks.append(mask)
        images.append(mask * (1 + 0.1 * rng.standard_normal(template.shape)))
    files = write_preprocessed(tmp_path, template.affine, images, masks)
    return [j for j, _ in files], [f"{k + 1}" for k in range(n)]


def test_folds_keep_fit_validation_and_calibration_apart():
    from bids_anomaly.training.fit import plan_folds

    subjects = [f"{i:02d}" for i in range(10)]
    for seed in range(5):
        plan = plan_folds(subjects, 5, seed)
        assert len(plan) == 5
        # Every participant calibrates exactly once.
        assert sorted(p for f in plan for p in f.calibration) == subjects
        for f in plan:
            sets = [set(f.fit), set(f.validation), set(f.calibration)]
            assert sorted(f.fit + f.validation + f.calibration) == subjects
            assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
            assert len(f.calibration) == 2 and len(f.validation) == 1
    # A model without early stopping needs no validation set; two participants cannot have one.
    assert all(f.validation == [] for f in plan_folds(subjects, 5, 0, validation=False))
    tiny = plan_folds(["a", "b"], 5, 0)
    assert len(tiny) == 2 and all(f.validation == [] and len(f.fit) == 1 for f in tiny)


def test_fit_bundle_never_chooses_the_epoch_on_calibration_participants(tmp_path,
                                                                         probe_model):
    """In every fold the validation participant (early stopping) and the fold's calibration
    participants differ; the calibration residuals are out of fold; the card says who did
    what, and the shipped model is fit on everyone."""
    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.training.fit import FitInputs, fit_bundle

    jsons, subjects = _preproc_cohort(tmp_path, 6)
    SEEN["calls"] = []
    inputs = FitInputs(preproc_jsons=jsons, subjects=subjects, scan_ids=subjects,
                       contrasts=["T1w"], model_type="probe-test", model_name="p",
                       model_config={}, preproc=PreprocConfig().to_dict(),
                       folds=3, dataset=str(tmp_path), seed=3, device="cpu",
                       threads=1, checkpoint=None, resume=False,
                       sources_sha256=[file_sha256(tmp_path / f"s{k}_T1w.nii.gz")
                                       for k in range(6)])
    bundle = load_bundle(fit_bundle(inputs, tmp_path / "bundle"))
    train = bundle.card["training"]
    folds = train["folds"]
    assert len(folds) == 3 and len(SEEN["calls"]) == 4
    for fold, (fit, val) in zip(folds, SEEN["calls"]):
        assert [str(i) for i in fit] == fold["fit"] and [str(i) for i in val] == fold["validation"]
        assert fold["validation"] and not set(fold["validation"]) & set(fold["calibration"])
        assert not set(fold["fit"]) & set(fold["calibration"])
    assert sorted(p for f in folds for p in f["calibration"]) == sorted(subjects)
    final_fit, final_val = SEEN["calls"][-1]
    assert [str(i) for i in final_fit] == sorted(subjects) and final_val == []
    assert sorted(bundle.calibration.participants) == sorted(subjects)
    assert bundle.calibration.reference["n_scans"] == 6
    assert bundle.calibration.normative_info["residuals"].startswith("out-of-fold")
    # A scan of the reference is recognised by its file, whatever the dataset is called now.
    assert reference_role(train, tmp_path / "s2_T1w.nii.gz", tmp_path / "elsewhere",
                          "x") == "fit"
    other = tmp_path / "other_T1w.nii.gz"
    other.write_bytes(b"not in the reference")
    assert reference_role(train, other, tmp_path, "zz") is None
    # Older cards without digests: same dataset and participant label.
    old = {k: v for k, v in train.items() if k != "scans"}
    assert reference_role(old, other, tmp_path, "3") == "fit"
    assert reference_role(old, other, tmp_path / "elsewhere", "3") is None


def test_one_reference_scan_gives_no_percentile_and_no_flag():
    assert MIN_REFERENCE_SCANS == 2
    assert math.isnan(percentile_among(10.0, [3.0]))
    assert math.isnan(flag_score([3.0], 95.0))
    assert reference_status(1)["level"] == "refused"
    assert reference_status(2)["level"] == "warning" and "only 2" in reference_status(2)["message"]
    assert reference_status(RECOMMENDED_REFERENCE_SCANS)["level"] == "ok"


def test_flag_threshold_holds_its_rate_with_few_reference_scans():
    """With n healthy reference scores, a new healthy scan is flagged 5% of the time (the
    predictive distribution), not far more as a plain normal fit to n scores would give."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        flagged = 0
        trials = 4000
        for _ in range(trials):
            ref = list(rng.normal(3.0, 0.5, n))
            flagged += percentile_among(float(rng.normal(3.0, 0.5)), ref) >= 95.0
        assert 0.035 <= flagged / trials <= 0.065, (n, flagged / trials)
    # With two scores the threshold is far above the larger of them.
    assert flag_score([3.0, 3.2], 95.0) > 3.2 + 0.5


class _Zero:
    contrasts = ["T1w"]

    def reconstruct(self, volume, mask, device="cpu"):
        return np.zeros_like(volume)


def _healthy(rng, n, shape=(24, 24, 24)):
    vols = [(1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)[None] for _ in range(n)]
    return vols, [np.ones(shape, bool)] * n


def test_thresholds_are_computed_on_the_maps_the_bundle_ships(tmp_path):
    """Recomputing the thresholds from the loaded bundle gives the card's values exactly."""
    from bids_anomaly.models.zscore import ZScoreModel

    rng = np.random.default_rng(1)
    fit_v, fit_m = _healthy(rng, 6)
    cal_v, cal_m = _healthy(rng, 3)
    model = ZScoreModel(["T1w"], fit_v[0].shape[1:])
    model.fit(fit_v, fit_m, FitContext())
    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=1)
    cal = calibrate(model, cal_v, cal_m, params, normative_volumes=fit_v,
                    normative_masks=fit_m)
    card = {"name": "z", "template": "MNI152NLin2009aSym", "resolution": 2}
    bundle = load_bundle(save_bundle(tmp_path / "b", model, card, cal))
    pooled = []
    for v, m in zip(cal_v, cal_m):
        _, raw = anomaly_map(bundle.model, v, m, bundle.calibration.normative)
        a, e = postprocess(raw, m, params)
        pooled.append(to_statmap(a, e, 0.0, 1.0)[e])
    pooled = np.concatenate(pooled)
    for fpr, thr in bundle.calibration.thresholds.items():
        assert thr == float(np.quantile(pooled, 1.0 - float(fpr)))
    np.testing.assert_array_equal(bundle.calibration.normative.mean, cal.normative.mean)


def test_recorded_mask_fpr_is_what_the_shipped_mask_flags():
    """Thresholds are quantiles before the cluster filter; the recorded mask FPR is after it."""
    rng = np.random.default_rng(2)
    fit_v, fit_m = _healthy(rng, 6)
    cal_v, cal_m = _healthy(rng, 3)
    params = ScoringParams(erosion=0, median_size=1, min_cluster_voxels=8)
    cal = calibrate(_Zero(), cal_v, cal_m, params, normative_volumes=fit_v,
                    normative_masks=fit_m)
    for fpr, thr in cal.thresholds.items():
        hits = total = 0
        for v, m in zip(cal_v, cal_m):
            _, raw = anomaly_map(_Zero(), v, m, cal.normative)
            a, e = postprocess(raw, m, params)
            hits += int(threshold_mask(to_statmap(a, e, 0, 1), thr, 8)[e].sum())
            total += int(e.sum())
        assert cal.mask_fpr[fpr] == hits / total
        assert cal.mask_fpr[fpr] < float(fpr) / 2  # isolated noise voxels are filtered out
    assert cal.to_dict()["reference"]["n_scans"] == 3


def _saved_zscore(tmp_path):
    rng = np.random.default_rng(3)
    vols, masks = _healthy(rng, 3, (12, 12, 12))
    model = get_model_class("zscore")(["T1w"], (12, 12, 12))
    model.fit(vols[:2], masks[:2], FitContext())
    cal = calibrate(model, vols[2:], masks[2:], ScoringParams(erosion=0, median_size=1))
    card = {"name": "z", "template": "MNI152NLin2009aSym", "resolution": 2}
    return save_bundle(tmp_path / "b", model, card, cal)


def test_card_names_its_checksum_algorithm(tmp_path):
    path = _saved_zscore(tmp_path)
    card = json.loads((path / CARD).read_text())
    assert card["checksum_algorithm"] == "sha256"
    assert card["files"]["weights.safetensors"] == sha256(path / "weights.safetensors")
    card["checksum_algorithm"] = "md5"
    (path / CARD).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="checksum algorithm 'md5'"):
        load_bundle(path)


@pytest.mark.parametrize("name", ["../../../etc/hostname", "/etc/hostname", "sub/x.bin",
                                  "..", ".hidden"])
def test_card_naming_a_file_outside_the_bundle_is_refused(tmp_path, name):
    path = _saved_zscore(tmp_path)
    card = json.loads((path / CARD).read_text())
    target = (path / name) if not name.startswith("/") else None
    digest = sha256(target) if target is not None and target.is_file() else "0" * 64
    card["files"][name] = digest
    (path / CARD).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="not a plain file name inside the bundle"):
        load_bundle(path)


def test_card_listing_a_symlink_is_refused(tmp_path):
    path = _saved_zscore(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (path / "link.bin").symlink_to(outside)
    card = json.loads((path / CARD).read_text())
    card["files"]["link.bin"] = sha256(outside)
    (path / CARD).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(path)


def test_reconstruction_is_float32_whatever_autocast_the_caller_enabled():
    """Calibration and scoring must see the same reconstruction: a caller's autocast (as the
    training loop uses) must not leak into inference."""
    from tests.model_inputs import SHAPE, tiny_volumes

    vols, masks = tiny_volumes(1)
    model = get_model_class("dae")(["T1w"], SHAPE, {"crop": [32, 40]})
    ref = model.reconstruct(vols[0], masks[0])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = model.reconstruct(vols[0], masks[0])
    np.testing.assert_array_equal(ref, under)


def test_a_card_from_before_a_new_default_loads_as_it_was_trained(tmp_path):
    """The dae's top skip is removed by default now; a card that predates the key must load
    the network it was trained as (with the skip), not today's default."""
    from tests.model_inputs import SHAPE, tiny_volumes

    vols, masks = tiny_volumes(3)
    old = get_model_class("dae")(["T1w"], SHAPE, {"crop": [32, 40], "skip_dropout": 0.0,
                                                  "context": 0})
    cal = calibrate(old, vols[2:], masks[2:], ScoringParams(erosion=0, median_size=1))
    card = {"name": "d", "template": "MNI152NLin2009aSym", "resolution": 2}
    path = save_bundle(tmp_path / "b", old, card, cal)
    full = json.loads((path / CARD).read_text())
    for key in ("skip_dropout", "anomaly_p", "context"):  # keys newer than the card
        del full["hyperparameters"][key]
    (path / CARD).write_text(json.dumps(full))
    loaded = load_bundle(path)
    assert loaded.model.hparams["skip_dropout"] == 0.0
    assert loaded.model.hparams["context"] == 0  # 2D slices, whatever today's default
    np.testing.assert_array_equal(loaded.model.reconstruct(vols[0], masks[0]),
                                  old.reconstruct(vols[0], masks[0]))
    assert get_model_class("dae").defaults["skip_dropout"] == 1.0
