"""Native- against template-space oracle Dice of one scan (a check the end-to-end test runs).
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nb
import numpy as np

from ..core.errors import DataError, MissingInputError
from ..core.naming import ScanKey, ScanOutputs
from .metrics import oracle_dice
from .outputs import as_array, check_grid, find_lesion_mask, load_image, parse_entities, shape3

# --------------------------------------------------------------------------- space agreement


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _regrid(
    affine: np.ndarray, voxel_mm: float, stat: np.ndarray, label: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Statmap, label and brain mask linearly resampled to ``voxel_mm`` (same axes, centre).

    Voxels whose interpolation touched a non-finite statmap value become NaN; label and
    mask are thresholded at 0.5.
    """
    from nibabel.processing import resample_from_to

    shape = np.array(stat.shape)
    factor = voxel_mm / _zooms(affine)
    new_shape = tuple(int(n) for n in np.ceil(shape / factor))
    new_aff = np.array(affine, dtype=float)
    new_aff[:3, :3] = new_aff[:3, :3] * factor
    centre = affine @ np.r_[(shape - 1) / 2.0, 1.0]
    new_aff[:3, 3] += (centre - new_aff @ np.r_[(np.array(new_shape) - 1) / 2.0, 1.0])[:3]

    def rs(data: np.ndarray) -> np.ndarray:
        img = nb.Nifti1Image(np.asarray(data, np.float32), affine)
        return np.asarray(resample_from_to(img, (new_shape, new_aff), order=1, cval=0.0).dataobj)

    finite = np.isfinite(stat)
    new_stat = rs(np.where(finite, stat, 0.0)).astype(np.float32)
    new_stat[rs(finite) < 0.999] = np.nan
    return new_stat, rs(label) > 0.5, rs(brain) > 0.5


def native_template_agreement(
    output_dir: Path, labels_dir: Path, key: ScanKey, work_dir: Path | None = None,
    voxel_mm: float | None = None,
) -> dict[str, float]:
    """Oracle Dice of one scan's anomaly map in native space and in template space.

    Native: the native statmap against the native lesion mask inside the native brain mask.
    Template: the ``space-<template>`` statmap against the lesion mask brought into template
    space with the saved forward transform (the ``_xfm.mat`` plus, for SyN, its warp;
    linear interpolation thresholded at 0.5), inside the template-space brain mask.
    If the native maps are where the input is, both Dice agree up to resampling.

    The native statmap is the template statmap linearly resampled onto the native grid; on a
    coarser grid that is a low-pass filter, which raises the oracle Dice of a noisy map (a
    z-score map on 3 mm input: 0.75 in template space, 0.82 native, for a correctly placed
    map). So the template side is evaluated at ``voxel_mm`` (default: the native voxel size
    when it is coarser than the template's): statmap, label and brain mask are linearly
    resampled onto a template-aligned grid of that spacing (same centre).
    Returns ``native_oracle_dice``, ``template_oracle_dice``, ``difference``
    (template - native), ``template_voxel_mm`` and the lesion volume (mL) in each space.
    """
    import tempfile

    from ..core.templates import load_template
    from ..preprocessing.registration import to_template, warp_paths

    output_dir, labels_dir = Path(output_dir), Path(labels_dir)
    lesion_path = find_lesion_mask(labels_dir, key)
    if lesion_path is None:
        raise MissingInputError(f"{labels_dir}: no lesion mask for {key.scan_id}")
    matches = sorted((output_dir / key.subdir).glob(
        f"{key.scan_id}_space-*_res-*_stat-anomaly_statmap.nii.gz"))
    if not matches:
        raise MissingInputError(f"{output_dir / key.subdir}: no template-space statmap for "
                                f"{key.scan_id}")
    res = int(parse_entities(matches[0].name.split("_stat-")[0])["res"])
    outs = ScanOutputs(key, res=res)
    paths = {name: output_dir / rel for name, rel in (
        ("stat", outs.native_statmap), ("brain", outs.native_brain_mask),
        ("tstat", outs.template_statmap), ("tbrain", outs.template_brain_mask),
        ("xfm", outs.xfm))}
    for path in paths.values():
        if not path.exists():
            raise MissingInputError(f"{path}: not found")
    out: dict[str, float] = {}

    stat_img, brain_img = load_image(paths["stat"]), load_image(paths["brain"])
    lesion_img = load_image(lesion_path)
    check_grid(stat_img, paths["stat"], lesion_img, lesion_path)
    check_grid(stat_img, paths["stat"], brain_img, paths["brain"])
    shape = shape3(stat_img, paths["stat"])
    stat = as_array(stat_img, shape, np.float32)
    lesion = np.nan_to_num(as_array(lesion_img, shape, np.float32)) > 0
    region = (as_array(brain_img, shape, np.float32) > 0) & np.isfinite(stat)
    out["native_oracle_dice"] = oracle_dice(stat[region], lesion[region])[0]
    vox_ml = float(abs(np.linalg.det(stat_img.affine[:3, :3]))) / 1000.0
    out["native_lesion_ml"] = float(np.count_nonzero(lesion)) * vox_ml

    template = load_template(res)
    tstat_img, tbrain_img = load_image(paths["tstat"]), load_image(paths["tbrain"])
    check_grid(tstat_img, paths["tstat"], tbrain_img, paths["tbrain"])
    tshape = shape3(tstat_img, paths["tstat"])
    if tshape != template.shape:
        raise DataError(f"{paths['tstat']}: shape {tshape} is not the {res} mm template grid")
    warp = warp_paths(paths["xfm"])[0]
    transforms = [str(warp), str(paths["xfm"])] if warp.exists() else [str(paths["xfm"])]
    lesion_f = nb.Nifti1Image(lesion.astype(np.float32), lesion_img.affine)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ba-agreement-") as tmp:
        tlesion_f = to_template(lesion_f, template, transforms, Path(tmp),
                                interpolation="linear")
    tlesion = tlesion_f > 0.5
    tstat = as_array(tstat_img, tshape, np.float32)
    tbrain = as_array(tbrain_img, tshape, np.float32) > 0
    tvox_ml = float(abs(np.linalg.det(tstat_img.affine[:3, :3]))) / 1000.0
    out["template_lesion_ml"] = float(np.count_nonzero(tlesion)) * tvox_ml
    native_mm = float(max(_zooms(stat_img.affine)))
    t_mm = float(max(_zooms(tstat_img.affine)))
    out["template_voxel_mm"] = target = max(t_mm, native_mm) if voxel_mm is None else voxel_mm
    if not math.isclose(target, t_mm, rel_tol=1e-3):
        # The soft (interpolated) label is thresholded once, after the second resampling.
        tstat, tlesion, tbrain = _regrid(tstat_img.affine, target, tstat, tlesion_f, tbrain)
    tregion = tbrain & np.isfinite(tstat)
    out["template_oracle_dice"] = oracle_dice(tstat[tregion], tlesion[tregion])[0]
    out["difference"] = out["template_oracle_dice"] - out["native_oracle_dice"]
    return out
