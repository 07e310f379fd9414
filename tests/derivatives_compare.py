"""Comparing two runs' derivatives: same files, voxels, affines, tables and sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

# Wall-clock seconds, dates and command lines differ between runs.
VOLATILE = {"date", "provenance", "Date", "DateTime", "command", "GeneratedBy", "report",
            "timings"}


def strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def assert_same_outputs(ref: Path, out: Path, pattern: str = "sub-*/**/*") -> None:
    """The files matching ``pattern`` are the same in both folders, with identical voxel
    arrays and affines, transforms, tables and sidecars (but for volatile keys)."""
    def files(root: Path):
        return sorted(p.relative_to(root) for p in root.glob(pattern) if p.is_file())

    assert files(ref) == files(out), pattern
    for rel in files(ref):
        a, b = ref / rel, out / rel
        if a.name.endswith(".nii.gz"):
            ia, ib = nb.load(a), nb.load(b)
            np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj),
                                          err_msg=str(rel))
            np.testing.assert_array_equal(ia.affine, ib.affine, err_msg=str(rel))
        elif a.suffix == ".json":
            assert strip_volatile(json.loads(a.read_text())) == \
                strip_volatile(json.loads(b.read_text())), rel
        elif a.suffix == ".tsv":
            pd.testing.assert_frame_equal(pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t"),
                                          obj=str(rel))
        elif a.suffix == ".mat":
            assert a.read_bytes() == b.read_bytes(), rel
