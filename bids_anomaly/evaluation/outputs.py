"""What ``evaluate`` reads: the scans of an OUTPUT_DIR, their maps and sidecars, lesion masks,
and the region where each map is defined (template-space eroded mask, else native brain).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
import pandas as pd

from ..core.errors import DataError
from ..core.naming import ScanKey, ScanOutputs, build_name
from .metrics import defined_region, fpr_key, negatives

LOG = logging.getLogger("bids_anomaly.evaluation")

GROUP_TABLE = "group_anomaly.tsv"
AFFINE_TOL = 1e-3
_NA = {"", "n/a", "nan", "NaN", "None"}
_ENTITY_FIELDS = {"sub": "subject", "ses": "session", "run": "run", "acq": "acquisition"}


# --------------------------------------------------------------------------- discovery


def parse_entities(stem: str) -> dict[str, str] | None:
    ents: dict[str, str] = {}
    for part in stem.split("_"):
        if "-" not in part:
            return None
        k, v = part.split("-", 1)
        ents[k] = v
    return ents


def _key_from_entities(ents: dict[str, str]) -> ScanKey | None:
    if "sub" not in ents or set(ents) - set(_ENTITY_FIELDS):
        return None
    return ScanKey(**{_ENTITY_FIELDS[k]: v for k, v in ents.items()})


def _na(value: Any) -> str | None:
    text = str(value).strip()
    return None if text in _NA else text


def _strip(value: str | None, prefix: str) -> str | None:
    if value is None:
        return None
    return value[len(prefix):] if value.startswith(prefix) else value


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def scans_from_table(table: Path) -> list[tuple[ScanKey, float]]:
    try:
        df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{table}: cannot read the group table ({exc})") from exc
    if "participant_id" not in df.columns and "scan_id" not in df.columns:
        raise DataError(f"{table}: needs a participant_id or scan_id column")
    if "status" in df.columns:
        df = df[df["status"].str.strip().str.lower() == "ok"]
    scans = []
    for _, row in df.iterrows():
        key = None
        scan_id = _na(row.get("scan_id", ""))
        if scan_id:
            ents = parse_entities(scan_id)
            key = _key_from_entities(ents) if ents else None
        if key is None:
            subject = _strip(_na(row.get("participant_id", "")), "sub-")
            if not subject:
                raise DataError(f"{table}: row without participant_id or a parsable scan_id")
            key = ScanKey(subject, _strip(_na(row.get("session_id", "")), "ses-"),
                          _strip(_na(row.get("run", "")), "run-"))
        scans.append((key, to_float(row.get("score", math.nan))))
    return scans


def scans_from_glob(output_dir: Path) -> list[tuple[ScanKey, float]]:
    suffix = "_stat-anomaly_statmap.nii.gz"
    scans = []
    for path in sorted(output_dir.glob(f"sub-*/**/anat/*{suffix}")):
        ents = parse_entities(path.name[: -len(suffix)])
        key = _key_from_entities(ents) if ents else None  # skips space-/res- (template) maps
        if key is None or ScanOutputs(key).native_statmap != path.relative_to(output_dir):
            continue
        scans.append((key, _score_from_record(output_dir / ScanOutputs(key).scores)))
    return scans


def _score_from_record(path: Path) -> float:
    """The ``score`` of a per-scan scores JSON, NaN if there is none."""
    try:
        return to_float(json.loads(path.read_text(encoding="utf-8")).get("score"))
    except (OSError, ValueError, AttributeError):
        return math.nan


def find_lesion_mask(labels_dir: Path, key: ScanKey) -> Path | None:
    """The lesion mask of ``key``; falls back to a name with only sub/ses entities."""
    candidates = [key, ScanKey(key.subject, key.session)]
    for k in candidates:
        path = labels_dir / k.subdir / build_name(k, "mask", label="lesion")
        if path.exists():
            return path
    return None


# --------------------------------------------------------------------------- loading


def load_image(path: Path) -> nb.Nifti1Image:
    try:
        return nb.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot read NIfTI image ({exc})") from exc


def shape3(img: nb.Nifti1Image, path: Path) -> tuple[int, ...]:
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D image, got shape {img.shape}")
    return shape


def check_grid(ref: nb.Nifti1Image, ref_path: Path, img: nb.Nifti1Image, path: Path) -> None:
    s_ref, s_img = shape3(ref, ref_path), shape3(img, path)
    if s_ref != s_img or not np.allclose(ref.affine, img.affine, atol=AFFINE_TOL, rtol=0):
        raise DataError(
            f"grid mismatch between {ref_path} (shape {s_ref}) and {path} (shape {s_img}): "
            f"shape and affine must agree within {AFFINE_TOL}"
        )


def as_array(img: nb.Nifti1Image, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype).reshape(shape)


def read_sidecar(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON sidecar ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: JSON sidecar is not an object")
    return meta


def read_thresholds(meta: dict, path: Path) -> dict[str, float] | None:
    raw = meta.get("Thresholds")
    if raw is None:
        return None
    try:
        return {fpr_key(k): float(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: Thresholds must map FPR to a number ({exc})") from exc


# --------------------------------------------------------------------------- defined region

FALLBACK_REGION = "native brain mask (no template-space brain mask or transform)"


def scoring_erosion(output_dir: Path, key: ScanKey, cache: dict[str, int]) -> int:
    """The ``erosion`` of the bundle that scored ``key`` (its scores record names the bundle
    folder), else the scoring default."""
    from ..calibration.types import ScoringParams

    try:
        record = json.loads((output_dir / ScanOutputs(key).scores).read_text(encoding="utf-8"))
        bundle = Path(str(record["model"]["path"]))
    except (OSError, ValueError, KeyError, TypeError):
        return ScoringParams().erosion
    if str(bundle) not in cache:
        try:
            card = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
            cache[str(bundle)] = int(card["calibration"]["params"]["erosion"])
        except (OSError, ValueError, KeyError, TypeError):
            LOG.warning("%s: cannot read the scoring erosion of bundle %s; assuming %d voxels",
                        key.scan_id, bundle, ScoringParams().erosion)
            cache[str(bundle)] = ScoringParams().erosion
    return cache[str(bundle)]


def template_outputs(output_dir: Path, key: ScanKey) -> ScanOutputs | None:
    """The scan's outputs at the resolution of its template-space statmap (None without)."""
    matches = sorted((output_dir / key.subdir).glob(
        f"{key.scan_id}_space-*_res-*_stat-anomaly_statmap.nii.gz"))
    if not matches:
        return None
    ents = parse_entities(matches[0].name.split("_stat-")[0]) or {}
    try:
        return ScanOutputs(key, res=int(ents["res"]))
    except (KeyError, ValueError):
        return None


def native_defined_region(
    output_dir: Path, outs: ScanOutputs | None, erosion: int, stat_img: nb.Nifti1Image,
    shape: tuple[int, ...], work: Path,
) -> np.ndarray | None:
    """Native voxels whose statmap value is interpolated from defined template voxels only
    (None when OUTPUT_DIR lacks the template-space brain mask or the transform)."""
    from ..core.templates import load_template
    from ..preprocessing.registration import to_native

    if outs is None:
        return None
    tbrain_path, xfm = output_dir / outs.template_brain_mask, output_dir / outs.xfm
    if not (tbrain_path.exists() and xfm.exists()):
        return None
    template = load_template(outs.res)
    tbrain_img = load_image(tbrain_path)
    if shape3(tbrain_img, tbrain_path) != template.shape:
        raise DataError(f"{tbrain_path}: shape {tbrain_img.shape} is not the {outs.res} mm "
                        "template grid")
    tbrain = as_array(tbrain_img, template.shape, np.float32) > 0
    defined = defined_region(tbrain, erosion).astype(np.float32)
    ref = nb.Nifti1Image(np.zeros(shape, np.float32), stat_img.affine)
    native = to_native(defined, template, ref, xfm, work / "to_native")
    return np.asarray(native).reshape(shape) >= 0.999


def template_negatives(
    output_dir: Path, outs: ScanOutputs | None, erosion: int, thresholds: dict[str, float]
) -> dict[str, float] | None:
    """(FP, TN) per FPR of a healthy scan's template statmap over the eroded template brain
    (the calibration set); None without the template-space outputs."""
    if outs is None:
        return None
    tstat_path = output_dir / outs.template_statmap
    tbrain_path = output_dir / outs.template_brain_mask
    if not (tstat_path.exists() and tbrain_path.exists()):
        return None
    tstat_img, tbrain_img = load_image(tstat_path), load_image(tbrain_path)
    check_grid(tstat_img, tstat_path, tbrain_img, tbrain_path)
    tshape = shape3(tstat_img, tstat_path)
    tstat = as_array(tstat_img, tshape, np.float32)
    region = defined_region(as_array(tbrain_img, tshape, np.float32) > 0, erosion)
    region &= np.isfinite(tstat)
    s = tstat[region]
    no_lesion = np.zeros(s.shape, bool)
    return {fpr: negatives(s, no_lesion, t) for fpr, t in thresholds.items()}
