"""Preprocessing stages on small synthetic volumes, and every bad-input check."""

from __future__ import annotations

import gzip

import nibabel as nb
import numpy as np
import pytest

from bids_anomaly.core.errors import DataError
from bids_anomaly.preprocessing.bias import n4_correct
from bids_anomaly.preprocessing.brain_mask import skull_stripped_mask
from bids_anomaly.preprocessing.checks import load_checked
from bids_anomaly.preprocessing.normalise import normalise_intensity


def _ball(shape=(48, 56, 48), radius=18.0):
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2
    r = np.sqrt(((idx - c[:, None, None, None]) ** 2).sum(0))
    return r < radius, r


def _save(tmp_path, data, affine=None, name="img.nii.gz", dtype=np.float32):
    affine = np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine
    path = tmp_path / name
    nb.save(nb.Nifti1Image(np.asarray(data, dtype=dtype), affine), path)
    return path


def _head():
    inside, _ = _ball()
    return (inside * 100.0 + 1.0).astype(np.float32)


def test_good_image_loads(tmp_path):
    img = load_checked(_save(tmp_path, _head()))
    assert img.shape == (48, 56, 48)


def test_4d_with_one_volume_is_accepted(tmp_path):
    img = load_checked(_save(tmp_path, _head()[..., None]))
    assert img.shape == (48, 56, 48)


BAD = {
    "nan": (lambda: np.where(_ball()[0], np.nan, 1.0), None, "NaN or infinite"),
    "4d": (lambda: np.stack([_head()] * 3, -1), None, "expected a 3D image"),
    "2d": (lambda: _head()[:, :, 0], None, "expected a 3D image"),
    "constant": (lambda: np.zeros((48, 56, 48)), None, "constant"),
    "huge_voxels": (_head, np.diag([20.0, 20.0, 20.0, 1.0]), "implausible voxel size"),
    "tiny_voxels": (_head, np.diag([0.01, 0.01, 0.01, 1.0]), "implausible voxel size"),
    "tiny_fov": (lambda: np.ones((10, 10, 10)) + np.eye(10)[..., None], np.diag([1.0] * 4),
                 "field of view"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_named(tmp_path, case):
    make, affine, message = BAD[case]
    path = _save(tmp_path, make(), affine, name=f"sub-x_{case}_T1w.nii.gz")
    with pytest.raises(DataError) as err:
        load_checked(path)
    assert str(path) in str(err.value)
    if message:
        assert message in str(err.value)


def test_singular_affine(tmp_path):
    img = nb.Nifti1Image(_head(), None)
    img.header.set_zooms((4.0, 4.0, 4.0))
    img.header.set_sform(np.array([[4, 0, 0, 0], [0, 4, 0, 0], [4, 0, 0, 0], [0, 0, 0, 1.0]]),
                         code=2)
    path = tmp_path / "singular_T1w.nii.gz"
    nb.save(img, path)
    with pytest.raises(DataError, match="singular"):
        load_checked(path)


def test_no_brain_in_mask_is_named():
    from bids_anomaly.preprocessing.checks import check_brain

    mask = np.zeros((48, 56, 48), bool)
    mask[20:25, 20:25, 20:25] = True  # 125 voxels x 64 mm^3 = 8 mL
    with pytest.raises(DataError, match="sub-x_T1w.nii.gz: brain extraction found 8 mL"):
        check_brain(mask, (4.0, 4.0, 4.0), "sub-x_T1w.nii.gz")
    check_brain(_ball(radius=22)[0], (4.0, 4.0, 4.0), "ok")  # ~2900 mL: accepted


def test_truncated_and_not_nifti(tmp_path):
    good = _save(tmp_path, _head())
    trunc = tmp_path / "trunc_T1w.nii.gz"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(DataError, match="trunc_T1w.nii.gz"):
        load_checked(trunc)
    fake = tmp_path / "fake_T1w.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not an image" * 50))
    with pytest.raises(DataError, match="not a readable NIfTI"):
        load_checked(fake)
    with pytest.raises(DataError, match="does not exist"):
        load_checked(tmp_path / "missing.nii.gz")


def test_n4_removes_a_smooth_bias():
    inside, r = _ball()
    rng = np.random.default_rng(0)
    x = np.indices(inside.shape)[0].astype(np.float32)
    bias = 1.0 + 0.4 * (x / x.max() - 0.5)
    tissue = np.where(r < 10, 60.0, 100.0) * inside  # two tissues, like GM and WM
    img = (tissue * bias + 1.0 + rng.normal(0, 1, inside.shape)).astype(np.float32)
    out = n4_correct(img, inside, (4.0, 4.0, 4.0), shrink=2)
    outer = inside & (r > 12)
    cv = lambda a: float(a[outer].std() / a[outer].mean())  # noqa: E731
    assert cv(out) < 0.5 * cv(img)


def test_n4_through_antspyx_matches_simpleitk(monkeypatch):
    # BIDS_ANOMALY_N4_BACKEND=antspyx (the GPU benchmark's environment has no SimpleITK):
    # ANTs' N4 with SimpleITK's settings gives the same correction; the default stays SimpleITK
    from bids_anomaly.preprocessing.bias import N4_BACKEND_ENV, n4_backend_from_env

    inside, r = _ball()
    rng = np.random.default_rng(1)
    x = np.indices(inside.shape)[0].astype(np.float32)
    img = ((np.where(r < 10, 60.0, 100.0) * (1.0 + 0.4 * (x / x.max() - 0.5)) + 1.0
            + rng.normal(0, 1, inside.shape)) * inside).astype(np.float32)
    ref = n4_correct(img, inside, (4.0, 4.0, 4.0), shrink=2)
    ants_out = n4_correct(img, inside, (4.0, 4.0, 4.0), shrink=2, backend="antspyx")
    assert np.linalg.norm(ants_out - ref) / np.linalg.norm(ref) < 1e-4
    monkeypatch.delenv(N4_BACKEND_ENV, raising=False)
    assert n4_backend_from_env() == "simpleitk"
    monkeypatch.setenv(N4_BACKEND_ENV, "ANTsPyX")
    assert n4_backend_from_env() == "antspyx"
    monkeypatch.setenv(N4_BACKEND_ENV, "fsl")
    with pytest.raises(ValueError, match="BIDS_ANOMALY_N4_BACKEND"):
        n4_backend_from_env()
    with pytest.raises(ValueError, match="unknown N4 backend"):
        n4_correct(img, inside, (4.0, 4.0, 4.0), backend="fsl")


def test_n4_backend_enters_the_node_hash_only_when_chosen(tmp_path, monkeypatch):
    # the default leaves preprocessing work directories of earlier runs valid; antspyx N4
    # re-runs the node instead of reusing SimpleITK's outputs, and the other way round
    import json

    from bids_anomaly.bids_io.discovery import ScanInput
    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.naming import ScanKey
    from bids_anomaly.preprocessing.bias import N4_BACKEND_ENV
    from bids_anomaly.preprocessing.pipeline import PreprocResult
    from bids_anomaly.workflows.preproc import init_preproc_wf

    scans = [ScanInput(ScanKey("01"), {"T1w": _save(tmp_path, _head(), name="t1.nii.gz")})]

    def hashed():
        _, nodes = init_preproc_wf(scans, PreprocConfig(), tmp_path / "work", 1, 0, "cpu")
        items, value = next(iter(nodes.values())).inputs.get_hashval(hash_method="content")
        return [name for name, _ in items], value

    monkeypatch.delenv(N4_BACKEND_ENV, raising=False)
    names, default = hashed()
    assert "n4_backend" not in names
    monkeypatch.setenv(N4_BACKEND_ENV, "antspyx")
    names, chosen = hashed()
    assert "n4_backend" in names and chosen != default
    # a preproc.json written before the backend was recorded was SimpleITK's
    old = {"native_ref": "a", "native_brain_mask": "b", "xfm": "c", "template_brain_mask": "d",
           "template_images": {}, "brain_extraction": "deepbet", "brain_volume_ml": 1.0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert PreprocResult.load(tmp_path / "old.json").n4_backend == "simpleitk"


def test_normalisation_is_invariant_to_affine_rescaling():
    inside, r = _ball()
    rng = np.random.default_rng(0)
    img = (inside * (50 + r * 3 + rng.normal(0, 2, inside.shape))).astype(np.float32)
    zscored = (img - img[inside].mean()) / img[inside].std()
    a = normalise_intensity(img, inside)
    b = normalise_intensity(zscored * 7.0 - 300.0, inside)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a[~inside].max() == 0 and a.max() <= 1.5


def test_skull_stripped_detection(tmp_path):
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    for skull in (True, False):
        root = tmp_path / f"skull{skull}"
        generate_cohort(root, SynthConfig(n_healthy=1, n_healthy_test=0, n_patients=0,
                                          voxel_size=3.0, template_resolution=2,
                                          with_skull=skull, seed=2))
        img = nb.load(root / "sub-h01/anat/sub-h01_T1w.nii.gz")
        truth = np.asarray(nb.load(
            root / "derivatives/lesions/sub-h01/anat/sub-h01_desc-brain_mask.nii.gz").dataobj)
        found = skull_stripped_mask(img)
        if skull:
            assert found is None
        else:
            assert found is not None
            dice = 2 * (found & (truth > 0)).sum() / (found.sum() + (truth > 0).sum())
            assert dice > 0.85


def test_native_round_trip(tmp_path):
    """A template-space map brought back to native space lands where it came from."""
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.preprocessing.pipeline import preprocess_scan
    from bids_anomaly.preprocessing.registration import to_native, to_template
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path / "bids"
    generate_cohort(root, SynthConfig(n_healthy=1, n_healthy_test=0, n_patients=0,
                                      voxel_size=3.0, template_resolution=2, with_skull=False,
                                      seed=5))
    res = preprocess_scan({"T1w": str(root / "sub-h01/anat/sub-h01_T1w.nii.gz")},
                          tmp_path / "pre")
    tpl = load_template(2)
    native = nb.load(res.native_ref)
    mask = np.asarray(nb.load(res.native_brain_mask).dataobj) > 0
    # Native brain mask → template → native again overlaps itself.
    work = tmp_path / "w"
    work.mkdir()
    import ants  # noqa: F401  (antspyx must be importable)

    fwd = [res.xfm]
    in_tpl = to_template(nb.Nifti1Image(mask.astype(np.float32), native.affine), tpl, fwd, work)
    back = to_native(in_tpl, tpl, native, res.xfm, work) > 0.5
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.9
    tmask = np.asarray(nb.load(res.template_brain_mask).dataobj) > 0
    tdice = 2 * (tmask & tpl.mask).sum() / (tmask.sum() + tpl.mask.sum())
    assert tdice > 0.85
    # --registration affine-coarse (the suite's training runs use it): the same scan's affine
    # maps the template brain within half a voxel (1 mm) of the full affine's.
    from bids_anomaly.preprocessing.normalise import normalise_intensity
    from bids_anomaly.preprocessing.registration import register_to_template

    brain = nb.Nifti1Image(normalise_intensity(np.asarray(native.dataobj, np.float32), mask),
                           native.affine)
    coarse = register_to_template(brain, tpl, tmp_path / "coarse.mat", tmp_path / "wc",
                                  kind="affine-coarse")
    pts = np.argwhere(tpl.mask)[::50] @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    pts *= [-1, -1, 1]  # ITK's LPS

    def mapped(path):
        tx = ants.read_transform(str(path))
        return np.array([tx.apply_to_point(tuple(p)) for p in pts])

    mat = [t for t in coarse if t.endswith(".mat")][0]
    rms = np.sqrt(((mapped(mat) - mapped(res.xfm)) ** 2).sum(1).mean())
    assert rms < 1.0, rms


def test_syn_registration_round_trip(tmp_path):
    """With SyN, the warps are kept and native maps use the inverse warp."""
    from dataclasses import replace

    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.preprocessing.pipeline import preprocess_scan
    from bids_anomaly.preprocessing.registration import to_native, warp_paths
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path / "bids"
    generate_cohort(root, SynthConfig(n_healthy=1, n_healthy_test=0, n_patients=0,
                                      voxel_size=4.0, template_resolution=2, with_skull=False,
                                      seed=8))
    res = preprocess_scan({"T1w": str(root / "sub-h01/anat/sub-h01_T1w.nii.gz")},
                          tmp_path / "pre", replace(PreprocConfig(), registration="syn"))
    assert all(p.exists() for p in warp_paths(res.xfm))
    tpl = load_template(2)
    tmask = np.asarray(nb.load(res.template_brain_mask).dataobj) > 0
    assert 2 * (tmask & tpl.mask).sum() / (tmask.sum() + tpl.mask.sum()) > 0.9
    native = nb.load(res.native_ref)
    back = to_native(tmask.astype(np.float32), tpl, native, res.xfm, tmp_path / "w") > 0.5
    mask = np.asarray(nb.load(res.native_brain_mask).dataobj) > 0
    assert 2 * (back & mask).sum() / (back.sum() + mask.sum()) > 0.9
