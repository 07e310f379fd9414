"""Input discovery with pybids: sessions, filters, contrasts, healthy selection."""

from __future__ import annotations

import json
import shutil

import pytest

from bids_anomaly.bids_io.discovery import discover_scans, healthy_subjects, load_filter_file
from bids_anomaly.core.config import SelectionConfig
from bids_anomaly.core.errors import DataError, EmptySelectionError, ExitCode


def test_all_scans_with_sessions(tiny_cohort, tmp_path):
    scans = discover_scans(tiny_cohort.root, SelectionConfig(), tmp_path / "db")
    ids = [s.key.scan_id for s in scans]
    assert len(ids) == 10  # 5 participants x 2 sessions
    assert "sub-h01_ses-1" in ids and "sub-p01_ses-2" in ids
    assert all(s.t1w.name.endswith("_T1w.nii.gz") for s in scans)


def test_participant_and_session_filters(tiny_cohort, tmp_path):
    sel = SelectionConfig(participant_labels=("sub-h01", "t01"), session_labels=("ses-2",))
    scans = discover_scans(tiny_cohort.root, sel, tmp_path / "db")
    assert [s.key.scan_id for s in scans] == ["sub-h01_ses-2", "sub-t01_ses-2"]


def test_unknown_label_is_named(tiny_cohort, tmp_path):
    with pytest.raises(EmptySelectionError, match="nobody"):
        discover_scans(tiny_cohort.root, SelectionConfig(participant_labels=("nobody",)))


def test_contrast_enhanced_is_not_a_plain_t1w(tiny_cohort, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_cohort.root, root, ignore=shutil.ignore_patterns("derivatives"))
    anat = root / "sub-h01" / "ses-1" / "anat"
    src = anat / "sub-h01_ses-1_T1w.nii.gz"
    shutil.copy(src, anat / "sub-h01_ses-1_ce-gadolinium_T1w.nii.gz")
    scans = discover_scans(root, SelectionConfig(participant_labels=("h01",)))
    assert {s.t1w.name for s in scans} == {"sub-h01_ses-1_T1w.nii.gz", "sub-h01_ses-2_T1w.nii.gz"}
    # ... unless a filter file asks for it.
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"t1w": {"ceagent": "gadolinium"}}))
    sel = SelectionConfig(participant_labels=("h01",), bids_filters=load_filter_file(f))
    scans = discover_scans(root, sel)
    assert [s.t1w.name for s in scans] == ["sub-h01_ses-1_ce-gadolinium_T1w.nii.gz"]


def test_two_t1w_for_one_scan_key_marks_that_scan_only(tiny_cohort, tmp_path):
    """A rec- variant collides with the plain T1w (rec is not part of the scan key): the scan
    carries an error naming both files instead of stopping discovery; the others are clean."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_cohort.root, root, ignore=shutil.ignore_patterns("derivatives"))
    anat = root / "sub-h01" / "ses-1" / "anat"
    src = anat / "sub-h01_ses-1_T1w.nii.gz"
    dup = anat / "sub-h01_ses-1_rec-norm_T1w.nii.gz"
    shutil.copy(src, dup)
    scans = {s.key.scan_id: s for s in discover_scans(
        root, SelectionConfig(participant_labels=("h01", "t01")))}
    assert sorted(scans) == ["sub-h01_ses-1", "sub-h01_ses-2", "sub-t01_ses-1", "sub-t01_ses-2"]
    err = scans["sub-h01_ses-1"].error
    assert err and "more than one T1w image" in err and str(src) in err and str(dup) in err
    assert all(s.error is None for sid, s in scans.items() if sid != "sub-h01_ses-1")


def _copy_with_flair(tiny_cohort, tmp_path, scan_ids):
    """A copy of the cohort with a FLAIR (a copy of the T1w) for each of ``scan_ids``."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_cohort.root, root, ignore=shutil.ignore_patterns("derivatives"))
    for sid in scan_ids:
        sub, ses = sid.split("_")
        anat = root / sub / ses / "anat"
        shutil.copy(anat / f"{sid}_T1w.nii.gz", anat / f"{sid}_FLAIR.nii.gz")
    return root


def test_missing_extra_contrast_fails_that_scan_only(tiny_cohort, tmp_path):
    """t01's ses-2 has no FLAIR: that scan carries the error (exit 66), the others have one."""
    root = _copy_with_flair(tiny_cohort, tmp_path,
                            ["sub-h01_ses-1", "sub-h01_ses-2", "sub-t01_ses-1"])
    sel = SelectionConfig(participant_labels=("h01", "t01"), contrasts=("T1w", "FLAIR"))
    scans = {s.key.scan_id: s for s in discover_scans(root, sel)}
    assert sorted(scans) == ["sub-h01_ses-1", "sub-h01_ses-2", "sub-t01_ses-1", "sub-t01_ses-2"]
    bad = scans["sub-t01_ses-2"]
    assert bad.error == (f"sub-t01_ses-2: no FLAIR image matches the selection in "
                         f"{root / 'sub-t01' / 'ses-2'} (needed by --contrasts T1w, FLAIR)")
    assert bad.error_code == ExitCode.MISSING_INPUT
    for sid in ("sub-h01_ses-1", "sub-h01_ses-2", "sub-t01_ses-1"):
        assert scans[sid].error is None, scans[sid].error
        assert scans[sid].files["FLAIR"].name == f"{sid}_FLAIR.nii.gz"
    # At the participant level the contrasts come from the bundle, and the message says so.
    scans = {s.key.scan_id: s for s in discover_scans(
        root, sel, needed_by="the model bundle's contrasts")}
    assert "(needed by the model bundle's contrasts T1w, FLAIR)" in scans["sub-t01_ses-2"].error


def test_missing_extra_contrast_everywhere_fails_every_scan(tiny_cohort, tmp_path):
    """No FLAIR at all: every scan fails with 66 (a run then exits 66); nothing raises."""
    from bids_anomaly.runner.common import RunSummary, ScanStatus, precheck

    sel = SelectionConfig(participant_labels=("h01",), contrasts=("T1w", "FLAIR"))
    scans = discover_scans(tiny_cohort.root, sel)
    assert [s.key.scan_id for s in scans] == ["sub-h01_ses-1", "sub-h01_ses-2"]
    assert all("no FLAIR image" in s.error and s.error_code == 66 for s in scans)
    good, bad = precheck(scans)
    assert good == [] and {f.code for f in bad.values()} == {ExitCode.MISSING_INPUT}
    summary = RunSummary("participant", [ScanStatus(f.scan_id, "failed", f.message, f.code)
                                         for f in bad.values()])
    assert summary.exit_code == ExitCode.MISSING_INPUT


def test_two_images_of_an_extra_contrast_are_ambiguous(tiny_cohort, tmp_path):
    """.nii next to .nii.gz, or a rec- variant (not in the scan key): exit 65, both named."""
    root = _copy_with_flair(tiny_cohort, tmp_path, ["sub-h01_ses-1", "sub-h01_ses-2",
                                                    "sub-t01_ses-1", "sub-t01_ses-2"])
    anat1, anat2 = root / "sub-h01/ses-1/anat", root / "sub-h01/ses-2/anat"
    shutil.copy(anat1 / "sub-h01_ses-1_FLAIR.nii.gz", anat1 / "sub-h01_ses-1_FLAIR.nii")
    shutil.copy(anat2 / "sub-h01_ses-2_FLAIR.nii.gz", anat2 / "sub-h01_ses-2_rec-norm_FLAIR.nii.gz")
    sel = SelectionConfig(participant_labels=("h01", "t01"), contrasts=("T1w", "FLAIR"))
    scans = {s.key.scan_id: s for s in discover_scans(root, sel)}
    for sid, anat, other in (("sub-h01_ses-1", anat1, "sub-h01_ses-1_FLAIR.nii"),
                             ("sub-h01_ses-2", anat2, "sub-h01_ses-2_rec-norm_FLAIR.nii.gz")):
        err = scans[sid].error
        assert err.startswith(f"more than one FLAIR image matches {sid}: "), err
        assert str(anat / f"{sid}_FLAIR.nii.gz") in err and str(anat / other) in err
        assert err.endswith("use --bids-filter-file to choose one")
        assert scans[sid].error_code == ExitCode.DATA_ERROR
    assert all(scans[s].error is None for s in ("sub-t01_ses-1", "sub-t01_ses-2"))


def test_precheck_maps_discovery_errors_to_their_codes(tiny_cohort, tmp_path):
    """Missing FLAIR -> 66, two FLAIRs -> 65, the clean scans pass; mixed codes exit 1."""
    from bids_anomaly.runner.common import RunSummary, ScanStatus, precheck

    root = _copy_with_flair(tiny_cohort, tmp_path, ["sub-h01_ses-1", "sub-t01_ses-1"])
    anat = root / "sub-h01/ses-1/anat"
    shutil.copy(anat / "sub-h01_ses-1_FLAIR.nii.gz", anat / "sub-h01_ses-1_FLAIR.nii")
    sel = SelectionConfig(participant_labels=("h01", "t01"), contrasts=("T1w", "FLAIR"))
    good, bad = precheck(discover_scans(root, sel))
    assert [s.key.scan_id for s in good] == ["sub-t01_ses-1"]
    assert {sid: f.code for sid, f in bad.items()} == {
        "sub-h01_ses-1": ExitCode.DATA_ERROR, "sub-h01_ses-2": ExitCode.MISSING_INPUT,
        "sub-t01_ses-2": ExitCode.MISSING_INPUT}
    assert "no FLAIR image matches the selection" in bad["sub-t01_ses-2"].message
    summary = RunSummary("participant", [ScanStatus(f.scan_id, "failed", f.message, f.code)
                                         for f in bad.values()])
    assert summary.exit_code == ExitCode.FAILURE


def test_healthy_filter(tiny_cohort):
    subjects = ["h01", "h02", "h03", "t01", "p01"]
    assert healthy_subjects(tiny_cohort.root, subjects, (("split", "train"),)) == [
        "h01", "h02", "h03"]
    assert healthy_subjects(tiny_cohort.root, subjects, (("group", "control"),)) == [
        "h01", "h02", "h03", "t01"]
    with pytest.raises(DataError, match="nocolumn"):
        healthy_subjects(tiny_cohort.root, subjects, (("nocolumn", "x"),))


def test_no_healthy_filter_warns(tiny_cohort, caplog):
    with caplog.at_level("WARNING", logger="bids_anomaly"):
        assert healthy_subjects(tiny_cohort.root, ["h01"], ()) == ["h01"]
    assert "assumed healthy" in caplog.text
