"""Input discovery with pybids: sessions, filters, contrasts, healthy selection."""

from __future__ import annotations

import json
import shutil

import pytest

from bids_anomaly.bids_io.discovery import discover_scans, healthy_subjects, load_filter_file
from bids_anomaly.config import SelectionConfig
from bids_anomaly.errors import DataError, EmptySelectionError, MissingInputError


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


def test_missing_extra_contrast_is_named(tiny_cohort):
    sel = SelectionConfig(participant_labels=("h01",), contrasts=("T1w", "FLAIR"))
    with pytest.raises(MissingInputError, match="FLAIR"):
        discover_scans(tiny_cohort.root, sel)


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
