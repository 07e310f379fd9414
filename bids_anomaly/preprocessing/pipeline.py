"""Preprocessing of one scan: checks, brain mask, N4, registration, normalisation.

A plain function so tests and benchmarks call it directly; the nipype interface wraps it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from ..core.config import PreprocConfig
from ..core.templates import load_template
from .bias import n4_correct
from .brain_mask import deepbet_mask, skull_stripped_mask
from .checks import check_brain, load_checked
from .normalise import normalise_intensity
from .registration import register_to_template, to_template


@dataclass
class PreprocResult:
    """Files written by :func:`preprocess_scan` (all inside its output folder)."""

    native_ref: str
    native_brain_mask: str
    xfm: str
    template_brain_mask: str
    template_images: dict[str, str]
    brain_extraction: str
    brain_volume_ml: float
    timings: dict[str, float] = field(default_factory=dict)
    # bias.py: "simpleitk" unless BIDS_ANOMALY_N4_BACKEND chose antspyx; "none" without N4.
    # A preproc.json written before this field existed was SimpleITK's.
    n4_backend: str = "simpleitk"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> PreprocResult:
        return cls(**json.loads(Path(path).read_text()))


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> str:
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nb.save(img, path)
    return str(path)


def brain_mask_for(img: nb.Nifti1Image, method: str, device: str = "cpu") -> tuple[np.ndarray, str]:
    """Brain mask on the native grid and the method actually used."""
    if method in ("auto", "none"):
        stripped = skull_stripped_mask(img)
        if stripped is not None:
            return stripped, "already-stripped"
        if method == "none":
            data = np.asarray(img.dataobj)
            return data > np.percentile(data, 50), "none"
    if method in ("auto", "deepbet"):
        return deepbet_mask(img, device=device), "deepbet"
    raise ValueError(f"unknown brain extraction method '{method}'")


def preprocess_scan(
    files: dict[str, str],
    out_dir: Path,
    config: PreprocConfig = PreprocConfig(),
    threads: int = 1,
    seed: int = 0,
    device: str = "cpu",
    n4_backend: str = "simpleitk",
) -> PreprocResult:
    """Preprocess one scan into ``out_dir``; ``files`` maps contrast → path, T1w required.

    ``n4_backend``: ``simpleitk`` (the product's N4) or ``antspyx`` (bias.py)."""
    import torch

    # The node's cores go to deepbet (torch). N4 and ANTs run on one: N4's result changes
    # with its thread count (and 2 threads were no faster on a 1 mm T1w), and ANTs is
    # repeatable only single-threaded (registration.py), so a scan preprocessed alone is
    # preprocessed as it is in a batch.
    torch.set_num_threads(max(1, threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "tmp"
    work.mkdir(exist_ok=True)
    template = load_template(config.resolution)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    t1 = load_checked(files["T1w"])
    affine = t1.affine
    data = np.asarray(t1.dataobj, dtype=np.float32)
    native_ref = _save(data, affine, out_dir / "native_ref.nii.gz")
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    mask, method = brain_mask_for(t1, config.brain_extraction, device=device)
    zooms = t1.header.get_zooms()[:3]
    check_brain(mask, zooms, files["T1w"], data=data)  # a brain, and in the image
    native_mask = _save(mask, affine, out_dir / "native_brain_mask.nii.gz", np.uint8)
    timings["brain_mask"] = time.perf_counter() - t

    t = time.perf_counter()
    if config.n4:
        data = n4_correct(data, mask, zooms, shrink=config.n4_shrink, threads=1,
                          backend=n4_backend)
    timings["n4"] = time.perf_counter() - t

    t = time.perf_counter()
    brain = normalise_intensity(data, mask)
    brain_img = nb.Nifti1Image(brain, affine)
    xfm = out_dir / "xfm.mat"
    fwd = register_to_template(
        brain_img, template, xfm, work, kind=config.registration, seed=seed
    )
    timings["registration"] = time.perf_counter() - t

    t = time.perf_counter()
    tmask = to_template(nb.Nifti1Image(mask.astype(np.float32), affine), template, fwd,
                        work) > 0.5
    tmpl_mask = _save(tmask, template.affine, out_dir / "template_brain_mask.nii.gz", np.uint8)
    images = {}
    for contrast, path in files.items():
        if contrast == "T1w":
            moving, transforms = nb.Nifti1Image(data, affine), fwd
        else:
            moving, transforms = _contrast_to_t1(path, t1, mask, fwd, work, seed)
        warped = to_template(moving, template, transforms, work)
        norm = normalise_intensity(warped, tmask)
        images[contrast] = _save(norm, template.affine, out_dir / f"template_{contrast}.nii.gz")
    timings["resample_normalise"] = time.perf_counter() - t

    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    result = PreprocResult(
        native_ref=native_ref,
        native_brain_mask=native_mask,
        xfm=str(xfm),
        template_brain_mask=tmpl_mask,
        template_images=images,
        brain_extraction=method,
        brain_volume_ml=float(mask.sum() * np.prod(zooms) / 1000.0),
        timings=timings,
        n4_backend=n4_backend if config.n4 else "none",
    )
    result.save(out_dir / "preproc.json")
    return result


def _contrast_to_t1(path, t1, mask, fwd, work, seed):
    """Rigidly align an extra contrast to the T1w; return it and its transform chain."""
    import ants

    from .registration import _ants_image, _single_threaded

    img = load_checked(path)
    _single_threaded()
    fixed = _ants_image(nb.Nifti1Image(np.asarray(t1.dataobj) * mask, t1.affine), work, "t1ref")
    mov = _ants_image(img, work, "contrast")
    reg = ants.registration(fixed=fixed, moving=mov, type_of_transform="Rigid", random_seed=seed,
                            outprefix=str(work / "c2t1_"))
    return img, list(fwd) + list(reg["fwdtransforms"])


def load_volume(result: PreprocResult, contrasts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) template-space volume and its brain mask from a preprocessing result."""
    chans = [np.asarray(nb.load(result.template_images[c]).dataobj, np.float32) for c in contrasts]
    mask = np.asarray(nb.load(result.template_brain_mask).dataobj) > 0
    return np.stack(chans), mask
