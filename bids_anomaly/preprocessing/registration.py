"""Registration to the template with antspyx, and the mappings both ways."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np

from ..core.templates import Template

TRANSFORMS = {"affine": "Affine", "affine-coarse": "Affine", "rigid": "Rigid", "syn": "SyN"}
# antspyx's own settings but for ``affine-coarse``, which stops before the full-resolution
# level (antspyx: 2100x1200x1200x10 over shrink factors 6x4x2x1). Those last ten iterations
# cost most of the registration: on one IXI, one BraTS and one synthetic 4 mm scan, 9.3 / 19.0 /
# 8.2 s against 4.0 / 11.0 / 2.9 s single-threaded, and the template-brain points the two
# affines map differ by 0.58 / 0.66 / 0.62 mm RMS (max 1.6 mm) at the 2 mm template.
EXTRA = {"affine-coarse": {"aff_iterations": (2100, 1200, 1200, 0)}}


def _single_threaded() -> None:
    """Run ANTs on one thread: only then is a registration repeatable.

    Measured on an IXI T1w: with 2 ITK threads (either ITK threader, seed fixed) two runs gave
    two different affines; single-threaded they are byte-identical. ITK reads this variable
    once, at a process's first ANTs call, so every ANTs call here sets the same value; the
    node's other threads go to deepbet (torch) and N4 (SimpleITK), which are repeatable."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"


def _set_seed(seed: int) -> None:
    """Make antsRegistration's metric sampling repeatable.

    antspyx 0.6 ignores ``registration(random_seed=...)``: it passes ``--random-seed`` only
    from ``ants.config._random_seed``; otherwise ANTs reads ``ANTS_RANDOM_SEED`` and, when that
    is unset or 0, seeds from the clock, so two runs of one scan gave different transforms.
    ANTs treats 0 as "random", hence the shift by one.
    """
    value = int(seed) % (2**31 - 1) + 1
    os.environ["ANTS_RANDOM_SEED"] = str(value)
    try:
        import ants.config as ants_config

        if hasattr(ants_config, "_random_seed"):
            ants_config._random_seed = value
    except ImportError:
        pass


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
) -> list[str]:
    """Register a brain image to the template brain; copy the transforms beside ``xfm_out``.

    ``xfm_out`` receives the affine (ITK .mat); with ``kind='syn'`` the forward and inverse
    warps go to :func:`warp_paths` of it. Returns the ANTs transform list that resamples the
    moving image onto the template (what ``ants.apply_transforms`` needs).
    """
    import ants

    _single_threaded()
    _set_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    fixed = _ants_image(template.image(template.t1), work, "template")
    mov = _ants_image(moving, work, "moving")
    reg = ants.registration(
        fixed=fixed,
        moving=mov,
        type_of_transform=TRANSFORMS[kind],
        random_seed=seed,
        outprefix=str(work / "reg_"),
        **EXTRA.get(kind, {}),
    )
    fwd = list(reg["fwdtransforms"])
    shutil.copyfile([t for t in fwd if t.endswith(".mat")][0], xfm_out)
    if kind == "syn":
        warp, inverse = warp_paths(xfm_out)
        shutil.copyfile([t for t in fwd if t.endswith(".nii.gz")][0], warp)
        shutil.copyfile([t for t in reg["invtransforms"] if t.endswith(".nii.gz")][0], inverse)
    return fwd


def warp_paths(xfm: Path | str) -> tuple[Path, Path]:
    """Where the forward and inverse SyN warps of an affine ``xfm`` live."""
    base = str(xfm)[: -len(".mat")]
    return Path(base + "_warp.nii.gz"), Path(base + "_inversewarp.nii.gz")


def to_template(
    img: nb.Nifti1Image, template: Template, transforms: list[str], work: Path,
    interpolation: str = "linear",
) -> np.ndarray:
    """Resample a native image onto the template grid."""
    import ants

    _single_threaded()
    fixed = _ants_image(template.image(template.t1), work, "template_ref")
    mov = _ants_image(img, work, "to_template_in")
    out = ants.apply_transforms(fixed, mov, transformlist=transforms, interpolator=interpolation)
    return out.numpy().astype(np.float32)


def to_native(
    data: np.ndarray, template: Template, native_ref: nb.Nifti1Image, xfm: Path, work: Path,
    interpolation: str = "linear",
) -> np.ndarray:
    """Bring a template-space map back onto the participant's native grid.

    Inverts the affine, and applies the inverse SyN warp when registration made one.
    """
    import ants

    _single_threaded()
    work.mkdir(parents=True, exist_ok=True)
    fixed = _ants_image(native_ref, work, "native_ref")
    mov = _ants_image(template.image(data), work, "to_native_in")
    transforms, invert = [str(xfm)], [True]
    inverse = warp_paths(xfm)[1]
    if inverse.exists():
        transforms.append(str(inverse))
        invert.append(False)
    out = ants.apply_transforms(
        fixed, mov, transformlist=transforms, whichtoinvert=invert, interpolator=interpolation
    )
    return out.numpy().astype(np.float32)
