"""Tests for bids_anomaly.evaluation on tiny synthetic NIfTI data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.core.errors import DataError, EmptySelectionError, MissingInputError
from bids_anomaly.core.naming import ScanKey, ScanOutputs, build_name, sidecar
from bids_anomaly.evaluation import (
    EvaluationResult,
    evaluate_outputs,
    format_pooled_table,
    scan_level_auroc,
    voxel_metrics,
    write_evaluation,
)

SHAPE = (10, 10, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
THRESHOLDS = {"0.01": 0.8, "0.001": 0.95}


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data, affine), path)


# ----------------------------------------------------------------------------- metrics


def test_perfect_scores() -> None:
    labels = np.zeros(200, bool)
    labels[:20] = True
    scores = labels.astype(float) + 0.01 * np.arange(200) / 200
    m = voxel_metrics(scores, labels, {"0.01": 0.5})
    assert m["auroc"] == pytest.approx(1.0)
    assert m["auprc"] == pytest.approx(1.0)
    assert m["oracle_dice"] == pytest.approx(1.0)
    assert m["dice_fpr0.01"] == pytest.approx(1.0)
    assert m["fpr_observed_fpr0.01"] == 0.0
    assert m["prevalence"] == pytest.approx(0.1)
    assert scores[labels].min() >= m["oracle_threshold"] > scores[~labels].max()


def test_random_scores_auroc_half() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(50_000) < 0.2
    m = voxel_metrics(rng.random(50_000), labels)
    assert m["auroc"] == pytest.approx(0.5, abs=0.02)
    assert m["auprc"] == pytest.approx(0.2, abs=0.02)


def test_oracle_dice_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.15
    scores = np.round(rng.random(300) + labels * 0.5, 2)  # rounding creates ties
    best = max(
        2 * np.sum((scores >= t) & labels) / (np.sum(scores >= t) + labels.sum())
        for t in np.unique(scores)
    )
    m = voxel_metrics(scores, labels)
    assert m["oracle_dice"] == pytest.approx(best)
    pred = scores >= m["oracle_threshold"]
    assert 2 * np.sum(pred & labels) / (pred.sum() + labels.sum()) == pytest.approx(best)


def test_observed_fpr_hand_count() -> None:
    scores = np.array([0.1, 0.2, 0.6, 0.9, 0.3, 0.7, 0.8, 0.95])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)
    m = voxel_metrics(scores, labels, {"0.01": 0.5, "0.001": 0.85})
    # > 0.5: negatives 0.6, 0.9 flagged out of 5; all 3 positives -> Dice 6 / (5 + 3)
    assert m["fpr_observed_fpr0.01"] == pytest.approx(2 / 5)
    assert m["dice_fpr0.01"] == pytest.approx(6 / 8)
    # > 0.85: negative 0.9 and positive 0.95 -> Dice 2 / (2 + 3)
    assert m["fpr_observed_fpr0.001"] == pytest.approx(1 / 5)
    assert m["dice_fpr0.001"] == pytest.approx(2 / 5)


def test_no_positive_voxels_gives_nan() -> None:
    scores = np.array([0.1, 0.9, 0.4, 0.6])
    m = voxel_metrics(scores, np.zeros(4, bool), {"0.01": 0.5})
    for key in ("auroc", "auprc", "oracle_dice", "dice_fpr0.01"):
        assert math.isnan(m[key])
    assert m["fpr_observed_fpr0.01"] == pytest.approx(0.5)
    assert m["prevalence"] == 0.0


def test_scan_level_auroc() -> None:
    assert scan_level_auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert scan_level_auroc([0.9, 0.2, 0.8, 0.3], [False, False, True, True]) == 0.5
    assert scan_level_auroc([0.3, np.nan, 0.1], [True, True, False]) == 1.0
    assert math.isnan(scan_level_auroc([0.1, 0.2], [True, True]))


# ----------------------------------------------------------------------------- datasets

# (subject, session, lesioned); sub-04 has no label file.
SCANS = [("01", "1", True), ("01", "2", False), ("02", None, False), ("03", None, True),
         ("04", None, False)]


def _lesion(lesioned: bool) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    if lesioned:
        lab[4:7, 4:7, 4:7] = 1
    return lab


def _make_labels(root: Path) -> Path:
    for sub, ses, lesioned in SCANS:
        if sub == "04":
            continue
        key = ScanKey(sub, ses)
        _save(root / key.subdir / build_name(key, "mask", label="lesion"), _lesion(lesioned))
    return root


def _make_outputs(root: Path, name: str, noise: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, np.uint8)
    brain[1:9, 1:9, 1:9] = 1
    rows = []
    for i, (sub, ses, lesioned) in enumerate(SCANS):
        key = ScanKey(sub, ses)
        outs = ScanOutputs(key)
        stat = (_lesion(lesioned) + noise * rng.standard_normal(SHAPE)).astype(np.float32)
        stat[brain == 0] = np.nan
        _save(root / outs.native_statmap, stat)
        _save(root / outs.native_brain_mask, brain)
        _save(root / outs.native_mask, (stat > 0.95).astype(np.uint8))
        meta = {"Thresholds": THRESHOLDS, "DefaultFPR": 0.001,
                "Model": {"Name": name, "Type": "fake", "SHA256": "0" * 64}}
        sidecar(root / outs.native_statmap).write_text(json.dumps(meta))
        rows.append({"participant_id": f"sub-{sub}", "session_id": f"ses-{ses}" if ses else "n/a",
                     "run": "n/a", "scan_id": key.scan_id,
                     "score": 1.0 * lesioned + 0.01 * i, "status": "ok"})
    rows.append({"participant_id": "sub-05", "session_id": "n/a", "run": "n/a",
                 "scan_id": "sub-05", "score": "n/a", "status": "failed"})
    pd.DataFrame(rows).to_csv(root / "group_anomaly.tsv", sep="\t", index=False)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[list[Path], Path]:
    labels = _make_labels(tmp_path / "labels")
    good = _make_outputs(tmp_path / "out_good", "goodmodel", noise=0.1, seed=0)
    bad = _make_outputs(tmp_path / "out_bad", "badmodel", noise=5.0, seed=1)
    return [good, bad], labels


def test_evaluate_outputs(dataset: tuple[list[Path], Path]) -> None:
    outs, labels = dataset
    res = evaluate_outputs(outs, labels)
    assert isinstance(res, EvaluationResult)
    assert len(res.per_scan) == 8
    good = res.per_scan[res.per_scan["model"] == "goodmodel"].set_index("scan_id")
    assert list(good.index) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03"]
    assert good.loc["sub-01_ses-1", "session_id"] == "ses-1"
    assert good.loc["sub-02", "session_id"] == "n/a"
    assert good["pathological"].tolist() == [True, False, False, True]
    assert good.loc["sub-03", "lesion_voxels"] == 27
    assert good.loc["sub-03", "auroc"] > 0.99
    assert math.isnan(good.loc["sub-02", "auroc"])
    assert good.loc["sub-02", "fpr_observed_fpr0.01"] < 0.05
    assert good.loc["sub-03", "n_voxels"] == 512
    assert good.loc["sub-03", "score"] == pytest.approx(1.03)

    pooled = res.pooled.set_index("model")
    assert list(pooled.index) == ["goodmodel", "badmodel"]
    assert pooled.loc["goodmodel", "n_scans"] == 4
    assert pooled.loc["goodmodel", "n_pathological"] == 2
    assert pooled.loc["goodmodel", "n_voxels"] == 4 * 512
    assert pooled.loc["goodmodel", "auroc"] > 0.99
    assert pooled.loc["goodmodel", "oracle_dice"] > 0.9
    assert pooled.loc["goodmodel", "auroc"] > pooled.loc["badmodel", "auroc"]
    assert pooled.loc["goodmodel", "scan_auroc"] == 1.0
    assert "dice_fpr0.001" in pooled.columns

    assert len(res.skipped) == 2 and all("sub-04" in s for s in res.skipped)

    table = format_pooled_table(res)
    assert table[0] == ["model", "n_scans", "AUROC", "AUPRC", "oracle Dice", "Dice@1%FPR",
                        "Dice@0.1%FPR", "scan AUROC"]
    assert table[1][:2] == ["goodmodel", "4"] and len(table) == 3


def test_pooled_subsample_is_deterministic(dataset: tuple[list[Path], Path]) -> None:
    outs, labels = dataset
    a = evaluate_outputs(outs[:1], labels, max_pooled_voxels=700).pooled
    b = evaluate_outputs(outs[:1], labels, max_pooled_voxels=700).pooled
    assert a.loc[0, "n_voxels_sampled"] == 700 and a.loc[0, "n_voxels"] == 2048
    assert a.loc[0, "auroc"] == b.loc[0, "auroc"]


def test_glob_fallback_and_dilation(dataset: tuple[list[Path], Path]) -> None:
    outs, labels = dataset
    (outs[0] / "group_anomaly.tsv").unlink()
    res = evaluate_outputs(outs[:1], labels, mask_dilation=1)
    assert sorted(res.per_scan["scan_id"]) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03"]
    assert res.per_scan["score"].isna().all()
    assert math.isnan(res.pooled.loc[0, "scan_auroc"])


def test_grid_mismatch(dataset: tuple[list[Path], Path]) -> None:
    outs, labels = dataset
    key = ScanKey("03")
    lesion = labels / key.subdir / build_name(key, "mask", label="lesion")
    _save(lesion, _lesion(True), affine=np.diag([2.0, 2.0, 2.1, 1.0]))
    with pytest.raises(DataError) as err:
        evaluate_outputs(outs[:1], labels)
    assert str(lesion) in str(err.value)
    assert str(outs[0] / ScanOutputs(key).native_statmap) in str(err.value)


def test_missing_inputs(dataset: tuple[list[Path], Path], tmp_path: Path) -> None:
    outs, _ = dataset
    with pytest.raises(MissingInputError, match="nolabels"):
        evaluate_outputs(outs, tmp_path / "nolabels")
    with pytest.raises(EmptySelectionError):
        evaluate_outputs(outs[:1], _make_labels(tmp_path / "empty_labels") / "sub-01")


def test_write_evaluation(dataset: tuple[list[Path], Path], tmp_path: Path) -> None:
    outs, labels = dataset
    res = evaluate_outputs(outs, labels)
    dest = tmp_path / "eval"
    written = write_evaluation(res, dest)
    names = sorted(p.name for p in written)
    assert names == ["evaluation.json", "evaluation_pooled.json", "evaluation_pooled.tsv",
                     "evaluation_scans.json", "evaluation_scans.tsv"]
    text = (dest / "evaluation_scans.tsv").read_text()
    lines = text.splitlines()
    header = lines[0].split("\t")
    row = dict(zip(header, lines[1 + [ln.split("\t")[1] for ln in lines[1:]].index("sub-02")]
                   .split("\t"), strict=True))
    assert row["auroc"] == "n/a" and row["session_id"] == "n/a"
    assert row["pathological"] == "false"
    assert len(row["fpr_observed_fpr0.01"].split(".")[1]) == 4
    side = json.loads((dest / "evaluation_scans.json").read_text())
    assert set(side) == set(header) and all("Description" in v for v in side.values())
    summary = json.loads((dest / "evaluation.json").read_text())
    assert set(summary["Models"]) == {"goodmodel", "badmodel"}
    assert summary["Models"]["goodmodel"]["n_scans"] == 4
    assert len(summary["Skipped"]) == 2


# ----------------------------------------------------------------------------- group report


def test_group_report_evaluation_section(dataset: tuple[list[Path], Path]) -> None:
    """The section appears once evaluate has written its tables, and not before/without."""
    from bids_anomaly.reports import build_group_report
    from bids_anomaly.reports.group import ORACLE_LABEL

    outs, labels = dataset
    out = outs[0]
    before = build_group_report(out).read_text()
    assert 'data-testid="evaluation"' not in before and ">Evaluation</h2>" not in before

    # evaluate writes the tables into the first OUTPUT_DIR and rebuilds its group report.
    written = write_evaluation(evaluate_outputs(outs, labels), out)
    assert out / "group_report.html" in written
    text = (out / "group_report.html").read_text()
    assert 'data-testid="evaluation"' in text and ">Evaluation</h2>" in text
    assert ORACLE_LABEL in text and "upper bound" in text
    for needle in ("voxel AUROC", "voxel AUPRC", "Dice at calibrated FPR 1%",
                   "Dice at calibrated FPR 0.1%", "scan-level AUROC", "pooled",
                   'data-testid="evaluation-pooled"', 'data-testid="evaluation-scans-table"',
                   'href="evaluation_scans.tsv"', "sub-04"):  # sub-04: listed as not evaluated
        assert needle in text, needle
    section = text[text.index('data-testid="evaluation"'):]
    section = section[: section.index("</section>")]
    # Both models side by side; goodmodel separates healthy from pathological scans.
    assert "goodmodel" in section and "badmodel" in section
    scan_auroc = section[section.index('data-testid="evaluation-scan-auroc"'):]
    assert "<b>goodmodel</b> 1" in scan_auroc.split("</p>")[0]
    assert section.count("<tr>") == 1 + 2 + 1 + 8  # pooled head + 2 models, scans head + 8
    assert "https://" not in text and "http://" not in text  # offline: nothing fetched

    # A group report built without the evaluation tables has no such section.
    for name in ("evaluation_pooled.tsv", "evaluation_scans.tsv"):
        (out / name).unlink()
    again = build_group_report(out).read_text()
    assert 'data-testid="evaluation"' not in again and ORACLE_LABEL not in again
    # Writing the tables elsewhere (no group_anomaly.tsv there) writes no report.
    assert not any(p.suffix == ".html" for p in write_evaluation(
        evaluate_outputs(outs, labels), out.parent / "elsewhere"))


# ----------------------------------------------------------------------------- defined region

EROSION = 3  # the fake bundle's erosion (not the default 2: it must be read from the bundle)


def _scored_like_infer(out: Path, key: ScanKey, template_statmap: np.ndarray, tpl,
                       native_affine: np.ndarray, native_shape: tuple[int, ...],
                       thresholds: dict[str, float]) -> None:
    """The files the participant level writes for one scan, with an identity transform:
    template statmap and brain mask, the native statmap and mask brought back with the same
    ``to_native`` as scoring, the ``_xfm.mat``, a scores record naming a bundle whose card
    says ``erosion``."""
    import ants

    from bids_anomaly.preprocessing.registration import to_native

    outs = ScanOutputs(key, res=tpl.resolution)
    xfm = out / outs.xfm
    xfm.parent.mkdir(parents=True, exist_ok=True)
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform",
                                                    dimension=3), str(xfm))
    ref = nb.Nifti1Image(np.zeros(native_shape, np.float32), native_affine)
    work = out / "tmp"
    native_stat = to_native(template_statmap, tpl, ref, xfm, work)
    native_brain = to_native(tpl.mask.astype(np.float32), tpl, ref, xfm, work) > 0.5
    _save(out / outs.template_statmap, template_statmap.astype(np.float32), tpl.affine)
    _save(out / outs.template_brain_mask, tpl.mask.astype(np.uint8), tpl.affine)
    _save(out / outs.native_statmap, native_stat.astype(np.float32), native_affine)
    _save(out / outs.native_brain_mask, native_brain.astype(np.uint8), native_affine)
    meta = {"Thresholds": thresholds, "Model": {"Name": "fake", "SHA256": "0" * 64}}
    sidecar(out / outs.native_statmap).write_text(json.dumps(meta))
    bundle = out.parent / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "model.json").write_text(json.dumps(
        {"calibration": {"params": {"erosion": EROSION}}}))
    (out / outs.scores).write_text(json.dumps({"status": "ok", "score": 1.0,
                                               "model": {"path": str(bundle)}}))


def _eroded(mask: np.ndarray, erosion: int) -> np.ndarray:
    """The brain as scoring erodes it (scoring.postprocess), written out independently."""
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=erosion)


def _healthy_labels(root: Path, key: ScanKey, affine: np.ndarray, shape) -> Path:
    _save(root / key.subdir / build_name(key, "mask", label="lesion"),
          np.zeros(shape, np.uint8), affine)
    return root


def test_defined_region_is_scorings_eroded_mask() -> None:
    from bids_anomaly.calibration.statmap import postprocess
    from bids_anomaly.calibration.types import ScoringParams
    from bids_anomaly.evaluation import defined_region

    brain = np.zeros((12, 12, 12), bool)
    brain[2:10, 3:11, 1:9] = True
    for e in (0, 1, 2):
        eroded = postprocess(np.ones(brain.shape), brain, ScoringParams(erosion=e))[1]
        np.testing.assert_array_equal(defined_region(brain, e), eroded)
    assert defined_region(brain, 2).sum() < defined_region(brain, 1).sum() < brain.sum()


def test_healthy_fpr_counts_only_where_the_statmap_is_defined(tmp_path: Path) -> None:
    """A healthy scan scored on the template grid: z ~ N(0, 1) inside the brain eroded by the
    bundle's erosion, 0 (by construction) on the rim. The observed FPR must be the exceedance
    rate inside the eroded brain, in native and in template space; counting the rim as true
    negatives (the whole brain mask, as before) dilutes it by the rim's share."""
    from scipy.stats import norm

    from bids_anomaly.core.templates import load_template

    tpl = load_template(2)
    key = ScanKey("h1")
    thresholds = {"0.01": float(norm.isf(0.01)), "0.001": float(norm.isf(0.001))}
    eroded = _eroded(tpl.mask, EROSION)
    z = np.random.default_rng(0).standard_normal(tpl.shape).astype(np.float32)
    stat = np.where(eroded, z, 0.0).astype(np.float32)
    out = tmp_path / "out"
    _scored_like_infer(out, key, stat, tpl, tpl.affine, tpl.shape, thresholds)
    labels = _healthy_labels(tmp_path / "labels", key, tpl.affine, tpl.shape)

    res = evaluate_outputs([out], labels)
    row = res.per_scan.iloc[0]
    pooled = res.pooled.iloc[0]
    for fpr, thr in thresholds.items():
        expected = np.count_nonzero(z[eroded] > thr) / eroded.sum()
        diluted = np.count_nonzero(z[eroded] > thr) / tpl.mask.sum()
        assert diluted < 0.85 * expected  # the rim is a large share of a 2 mm brain
        for col in (f"fpr_observed_fpr{fpr}", f"fpr_template_fpr{fpr}"):
            for value in (row.get(col), pooled.get(col)):
                assert value == pytest.approx(expected, rel=1e-6), (col, value, expected, diluted)
    assert row["fpr_region"].startswith("defined") and f"{EROSION} voxel" in row["fpr_region"]
    assert pooled["n_healthy"] == 1 and pooled["n_fpr_template_scans"] == 1
    # Other metrics keep the whole native brain mask.
    assert row["n_voxels"] == tpl.mask.sum()


def test_native_fpr_excludes_voxels_diluted_by_the_undefined_rim(tmp_path: Path) -> None:
    """Native grid coarser than the template (3 mm): the native statmap interpolates the
    template one, so native voxels near the eroded rim mix z with the rim's zeros. A statmap
    that is 5 wherever it is defined must exceed a threshold of 4.9 at every native voxel
    counted (observed FPR exactly 1), and a healthy scan's template FPR too."""
    from bids_anomaly.core.templates import load_template

    tpl = load_template(2)
    key = ScanKey("h2")
    stat = np.where(_eroded(tpl.mask, EROSION), 5.0, 0.0).astype(np.float32)
    native_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    native_affine[:3, 3] = tpl.affine[:3, 3] + 1.0  # off the template's voxel centres
    native_shape = (65, 78, 63)
    out = tmp_path / "out"
    _scored_like_infer(out, key, stat, tpl, native_affine, native_shape, {"0.01": 4.9})
    labels = _healthy_labels(tmp_path / "labels", key, native_affine, native_shape)

    row = evaluate_outputs([out], labels).per_scan.iloc[0]
    assert row["fpr_observed_fpr0.01"] == 1.0
    assert row.get("fpr_template_fpr0.01") == 1.0
    # Where it was computed before (the whole native brain mask) the rim dilutes it.
    native = nb.load(out / ScanOutputs(key).native_statmap).get_fdata()
    brain = nb.load(out / ScanOutputs(key).native_brain_mask).get_fdata() > 0
    assert np.mean(native[brain] > 4.9) < 0.85
