"""A brain mask must be a brain, and lie in the image: the check against the image content."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from bids_anomaly.core.errors import DataError
from bids_anomaly.preprocessing.brain_mask import image_support
from bids_anomaly.preprocessing.checks import check_brain, load_checked, mask_principal_extents

from .conftest import SHARED_DATA

BALL_ML = 113.0


def _radius(shape, zooms, centre=None):
    """Distance (mm) of every voxel from ``centre`` (voxel coordinates; default: middle)."""
    idx = np.indices(shape, dtype=np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2 if centre is None else np.asarray(centre)
    d = (idx - c.reshape(3, 1, 1, 1)) * np.asarray(zooms, np.float32).reshape(3, 1, 1, 1)
    return np.sqrt((d**2).sum(0))


def _ellipsoid(shape, zooms, semi_axes_mm, centre=None):
    idx = np.indices(shape, dtype=np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2 if centre is None else np.asarray(centre)
    q = sum(((idx[i] - c[i]) * zooms[i] / semi_axes_mm[i]) ** 2 for i in range(3))
    return q <= 1.0


def _ball_of_noise(n, vs, background_sd=0.0, seed=0):
    """A ~113 mL ball of uniform noise centred in an n^3 grid of zeros (or of noise)."""
    rng = np.random.default_rng(seed)
    radius = (BALL_ML * 1000 * 3 / (4 * np.pi)) ** (1 / 3)  # 30 mm
    inside = _radius((n,) * 3, (vs,) * 3) < radius
    data = np.where(inside, rng.uniform(0, 1000, inside.shape), 0.0)
    if background_sd:
        data = np.abs(data + rng.normal(0, background_sd, data.shape))  # magnitude noise
    return data.astype(np.float32), inside


# --- the defect: a ball of noise got a deepbet "brain" and was scored ----------------------


@pytest.mark.parametrize("n, vs, background_sd", [(160, 1.2, 0.0), (100, 2.0, 30.0)],
                         ids=["zeros-1.2mm", "noisy-background-2mm"])
def test_ball_of_noise_is_refused_by_preprocessing(tmp_path, n, vs, background_sd):
    """deepbet finds a ~2 L "brain" around a 113 mL ball of noise; the scan must fail."""
    from bids_anomaly.preprocessing.pipeline import preprocess_scan

    data, _ = _ball_of_noise(n, vs, background_sd)
    path = tmp_path / "sub-ball_T1w.nii.gz"
    nb.save(nb.Nifti1Image(data, np.diag([vs, vs, vs, 1.0])), path)
    with pytest.raises(DataError) as err:
        preprocess_scan({"T1w": str(path)}, tmp_path / "pre")
    msg = str(err.value)
    assert str(path) in msg
    assert "foreground" in msg and "may not contain a head" in msg
    assert not (tmp_path / "pre" / "preproc.json").exists()


def test_synthetic_heads_pass(tmp_path):
    """Synthetic heads with and without skull, through the brain extraction preprocessing uses."""
    from bids_anomaly.preprocessing.pipeline import brain_mask_for
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    methods = set()
    for skull in (True, False):
        root = tmp_path / f"skull{skull}"
        generate_cohort(root, SynthConfig(n_healthy=1, n_healthy_test=0, n_patients=0,
                                          voxel_size=3.0, template_resolution=2,
                                          with_skull=skull, seed=2))
        path = root / "sub-h01/anat/sub-h01_T1w.nii.gz"
        img = load_checked(path)
        mask, method = brain_mask_for(img, "auto")
        methods.add(method)
        check_brain(mask, img.header.get_zooms()[:3], path, data=np.asarray(img.dataobj))
    assert "deepbet" in methods


# --- the check on simple arrays (fast) ------------------------------------------------------

ZOOMS = (2.0, 2.0, 2.0)
SHAPE = (100, 110, 90)
BRAIN_AXES = (84.0, 68.0, 60.0)  # semi-axes (mm) of a ~1.4 L brain-shaped ellipsoid


def _brain():
    return _ellipsoid(SHAPE, ZOOMS, BRAIN_AXES)


def _head(background=0.0, noise_sd=0.0, seed=0):
    """A head: scalp 100, skull 0 (no signal), brain 60 with ventricles 0.5, background."""
    rng = np.random.default_rng(seed)
    head = _ellipsoid(SHAPE, ZOOMS, [a + 16 for a in BRAIN_AXES])
    skull = _ellipsoid(SHAPE, ZOOMS, [a + 9 for a in BRAIN_AXES])
    brain = _brain()
    ventricles = _ellipsoid(SHAPE, ZOOMS, (20.0, 10.0, 10.0))
    data = np.full(SHAPE, background, np.float32)
    data[head] = 100.0
    data[skull] = 0.0
    data[brain] = 60.0
    data[ventricles] = 0.5
    if noise_sd:
        data = np.abs(data + rng.normal(0, noise_sd, SHAPE)).astype(np.float32)
    return data, brain


@pytest.mark.parametrize("background, noise_sd", [(0.0, 0.0), (-3.5, 0.0), (0.0, 4.0)],
                         ids=["zero", "constant-negative", "rician-noise"])
def test_support_is_the_head_whatever_the_background(background, noise_sd):
    data, brain = _head(0.0, noise_sd)
    head = _ellipsoid(SHAPE, ZOOMS, [a + 16 for a in BRAIN_AXES])
    if background:
        data = np.where(head, (data - 50) / 20, background).astype(np.float32)  # z-scored
    support, info = image_support(data)
    assert (support & brain).sum() == brain.sum()  # dark skull and ventricles are filled
    assert abs(int(support.sum()) - int(head.sum())) < 0.02 * head.sum()
    assert info["background"] == pytest.approx(background, abs=3)


def test_support_fills_a_head_cut_by_the_field_of_view():
    data, _ = _head()
    head = _ellipsoid(SHAPE, ZOOMS, [a + 16 for a in BRAIN_AXES])[:, :, 20:]
    cut = data[:, :, 20:]  # the FOV cuts through the skull: a 3D fill cannot close it
    support, _ = image_support(cut)
    assert support[head].mean() > 0.995


def test_brain_inside_a_head_passes():
    for background, noise_sd in [(0.0, 0.0), (0.0, 4.0)]:
        data, brain = _head(background, noise_sd)
        check_brain(brain, ZOOMS, "sub-x_T1w.nii.gz", data=data)


def test_stripped_brain_passes_and_so_does_a_generous_mask():
    data, brain = _head()
    stripped = np.where(brain, data, -2.0).astype(np.float32)
    check_brain(brain, ZOOMS, "sub-x_T1w.nii.gz", data=stripped)
    # deepbet on skull-stripped BraTS reaches 1.3x the stripped brain, a quarter outside it
    bigger = _ellipsoid(SHAPE, ZOOMS, [a * 1.1 for a in BRAIN_AXES])
    check_brain(bigger, ZOOMS, "sub-x_T1w.nii.gz", data=stripped)


def test_mask_much_larger_than_the_content_fails():
    vs = 2.0
    data, ball = _ball_of_noise(100, vs)
    mask = _radius(data.shape, (vs,) * 3) < 78.0  # a 2 L "brain" around a 113 mL ball
    with pytest.raises(DataError) as err:
        check_brain(mask, (vs,) * 3, "sub-x_T1w.nii.gz", data=data)
    msg = str(err.value)
    assert msg.startswith("sub-x_T1w.nii.gz: brain mask (")
    assert "x the image's foreground (11" in msg and "may not contain a head" in msg


def test_mask_on_the_background_fails():
    """A brain-sized mask beside the image content (as large as the mask), not on it."""
    content = 50.0 * _ellipsoid(SHAPE, ZOOMS, (60.0, 50.0, 50.0), centre=(50, 27, 45))
    shifted = _ellipsoid(SHAPE, ZOOMS, (60.0, 50.0, 50.0), centre=(50, 83, 45))
    with pytest.raises(DataError, match=r"sub-x_T1w.nii.gz: \d+% of the brain mask .* lies on "
                                        "the image background"):
        check_brain(shifted, ZOOMS, "sub-x_T1w.nii.gz", data=content)


@pytest.mark.parametrize("semi_axes, why", [
    ((70.0, 70.0, 20.0), "slab"),  # 410 mL, 40 mm thick
    ((160.0, 40.0, 40.0), "rod"),  # 1.1 L, 320 mm long
    ((100.0, 100.0, 28.0), "disc"),  # 1.2 L, 56 mm thick but 200 mm wide
], ids=["slab", "rod", "disc"])
def test_mask_not_shaped_like_a_brain_fails(semi_axes, why):
    shape = (170, 170, 170)
    mask = _ellipsoid(shape, ZOOMS, semi_axes)
    with pytest.raises(DataError, match="sub-x_T1w.nii.gz: brain mask .* is not shaped like a "
                                        "brain"):
        check_brain(mask, ZOOMS, "sub-x_T1w.nii.gz")


def test_scattered_mask_fails():
    mask = np.zeros(SHAPE, bool)
    for i in range(4):
        for j in range(4):  # 16 separate 20 mm blocks spread over a brain-sized region
            mask[5 + 25 * i:15 + 25 * i, 5 + 27 * j:15 + 27 * j, 10:80] = True
    with pytest.raises(DataError, match="scattered in 16 pieces, the largest only 6%"):
        check_brain(mask, ZOOMS, "sub-x_T1w.nii.gz")


def test_brain_shaped_masks_pass_the_shape_check():
    check_brain(_brain(), ZOOMS, "ok")
    ext = mask_principal_extents(_brain(), ZOOMS)
    assert ext == pytest.approx(0.92 * np.array([168, 136, 120]), rel=0.03)  # 99 %: 92 %
    # any orientation: the same brain tilted 30 degrees in the grid
    idx = np.indices(SHAPE, dtype=np.float32)
    c = (np.asarray(SHAPE, np.float32) - 1) / 2
    x, y, z = ((idx[i] - c[i]) * ZOOMS[i] for i in range(3))
    a = np.deg2rad(30)
    xr, yr = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
    tilted = (xr / BRAIN_AXES[0]) ** 2 + (yr / BRAIN_AXES[1]) ** 2 + (z / BRAIN_AXES[2]) ** 2 <= 1
    assert mask_principal_extents(tilted, ZOOMS) == pytest.approx(ext, rel=0.03)
    check_brain(tilted, ZOOMS, "ok")


# --- real scans (skipped where ../shared/data is absent) -------------------------------------

REAL = [
    ("ixi-t1/sub-IXI012/anat/sub-IXI012_T1w.nii.gz", "auto"),  # with skull: deepbet
    # skull-stripped BraTS, the tightest real case: deepbet's mask is 1.3x the stripped brain
    ("brats2015/sub-brats13p0006/anat/sub-brats13p0006_ce-gadolinium_T1w.nii.gz", "deepbet"),
    ("openms/sub-msp07/anat/sub-msp07_T1w.nii.gz", "auto"),  # stripped MNI: already-stripped
]


@pytest.mark.realdata
@pytest.mark.parametrize("rel, method", REAL, ids=[r.split("/")[0] for r, _ in REAL])
def test_real_brains_pass(rel, method):
    from bids_anomaly.preprocessing.pipeline import brain_mask_for

    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent")
    img = load_checked(path)
    mask, _ = brain_mask_for(img, method)
    check_brain(mask, img.header.get_zooms()[:3], path, data=np.asarray(img.dataobj))
