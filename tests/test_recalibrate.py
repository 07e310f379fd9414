"""Site adaptation: a bundle re-referenced to a new site's controls, weights untouched."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from bids_anomaly.core.config import PreprocConfig
from bids_anomaly.core.reference import file_sha256, reference_role
from bids_anomaly.core.templates import load_template
from bids_anomaly.inference.scoring import score_volume
from bids_anomaly.models.bundle import load_bundle
from bids_anomaly.preprocessing.standardise import standardise_for_bundle
from bids_anomaly.training.fit import FitInputs, fit_bundle
from bids_anomaly.training.recalibrate import ReferenceScan, recalibrate_bundle


def _scan(template, rng, site: str) -> np.ndarray:
    """A healthy-looking template-space scan: the template with smooth anatomical variation;
    site B has another contrast (a gamma warp), stronger noise and a bias field."""
    vary = ndimage.gaussian_filter(rng.standard_normal(template.shape), 2.0) * 6.0
    img = template.t1.astype(np.float64) * (1.0 + 0.05 * vary)
    img = img / np.percentile(img[template.mask], 99)
    if site == "B":
        bias = ndimage.gaussian_filter(rng.standard_normal(template.shape), 12.0) * 40.0
        img = np.clip(img, 0, None) ** 0.7 * (1.0 + 0.1 * bias)
        img = img + 0.04 * rng.standard_normal(template.shape)
    else:
        img = img + 0.01 * rng.standard_normal(template.shape)
    return (img * template.mask).astype(np.float32)


def _write(tmp_path, template, images: list[np.ndarray], prefix: str):
    from .model_inputs import write_preprocessed

    return write_preprocessed(tmp_path, template.affine, images, template.mask, prefix)


def _mask_fpr(bundle, images, template) -> float:
    """Fraction of the eroded brain the shipped mask flags, pooled over healthy scans."""
    from scipy.ndimage import binary_erosion

    hits = total = 0
    eroded = binary_erosion(template.mask, iterations=bundle.calibration.params.erosion)
    for img in images:
        vol = standardise_for_bundle(img[None], template.mask, bundle.card)
        res = score_volume(bundle.model, vol, template.mask, bundle.calibration, template.affine)
        hits += int(res.mask[eroded].sum())
        total += int(eroded.sum())
    return hits / total


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites")
    template = load_template(2)
    rng = np.random.default_rng(0)
    a = [_scan(template, rng, "A") for _ in range(8)]
    b = [_scan(template, rng, "B") for _ in range(10)]
    a_files = _write(tmp, template, a, "a")
    inputs = FitInputs(preproc_jsons=[j for j, _ in a_files],
                       subjects=[f"a{k}" for k in range(8)],
                       scan_ids=[f"sub-a{k}" for k in range(8)], contrasts=["T1w"],
                       model_type="zscore", model_name="z", model_config={},
                       preproc=PreprocConfig().to_dict(), folds=4, dataset="site-A", seed=0,
                       device="cpu", threads=1, checkpoint=None, resume=False,
                       scoring={"scan_baseline": False, "local_baseline_sigma": 0.0})
    # Without the per-scan baselines (global and local), so that what calibrate does is seen
    # on its own; ``with_baseline`` below has zscore's defaults.
    bundle = load_bundle(fit_bundle(inputs, tmp / "site-a"))
    b_files = _write(tmp, template, b, "b")
    scans = [ReferenceScan(j, f"b{k}", f"sub-b{k}", file_sha256(p))
             for k, (j, p) in enumerate(b_files[:5])]
    new = load_bundle(recalibrate_bundle(bundle, scans, tmp / "site-b", dataset="site-B"))
    with_baseline = load_bundle(fit_bundle(replace(inputs, scoring=None), tmp / "site-a2"))
    new_default = load_bundle(recalibrate_bundle(with_baseline, scans, tmp / "site-b2",
                                                 dataset="site-B"))
    return template, a, b, b_files, bundle, new, with_baseline, new_default


def test_calibrate_keeps_the_weights_and_names_the_new_reference(sites):
    _, _, _, b_files, bundle, new, _, _ = sites
    assert new.weights_sha256 == bundle.weights_sha256
    cohort = new.card["reference_cohort"]
    assert cohort["dataset"] == "site-B" and cohort["participants"] == [f"b{k}" for k in range(5)]
    assert cohort["parent_bundle"]["weights_sha256"] == bundle.weights_sha256
    assert new.card["training"] == bundle.card["training"]  # the training record is kept
    assert new.calibration.reference["n_scans"] == 5
    assert new.calibration.thresholds != bundle.calibration.thresholds
    # A control of the new reference is recognised when it is scored; the others are not.
    from bids_anomaly.core.reference import reference_scans

    refs = reference_scans(new.card)
    assert reference_role(refs, b_files[0][1], "x", "b0") == "calibration"
    assert reference_role(refs, b_files[7][1], "x", "b7") is None
    json.dumps(new.card)  # the card stays plain JSON


def test_calibrate_brings_a_new_site_to_its_nominal_rate(sites):
    """Site B's other healthy scans: far above the nominal 1% voxel rate against site A's
    reference, within a factor 2 of it after calibrating on five of site B's controls."""
    template, a, b, _, bundle, new, _, new_default = sites
    for cal in (bundle.calibration, new.calibration, new_default.calibration):
        cal.default_fpr = "0.01"
    before = _mask_fpr(bundle, b[5:], template)
    after = _mask_fpr(new, b[5:], template)
    after_default = _mask_fpr(new_default, b[5:], template)
    same_site = _mask_fpr(bundle, a[:3], template)  # scans the reference saw: a sanity check
    print(f"site B healthy mask FPR at nominal 1%: {before:.4f} against site A's reference, "
          f"{after:.4f} after calibrate; site A: {same_site:.4f}; zscore's default scoring "
          f"calibrated on site B: {after_default:.4f}")
    assert before > 0.03, before
    assert 0.005 <= after <= 0.02, after
    assert same_site < 0.02
    # With zscore's default scoring (the per-scan baselines) calibrate holds the rate too:
    # never above 2x nominal; 0.50% seen, on the conservative side as five controls (each
    # standardised against the other four) make the thresholds.
    assert 0.0025 <= after_default <= 0.02, after_default


@pytest.fixture(scope="module")
def site_cohort(tmp_path_factory):
    """Skull-free 4 mm, one session: 3 train, 1 healthy test, 1 patient (the CLI's path)."""
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    return generate_cohort(tmp_path_factory.mktemp("site") / "bids", SynthConfig(
        n_healthy=3, n_healthy_test=1, n_patients=1, voxel_size=4.0, template_resolution=2,
        n_sessions=1, with_skull=False, seed=3))


def test_calibrate_command_end_to_end(site_cohort, tmp_path):
    """``bids-anomaly calibrate`` writes a new bundle (same weights) whose reference is this
    dataset's controls; scoring with it names that reference and marks its own controls."""
    import subprocess
    import sys

    out, work = tmp_path / "out", tmp_path / "work"

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args),
                            "-w", work, "--nprocs", "2", "--device", "cpu"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    cli("train", site_cohort.root, out, "--model-type", "zscore", "--folds", "2",
        "--healthy-filter", "split=train", "--registration", "affine-coarse")
    r = cli("calibrate", site_cohort.root, out, "--model", "zscore", "--model-name", "site",
            "--healthy-filter", "group=control")
    assert "bundle" in r.stdout
    old, new = load_bundle(out / "models" / "zscore"), load_bundle(out / "models" / "site")
    assert new.weights_sha256 == old.weights_sha256
    cohort = new.card["reference_cohort"]
    assert cohort["dataset"] == str(site_cohort.root.resolve())
    assert sorted(cohort["participants"]) == sorted(site_cohort.train_subjects
                                                    + site_cohort.test_healthy_subjects)
    assert (out / "models" / "site" / "report.html").exists()
    test = site_cohort.test_healthy_subjects[0]
    patient = site_cohort.patient_subjects[0]
    r = cli("score", site_cohort.root, out, "participant", "--model", "site",
            "--participant-label", test, patient)
    assert "optimistic" in r.stdout  # the control that set the reference is called out
    for label, role in ((test, "calibration"), (patient, None)):
        for scores in (out / f"sub-{label}").rglob("*_desc-anomaly_scores.json"):
            rec = json.loads(scores.read_text())
            assert rec["in_reference"] == role
            assert rec["reference"]["cohort"]["kind"].startswith("site calibration")
            assert rec["reference"]["n_scans"] == len(cohort["scans"])


def test_the_per_scan_baseline_keeps_a_shifted_site_quiet_without_calibrate(sites):
    """The default z baseline (each scan's healthy majority sets its own median and spread)
    keeps site B's healthy scans at or below the nominal rate against site A's reference."""
    template, _, b, _, _, _, with_baseline, _ = sites
    assert with_baseline.calibration.params.scan_baseline
    with_baseline.calibration.default_fpr = "0.01"
    rate = _mask_fpr(with_baseline, b[5:], template)
    print(f"site B healthy mask FPR at nominal 1% with the per-scan baseline: {rate:.5f}")
    assert rate <= 0.02


def test_zscore_bundles_weigh_csf_dark_voxels_and_calibrate_keeps_the_weighting(sites):
    """zscore's own scoring defaults (CSF-dark voxels at half weight, the local baseline) are
    recorded in the bundle it trains, and a site calibration keeps the bundle's choices."""
    _, _, _, _, bundle, new, with_baseline, new_default = sites
    for b in (bundle, new, with_baseline, new_default):
        assert b.calibration.params.csf_weight == 0.5
        assert b.calibration.params.csf_quantile == 0.1
    for b in (with_baseline, new_default):
        assert b.calibration.params.local_baseline_sigma == 8.0
        assert b.calibration.params.csf_level == 0.4
    assert new.calibration.params.local_baseline_sigma == 0.0  # as its parent bundle chose
