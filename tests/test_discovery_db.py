"""The pybids index in the work dir belongs to one dataset and never goes stale."""

from __future__ import annotations

import shutil

from bids_anomaly.bids_io.discovery import discover_scans
from bids_anomaly.core.config import SelectionConfig


def test_index_per_dataset_and_fresh(tiny_cohort, tmp_path):
    db = tmp_path / "db"
    a = tmp_path / "a"
    b = tmp_path / "b"
    shutil.copytree(tiny_cohort.root, a, ignore=shutil.ignore_patterns("derivatives", "sub-p*"))
    shutil.copytree(tiny_cohort.root, b, ignore=shutil.ignore_patterns("derivatives", "sub-h*"))
    ids_a = {s.key.subject for s in discover_scans(a, SelectionConfig(), db)}
    ids_b = {s.key.subject for s in discover_scans(b, SelectionConfig(), db)}
    assert "p01" not in ids_a and "h01" not in ids_b
    # A participant added after the first run is seen by the next one.
    shutil.copytree(tiny_cohort.root / "sub-p01", a / "sub-p01")
    assert "p01" in {s.key.subject for s in discover_scans(a, SelectionConfig(), db)}
