"""Tests for bids_anomaly.synth on tiny, coarse cohorts (4 mm voxels, 2 mm template)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_anomaly import __version__
from bids_anomaly.core.errors import UsageError
from bids_anomaly.core.templates import load_template
from bids_anomaly.synth.anatomy import synth_subject
from bids_anomaly.synth.cohort import generate_cohort
from bids_anomaly.synth.config import SynthCohort, SynthConfig

FAST = SynthConfig(n_healthy=2, n_healthy_test=1, n_patients=2, voxel_size=4.0,
                   template_resolution=2, seed=7)
ALL_CONTRASTS = ("T1w", "T2w", "FLAIR")


def _data(path: Path) -> np.ndarray:
    return np.asarray(nb.load(path).dataobj)


def _anat(root: Path, label: str, suffix: str, ses: str | None = None) -> Path:
    parts = [f"sub-{label}"] + ([f"ses-{ses}"] if ses else [])
    return root.joinpath(*parts, "anat", "_".join(parts) + f"_{suffix}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> SynthCohort:
    root = tmp_path_factory.mktemp("synth") / "bids"
    seen: list[str] = []
    result = generate_cohort(root, replace(FAST, contrasts=ALL_CONTRASTS), progress=seen.append)
    assert seen == ["sub-h01", "sub-h02", "sub-t01", "sub-p01", "sub-p02"]
    return result


def test_cohort_roles_and_participants(cohort: SynthCohort) -> None:
    assert cohort.train_subjects == ["h01", "h02"]
    assert cohort.test_healthy_subjects == ["t01"]
    assert cohort.patient_subjects == ["p01", "p02"]
    assert cohort.labels_dir == cohort.root / "derivatives" / "lesions"
    table = pd.read_csv(cohort.root / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "group", "split", "age", "sex"]
    assert list(table.participant_id) == ["sub-h01", "sub-h02", "sub-t01", "sub-p01", "sub-p02"]
    assert list(table.group) == ["control"] * 3 + ["patient"] * 2
    assert list(table.split) == ["train"] * 2 + ["test"] * 3
    assert table.age.between(18, 90).all() and set(table.sex) <= {"M", "F"}
    described = json.loads((cohort.root / "participants.json").read_text())
    assert set(described) == set(table.columns)
    assert (cohort.root / "README").read_text().strip()


def test_dataset_descriptions(cohort: SynthCohort) -> None:
    raw = json.loads((cohort.root / "dataset_description.json").read_text())
    assert raw["BIDSVersion"] == "1.10.0" and raw["DatasetType"] == "raw"
    assert raw["License"] == "CC0"
    assert raw["GeneratedBy"] == [{"Name": "bids-anomaly synth", "Version": __version__}]
    deriv = json.loads((cohort.labels_dir / "dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative"
    assert deriv["GeneratedBy"][0]["Name"] == "bids-anomaly synth"
    assert deriv["SourceDatasets"]


def test_images_files_and_sidecars(cohort: SynthCohort) -> None:
    for label in ["h01", "h02", "t01", "p01", "p02"]:
        t1 = nb.load(_anat(cohort.root, label, "T1w.nii.gz"))
        for contrast in ALL_CONTRASTS:
            path = _anat(cohort.root, label, f"{contrast}.nii.gz")
            img = nb.load(path)
            assert img.get_data_dtype() == np.int16
            assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
            assert nb.aff2axcodes(img.affine) != ("R", "A", "S")
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            assert np.allclose(img.get_qform(), img.affine, atol=1e-4)
            assert np.allclose(img.header.get_zooms(), 4.0)
            data = _data(path)
            assert data.min() >= 0 and 500 < data.max() < 32767
            sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
            assert sidecar["Synthetic"] is True
            assert sidecar["Manufacturer"] == "bids-anomaly synth"
    assert not list(cohort.root.rglob("ses-*"))


def test_label_derivative(cohort: SynthCohort) -> None:
    labels = cohort.labels_dir
    for label in ["h01", "h02"]:
        assert not _anat(labels, label, "label-lesion_mask.nii.gz").exists()
    for label in ["h01", "h02", "t01", "p01", "p02"]:
        t1 = nb.load(_anat(cohort.root, label, "T1w.nii.gz"))
        brain_path = _anat(labels, label, "desc-brain_mask.nii.gz")
        brain_img = nb.load(brain_path)
        assert brain_img.get_data_dtype() == np.uint8
        assert brain_img.shape == t1.shape and np.allclose(brain_img.affine, t1.affine)
        brain = _data(brain_path).astype(bool)
        volume_ml = brain.sum() * 4.0**3 / 1000
        assert 900 < volume_ml < 2100
        # the head is bright around the brain, the corners are background
        t1_data = _data(_anat(cohort.root, label, "T1w.nii.gz")).astype(float)
        assert t1_data[brain].mean() > 3 * t1_data[:4, :4, :4].mean()
        if label.startswith("h"):
            continue
        path = _anat(labels, label, "label-lesion_mask.nii.gz")
        img = nb.load(path)
        assert img.get_data_dtype() == np.uint8
        assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
        lesion = _data(path)
        assert set(np.unique(lesion)) <= {0, 1}
        if label.startswith("t"):
            assert not lesion.any()
        else:
            assert lesion.sum() > 0
            assert not (lesion.astype(bool) & ~brain).any()
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["LabelOrigin"] == "synthetic"
        assert sidecar["Sources"] == [f"bids:raw:sub-{label}/anat/sub-{label}_T1w.nii.gz"]


def test_cohort_is_deterministic_and_subjects_independent(
    cohort: SynthCohort, tmp_path: Path
) -> None:
    # same seed, fewer patients and no extra contrasts: the shared subjects are identical
    other = generate_cohort(tmp_path / "again", replace(FAST, n_healthy=1, n_patients=1))
    for label in ["h01", "t01", "p01"]:
        a = _anat(cohort.root, label, "T1w.nii.gz")
        b = _anat(other.root, label, "T1w.nii.gz")
        assert np.array_equal(_data(a), _data(b))
        assert np.array_equal(nb.load(a).affine, nb.load(b).affine)
    for suffix in ["label-lesion_mask.nii.gz", "desc-brain_mask.nii.gz"]:
        assert np.array_equal(_data(_anat(cohort.labels_dir, "p01", suffix)),
                              _data(_anat(other.labels_dir, "p01", suffix)))
    # subjects differ from each other
    h1 = _data(_anat(cohort.root, "h01", "T1w.nii.gz"))
    h2 = _data(_anat(cohort.root, "h02", "T1w.nii.gz"))
    assert h1.shape != h2.shape or not np.array_equal(h1, h2)


def test_cohort_in_worker_processes_is_the_same(cohort: SynthCohort, tmp_path: Path) -> None:
    # generate_cohort(workers=N) (the GPU cohort benchmark's 50 participants): same subjects,
    # same table, same order of progress messages as one process
    seen: list[str] = []
    par = generate_cohort(tmp_path / "par", replace(FAST, contrasts=ALL_CONTRASTS),
                          progress=seen.append, workers=2)
    assert seen == ["sub-h01", "sub-h02", "sub-t01", "sub-p01", "sub-p02"]
    assert ((par.root / "participants.tsv").read_text()
            == (cohort.root / "participants.tsv").read_text())
    for label in ["h01", "h02", "t01", "p01", "p02"]:
        for contrast in ALL_CONTRASTS:
            a = _anat(cohort.root, label, f"{contrast}.nii.gz")
            b = _anat(par.root, label, f"{contrast}.nii.gz")
            assert np.array_equal(_data(a), _data(b))
            assert np.array_equal(nb.load(a).affine, nb.load(b).affine)
    for label in ["p01", "p02"]:
        assert np.array_equal(_data(_anat(cohort.labels_dir, label, "label-lesion_mask.nii.gz")),
                              _data(_anat(par.labels_dir, label, "label-lesion_mask.nii.gz")))


def test_synth_subject_seed_controls_output() -> None:
    template = load_template(2)
    one = synth_subject(template, np.random.default_rng(3), FAST, lesions=True)
    same = synth_subject(template, np.random.default_rng(3), FAST, lesions=True)
    other = synth_subject(template, np.random.default_rng(4), FAST, lesions=True)
    assert np.array_equal(one.images["T1w"], same.images["T1w"])
    assert np.array_equal(one.lesion_mask, same.lesion_mask)
    assert np.array_equal(one.brain_mask, same.brain_mask)
    assert one.images["T1w"].dtype == np.int16
    assert (one.images["T1w"].shape != other.images["T1w"].shape
            or not np.array_equal(one.images["T1w"], other.images["T1w"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesions_change_intensity(seed: int) -> None:
    template = load_template(2)
    config = replace(FAST, contrasts=ALL_CONTRASTS, lesions_per_patient=(1, 1))
    sick = synth_subject(template, np.random.default_rng(seed), config, lesions=True)
    well = synth_subject(template, np.random.default_rng(seed), config, lesions=False)
    assert len(sick.lesions) == 1 and not well.lesions and not well.lesion_mask.any()
    mask = sick.lesion_mask
    assert mask.any() and not (mask & ~sick.brain_mask).any()
    assert np.array_equal(sick.brain_mask, well.brain_mask)
    far = ~mask
    for contrast in ALL_CONTRASTS:
        a = sick.images[contrast].astype(float)
        b = well.images[contrast].astype(float)
        ratio = a[mask].mean() / b[mask].mean()
        if contrast == "T1w":
            assert abs(ratio - 1.0) > 0.12
            assert (ratio < 1) == (sick.lesions[0].factors["T1w"] < 1)
        else:
            assert ratio > 1.15
        # outside the lesion (and its soft edge) nothing changes
        changed = a != b
        assert changed[far].sum() <= 2 * mask.sum()


def test_sessions_and_no_skull(tmp_path: Path) -> None:
    config = replace(FAST, n_healthy=1, n_healthy_test=0, n_patients=1, n_sessions=2,
                     with_skull=False, contrasts=("T1w", "FLAIR"))
    cohort = generate_cohort(tmp_path / "bids", config)
    for label in ["h01", "p01"]:
        for ses in ["1", "2"]:
            assert _anat(cohort.root, label, "T1w.nii.gz", ses).exists()
            assert _anat(cohort.root, label, "FLAIR.nii.gz", ses).exists()
            assert not _anat(cohort.root, label, "T2w.nii.gz", ses).exists()
            assert _anat(cohort.labels_dir, label, "desc-brain_mask.nii.gz", ses).exists()
    masks = [_data(_anat(cohort.labels_dir, "p01", "label-lesion_mask.nii.gz", s)) for s in "12"]
    assert all(m.sum() > 0 for m in masks)
    # the lesions follow the anatomy: similar volume in both sessions
    assert 0.6 < masks[0].sum() / masks[1].sum() < 1.6
    s1 = _data(_anat(cohort.root, "p01", "T1w.nii.gz", "1"))
    s2 = _data(_anat(cohort.root, "p01", "T1w.nii.gz", "2"))
    assert s1.shape != s2.shape or not np.array_equal(s1, s2)
    # no skull: outside the brain only the noise floor remains
    brain = _data(_anat(cohort.labels_dir, "h01", "desc-brain_mask.nii.gz", "1")).astype(bool)
    t1 = _data(_anat(cohort.root, "h01", "T1w.nii.gz", "1")).astype(float)
    shell = ~ndimage.binary_dilation(brain, iterations=2)
    assert t1[shell].mean() < 0.1 * t1[brain].mean()


def test_config_validation() -> None:
    with pytest.raises(UsageError):
        SynthConfig(contrasts=("T2w", "T1w"))
    with pytest.raises(UsageError):
        SynthConfig(contrasts=("T1w", "PD"))
    with pytest.raises(UsageError):
        SynthConfig(lesions_per_patient=(3, 1))
    with pytest.raises(UsageError):
        SynthConfig(n_sessions=0)
