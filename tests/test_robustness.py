"""Bad inputs through the command line: exit code, a message naming the file, no partial output.

A 4 mm skull-free cohort is generated and a zscore bundle trained once (module fixture);
each case copies the dataset, breaks it, and runs the CLI by subprocess. The input dataset
must never be modified by a run (tree hash before/after every call).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from .conftest import tree_hash

SCAN = "sub-{s}/anat/sub-{s}_T1w.nii.gz"
STATMAP = "sub-{s}/anat/sub-{s}_stat-anomaly_statmap.nii.gz"


def cli(*args, bids: Path | None = None, timeout=600):
    """Run the CLI; when ``bids`` is given, check the run left that dataset untouched."""
    before = tree_hash(bids) if bids is not None else None
    r = subprocess.run([sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "COLUMNS": "250"})
    if bids is not None:
        assert tree_hash(bids) == before, f"the run modified the input dataset {bids}"
    return r


def flat(r) -> str:
    """stdout + stderr without table borders and line wrapping (paths may be folded)."""
    return re.sub(r"[\s│┃|]+", "", r.stdout + r.stderr)


def says(r, *fragments):
    text = flat(r)
    for frag in fragments:
        assert re.sub(r"\s+", "", frag) in text, f"{frag!r} not in output:\n{r.stdout}\n{r.stderr}"


def assert_no_partial_outputs(out: Path) -> None:
    """No temp files; every NIfTI loads completely and every JSON parses."""
    if not out.exists():
        return
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    for p in out.rglob("*.nii.gz"):
        np.asarray(nb.load(p).dataobj)  # raises on a truncated file
    for p in out.rglob("*.json"):
        json.loads(p.read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("robust")
    cohort = generate_cohort(root / "bids", SynthConfig(
        n_healthy=4, n_healthy_test=2, n_patients=1, voxel_size=4.0, template_resolution=2,
        n_sessions=1, with_skull=False, seed=5))
    shutil.rmtree(cohort.root / "derivatives", ignore_errors=True)
    out = root / "train-out"
    r = cli("train", cohort.root, out, "--healthy-filter", "split=train", "--model-type",
            "zscore", "-w", root / "train-work", "--nprocs", "2", "--registration",
            "affine-coarse", bids=cohort.root)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"bids": cohort.root, "bundle": out / "models" / "zscore", "root": root}


def copy_bids(base, dest: Path) -> Path:
    shutil.copytree(base["bids"], dest)
    return dest


def _image_2d(good, path):
    data = np.asarray(good.dataobj, dtype=np.float32)
    nb.save(nb.Nifti1Image(data[:, :, data.shape[2] // 2], good.affine), path)


def _huge_dimensions(good, path):
    """A header that claims 600^3 voxels; refused from the header, before the data is read."""
    hdr = nb.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((600, 600, 600))
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)


def _voxel_size(size):
    """Voxel size ``size`` mm in pixdim and in the sform (0: a header nibabel cannot fix)."""
    def make(good, path):
        img = nb.Nifti1Image(np.asarray(good.dataobj, dtype=np.float32), None)
        affine = np.diag([size, size, size, 1.0])
        affine[:3, 3] = good.affine[:3, 3]
        img.header.set_sform(affine, code=1)
        img.header["pixdim"][1:4] = size
        nb.save(img, path)
    return make


def _singular_affine(good, path):
    img = nb.Nifti1Image(np.asarray(good.dataobj, dtype=np.float32), None)
    img.header.set_zooms((4.0, 4.0, 4.0))
    img.header.set_sform(np.array([[4, 0, 0, 0], [0, 4, 0, 0], [4, 0, 0, 0], [0, 0, 0, 1.0]]),
                         code=2)
    nb.save(img, path)


def _all_zero(good, path):
    nb.save(nb.Nifti1Image(np.zeros(good.shape, np.float32), good.affine), path)


def _tiny_fov(good, path):
    data = np.asarray(good.dataobj, dtype=np.float32)
    c = [n // 2 for n in data.shape]
    crop = data[c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6, c[2] - 6:c[2] + 6]  # 12^3 x 4 mm
    nb.save(nb.Nifti1Image(crop, good.affine), path)


# Participant label -> how its T1w is broken (from t01's good image).
EXTRA_CASES = {
    "x2d": _image_2d,
    "xhuge": _huge_dimensions,
    "xvoxzero": _voxel_size(0.0),
    "xvoxtiny": _voxel_size(0.01),
    "xvoxbig": _voxel_size(50.0),
    "xsingular": _singular_affine,
    "xzero": _all_zero,
    "xfov": _tiny_fov,
}


@pytest.fixture(scope="module")
def broken(base, tmp_path_factory):
    """One dataset with several bad participants next to a good one, scored in one run.

    t01: good. t02: truncated .nii.gz. h01: a text file named .nii.gz. h02: NaN voxels.
    h03: 4D T1w with three volumes. p01: good. h04 (no T1w, a T2w only) is tested apart.
    Added participants (derived from t01's image), all refused by the cheap input checks or
    by discovery, before any workflow runs: see ``EXTRA_CASES`` and ``xdup`` (two T1w).
    """
    root = tmp_path_factory.mktemp("broken")
    bids = copy_bids(base, root / "bids")
    t02 = bids / SCAN.format(s="t02")
    t02.write_bytes(t02.read_bytes()[:3000])
    (bids / SCAN.format(s="h01")).write_text("this is not an image\n")
    img = nb.load(bids / SCAN.format(s="h02"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[10:12, 10:12, 10:12] = np.nan
    nb.save(nb.Nifti1Image(data, img.affine), bids / SCAN.format(s="h02"))
    img = nb.load(bids / SCAN.format(s="h03"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    nb.save(nb.Nifti1Image(np.stack([data] * 3, axis=-1), img.affine),
            bids / SCAN.format(s="h03"))
    for p in (bids / "sub-h04/anat").glob("*T1w*"):  # keep the subject, as a T2w only
        p.rename(p.with_name(p.name.replace("T1w", "T2w")))
    good = nb.load(bids / SCAN.format(s="t01"))
    for subject, make in EXTRA_CASES.items():
        (bids / f"sub-{subject}/anat").mkdir(parents=True)
        make(good, bids / SCAN.format(s=subject))
    (bids / "sub-xdup/anat").mkdir(parents=True)
    nb.save(good, bids / SCAN.format(s="xdup"))
    nb.save(good, bids / "sub-xdup/anat/sub-xdup_T1w.nii")
    out, work = root / "out", root / "work"
    r = cli(bids, out, "participant", "--model", base["bundle"], "--participant-label",
            "t01", "t02", "h01", "h02", "h03", "p01", "xdup", *EXTRA_CASES, "-w", work,
            "--nprocs", "2", bids=bids)
    return {"bids": bids, "out": out, "work": work, "run": r, "root": root,
            "bundle": base["bundle"]}


BAD_CASES = {
    "t02": "truncated",
    "h01": "not a readable NIfTI image",
    "h02": "NaN or infinite voxels",
    "h03": "expected a 3D image",
    "x2d": "expected a 3D image",
    "xhuge": "are too large",
    "xvoxzero": "the image affine is singular",
    "xvoxtiny": "implausible voxel size (0.01, 0.01, 0.01) mm",
    "xvoxbig": "implausible voxel size (50.0, 50.0, 50.0) mm",
    "xsingular": "affine is singular",
    "xzero": "image is constant",
    "xfov": "field of view (48.0, 48.0, 48.0) mm is too small",
}


def test_bad_participants_fail_with_data_error_others_finish(broken):
    r, out = broken["run"], broken["out"]
    assert r.returncode == 65, r.stdout + r.stderr
    for s in ("t01", "p01"):
        assert (out / STATMAP.format(s=s)).exists(), s
    assert_no_partial_outputs(out)


@pytest.mark.parametrize("subject", sorted(BAD_CASES))
def test_bad_scan_message_names_file_and_problem(broken, subject):
    r, out = broken["run"], broken["out"]
    says(r, f"sub-{subject}_T1w.nii.gz", BAD_CASES[subject])
    assert not list((out / f"sub-{subject}").rglob("*.nii.gz"))
    rec = json.loads(next((out / f"sub-{subject}").rglob("*_scores.json")).read_text())
    assert rec["status"] == "failed" and BAD_CASES[subject] in rec["error"]


def test_participant_without_t1w_alone_is_empty_selection(broken, tmp_path):
    r = cli(broken["bids"], tmp_path / "out", "participant", "--model", broken["bundle"],
            "--participant-label", "h04", "-w", tmp_path / "w", bids=broken["bids"])
    assert r.returncode == 18, r.stdout + r.stderr
    says(r, "no T1w image", "h04")
    assert_no_partial_outputs(tmp_path / "out")


def test_participant_without_t1w_in_mixed_selection(broken, tmp_path):
    """h04 (no T1w) selected with t01: t01 finishes (cached), h04 is reported, exit 66."""
    out = tmp_path / "out"
    r = cli(broken["bids"], out, "participant", "--model", broken["bundle"],
            "--participant-label", "t01", "h04", "-w", broken["work"], "--nprocs", "2",
            bids=broken["bids"])
    assert r.returncode == 66, r.stdout + r.stderr
    says(r, "sub-h04", "no T1w image")
    assert (out / STATMAP.format(s="t01")).exists()
    assert not list((out / "sub-h04").rglob("*.nii.gz"))
    assert_no_partial_outputs(out)


def test_two_t1w_for_one_scan_key_fails_that_scan_only(broken):
    """xdup has sub-xdup_T1w.nii and .nii.gz: that scan fails naming both, the others run.

    (The input tree is checked unchanged by ``cli``; exit 65 and t01/p01 finishing are
    asserted for the whole run above, here again for this case.)
    """
    r, out, bids = broken["run"], broken["out"], broken["bids"]
    assert r.returncode == 65, r.stdout + r.stderr
    files = [bids / "sub-xdup/anat/sub-xdup_T1w.nii", bids / SCAN.format(s="xdup")]
    says(r, "more than one T1w image matches sub-xdup", f"{files[0]}, {files[1]}",
         "--bids-filter-file")
    rec = json.loads((out / "sub-xdup/anat/sub-xdup_desc-anomaly_scores.json").read_text())
    assert rec["status"] == "failed"
    assert all(str(f) in rec["error"] for f in files), rec["error"]
    assert not list((out / "sub-xdup").rglob("*.nii.gz"))
    for s in ("t01", "p01"):
        assert (out / STATMAP.format(s=s)).exists(), s


def test_empty_dataset(base, tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(base["bids"] / "dataset_description.json", bids)
    r = cli(bids, tmp_path / "out", "participant", "--model", base["bundle"],
            "-w", tmp_path / "w", bids=bids)
    assert r.returncode == 18, r.stdout + r.stderr
    says(r, "no participants", str(bids))


def test_missing_participants_tsv_with_healthy_filter(base, tmp_path):
    bids = copy_bids(base, tmp_path / "bids")
    (bids / "participants.tsv").unlink()
    r = cli("train", bids, tmp_path / "out", "--healthy-filter", "split=train",
            "--model-type", "zscore", "-w", tmp_path / "w", bids=bids)
    assert r.returncode == 66, r.stdout + r.stderr
    says(r, "participants.tsv", "does not exist")
    assert not (tmp_path / "out" / "models").exists()


def test_malformed_participants_tsv(base, tmp_path):
    bids = copy_bids(base, tmp_path / "bids")
    tsv = bids / "participants.tsv"
    tsv.write_text(tsv.read_text().replace("participant_id", "subject"))
    r = cli("train", bids, tmp_path / "out", "--healthy-filter", "split=train",
            "--model-type", "zscore", "-w", tmp_path / "w", bids=bids)
    assert r.returncode == 65, r.stdout + r.stderr
    says(r, "participants.tsv", "no participant_id column")


def test_output_dir_that_cannot_be_created(base, tmp_path):
    """Root ignores mode bits, so the unwritable OUTPUT_DIR is a path below a regular file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli(base["bids"], blocker / "out", "participant", "--model", base["bundle"],
            "-w", tmp_path / "w", bids=base["bids"])
    assert r.returncode == 73, r.stdout + r.stderr
    says(r, str(blocker / "out"))


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_full_output_disk(broken, tmp_path):
    """A 200 kB tmpfs as OUTPUT_DIR: the run fails cleanly, naming the file; nothing partial."""
    mnt = tmp_path / "full"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        r = cli(broken["bids"], mnt, "participant", "--model",
                broken["bundle"],
                "--participant-label", "t01", "-w", broken["work"], "--nprocs", "2",
                bids=broken["bids"])
        assert r.returncode == 73, r.stdout + r.stderr
        says(r, "t01")
        assert re.search(r"No space left on device|disk is full|ENOSPC", r.stdout + r.stderr), \
            r.stdout + r.stderr
        assert_no_partial_outputs(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _bundle_copy(base, tmp_path) -> Path:
    dest = tmp_path / "zscore"
    shutil.copytree(base["bundle"], dest)
    return dest


def _score_with(bundle: Path, base, tmp_path):
    return cli(base["bids"], tmp_path / "out", "participant", "--model", bundle,
               "--participant-label", "t01", "-w", tmp_path / "w", bids=base["bids"])


def test_bundle_wrong_checksum(base, tmp_path):
    b = _bundle_copy(base, tmp_path)
    w = b / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    r = _score_with(b, base, tmp_path)
    assert r.returncode == 65, r.stdout + r.stderr
    says(r, "checksum of weights.safetensors does not match")


def test_bundle_missing_weights(base, tmp_path):
    b = _bundle_copy(base, tmp_path)
    (b / "weights.safetensors").unlink()
    r = _score_with(b, base, tmp_path)
    assert r.returncode == 65, r.stdout + r.stderr
    says(r, "weights.safetensors is missing")


def test_bundle_wrong_contrasts(base, tmp_path):
    b = _bundle_copy(base, tmp_path)
    card = json.loads((b / "model.json").read_text())
    card["contrasts"] = ["T1w", "FLAIR"]
    (b / "model.json").write_text(json.dumps(card))
    r = _score_with(b, base, tmp_path)
    assert r.returncode == 65, r.stdout + r.stderr
    says(r, str(b), "contrasts ['T1w', 'FLAIR']")
    assert not (tmp_path / "out" / "sub-t01").exists()


def test_gzip_of_garbage(base, tmp_path):
    """A valid gzip stream holding random bytes (not a NIfTI header) is a data error too."""
    bids = copy_bids(base, tmp_path / "bids")
    with gzip.open(bids / SCAN.format(s="t02"), "wb") as fh:
        fh.write(os.urandom(4096))
    r = cli(bids, tmp_path / "out", "participant", "--model", base["bundle"],
            "--participant-label", "t02", "-w", tmp_path / "w", bids=bids)
    assert r.returncode == 65, r.stdout + r.stderr
    says(r, "sub-t02_T1w.nii.gz", "not a readable NIfTI image")
    assert_no_partial_outputs(tmp_path / "out")
