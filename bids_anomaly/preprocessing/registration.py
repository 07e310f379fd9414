"""Registration to the template with antspyx, and the mappings both ways."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np

from ..templates import Template

TRANSFORMS = {"affine": "Affine", "rigid": "Rigid", "syn": "SyN"}


def _set_threads(threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, threads))


def _ants_image(img: nb.Nifti1Image, tmp_dir: Path, name: str):
    import ants

    path = tmp_dir / f"{name}.nii.gz"
    nb.save(img, path)
    return ants.image_read(str(path))


def register_to_template(
    moving: nb.Nifti1Image,
    template: Template,
    xfm_out: Path,
    work: Path,
    kind: str = "affine",
    seed: int = 0,
    threads: int = 1,
) -> list[str]:
    """Register a brain image to the template brain; copy the forward transform to ``xfm_out``.

    Returns the ANTs transform list that maps template-space points into the moving image
    (what ``ants.apply_transforms`` needs to resample the moving image onto the template).
    """
    import ants

    _set_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    fixed = _ants_image(template.image(template.t1), work, "template")
    mov = _ants_image(moving, work, "moving")
    reg = ants.registration(
        fixed=fixed,
        moving=mov,
        type_of_transform=TRANSFORMS[kind],
        random_seed=seed,
        outprefix=str(work / "reg_"),
    )
    fwd = list(reg["fwdtransforms"])
    affine = [t for t in fwd if t.endswith(".mat")]
    shutil.copyfile(affine[0], xfm_out)
    if kind == "syn":
        warp = [t for t in fwd if t.endswith(".nii.gz") and "Inverse" not in t][0]
        shutil.copyfile(warp, Path(str(xfm_out).replace(".mat", "_warp.nii.gz")))
    return fwd


def to_template(
    img: nb.Nifti1Image, template: Template, transforms: list[str], work: Path,
    interpolation: str = "linear", threads: int = 1,
) -> np.ndarray:
    """Resample a native image onto the template grid."""
    import ants

    _set_threads(threads)
    fixed = _ants_image(template.image(template.t1), work, "template_ref")
    mov = _ants_image(img, work, "to_template_in")
    out = ants.apply_transforms(fixed, mov, transformlist=transforms, interpolator=interpolation)
    return out.numpy().astype(np.float32)


def to_native(
    data: np.ndarray, template: Template, native_ref: nb.Nifti1Image, xfm: Path, work: Path,
    interpolation: str = "linear", threads: int = 1,
) -> np.ndarray:
    """Bring a template-space map back onto the participant's native grid (inverse affine)."""
    import ants

    _set_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    fixed = _ants_image(native_ref, work, "native_ref")
    mov = _ants_image(template.image(data), work, "to_native_in")
    out = ants.apply_transforms(
        fixed, mov, transformlist=[str(xfm)], whichtoinvert=[True], interpolator=interpolation
    )
    return out.numpy().astype(np.float32)
