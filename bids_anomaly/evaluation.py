"""Evaluate anomaly maps against manual lesion masks (voxel- and scan-level metrics).

Compares the native-space statmaps that the participant level wrote into one or more
OUTPUT_DIRs (one model each) with a labels derivative dataset holding
``sub-X[_ses-Y]_label-lesion_mask.nii.gz`` files on the raw T1w grid. An empty lesion mask
marks a healthy scan. Conventions:

* the oracle threshold ``t`` flags voxels with ``score >= t`` (it is one of the scores);
* a calibrated threshold ``t`` (sidecar ``Thresholds``) flags voxels with ``score > t``.

Where the map is defined. Scoring computes the statmap only inside the template-space brain
mask eroded by the bundle's ``erosion`` (``scoring.postprocess``) and writes 0 elsewhere, and
the thresholds are quantiles of healthy statmaps over exactly that set. An observed false-positive
rate counted over the whole brain mask therefore counts the eroded rim, where no voxel can ever
exceed a positive threshold, as true negatives: a diluted FPR. Observed FPRs are counted only
where the map is defined:

* template space (``fpr_template_fpr<fpr>``, healthy scans): the scan's template-space brain
  mask (the one scoring used; it is in OUTPUT_DIR) eroded exactly as scoring erodes it. This is
  the set and the space the thresholds were calibrated on, so it is the calibration check.
* native space (``fpr_observed_fpr<fpr>``): the native statmap is the template statmap
  linearly resampled; a native voxel is defined when its interpolation touches defined template
  voxels only: that eroded mask brought to the native grid with the same transform and
  interpolation (``to_native``) is >= 0.999 there. Outputs without the template-space brain
  mask or the transform fall back to the native brain mask (``fpr_region`` says which).

A "non-zero statmap" is no substitute: z is 0 wherever the anomaly equals the healthy mean.
The erosion is read from the bundle named in the scan's scores record (``model.path``), else
the scoring default.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from .atomic import write_json, write_text
from .errors import DataError, EmptySelectionError, MissingInputError
from .naming import ScanKey, ScanOutputs, build_name, sidecar

LOG = logging.getLogger(__name__)

#: Pooled voxel metrics use a deterministic random subsample above this many voxels.
MAX_POOLED_VOXELS = 5_000_000
GROUP_TABLE = "group_anomaly.tsv"
AFFINE_TOL = 1e-3
_NA = {"", "n/a", "nan", "NaN", "None"}
_ENTITY_FIELDS = {"sub": "subject", "ses": "session", "run": "run", "acq": "acquisition"}


def _fpr_key(fpr: str | float) -> str:
    """Canonical text of a false-positive rate ("0.010" -> "0.01")."""
    return format(float(fpr), "g")


def _dice(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if tp + fn > 0 and denom > 0 else math.nan


def _counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) for the prediction ``scores > threshold``."""
    pred = scores > threshold
    tp = int(np.count_nonzero(pred & labels))
    fp = int(np.count_nonzero(pred)) - tp
    pos = int(np.count_nonzero(labels))
    return tp, fp, pos - tp, labels.size - pos - fp


def _oracle_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice over all thresholds ``score >= t`` and that ``t``, from one sort."""
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or scores.size == 0:
        return math.nan, math.nan
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(labels[order], dtype=np.int64)
    # Only the last index of each run of tied scores is a reachable threshold.
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    dice = 2.0 * tp[ends] / (ends + 1 + n_pos)  # predicted positives = index + 1
    best = int(np.argmax(dice))
    return float(dice[best]), float(s[ends[best]])


def voxel_metrics(
    scores: np.ndarray, labels: np.ndarray, thresholds: dict[str, float] | None = None,
    defined: np.ndarray | None = None,
) -> dict[str, float]:
    """Voxel-wise metrics of anomaly ``scores`` against binary lesion ``labels``.

    Both arrays are flattened; voxels with a non-finite score are dropped. Returns
    ``n_voxels``, ``prevalence``, ``auroc``, ``auprc`` (average precision), ``oracle_dice``,
    ``oracle_threshold`` and, per calibrated FPR in ``thresholds``, ``dice_fpr<fpr>`` and
    ``fpr_observed_fpr<fpr>``. Without lesion voxels everything but the observed FPR is NaN.
    ``defined`` (boolean, same size): where the map is defined; the observed FPR counts the
    non-lesion voxels there only (default: all of them).
    """
    s = np.asarray(scores).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size} voxels) and labels ({y.size} voxels) differ in size")
    y = y.astype(bool)
    d = None if defined is None else np.asarray(defined, bool).ravel()
    if d is not None and d.shape != s.shape:
        raise ValueError(f"defined ({d.size} voxels) and scores ({s.size} voxels) differ in size")
    keep = np.isfinite(s)
    if not keep.all():
        s, y = s[keep], y[keep]
        d = None if d is None else d[keep]
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    out: dict[str, float] = {
        "n_voxels": int(y.size),
        "prevalence": n_pos / y.size if y.size else math.nan,
        "auroc": math.nan,
        "auprc": math.nan,
    }
    if n_pos and n_neg:
        out["auroc"] = float(roc_auc_score(y, s))
    if n_pos:
        out["auprc"] = float(average_precision_score(y, s))
    out["oracle_dice"], out["oracle_threshold"] = _oracle_dice(s, y)
    for fpr, thr in (thresholds or {}).items():
        tp, fp, fn, tn = _counts(s, y, float(thr))
        key = _fpr_key(fpr)
        out[f"dice_fpr{key}"] = _dice(tp, fp, fn)
        if d is not None:
            fp, tn = _negatives(s[d], y[d], float(thr))
        out[f"fpr_observed_fpr{key}"] = fp / (fp + tn) if fp + tn else math.nan
    return out


def _negatives(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int]:
    """(FP, TN) of the prediction ``scores > threshold`` among the non-lesion voxels."""
    neg = ~labels
    fp = int(np.count_nonzero((scores > threshold) & neg))
    return fp, int(np.count_nonzero(neg)) - fp


def defined_region(brain: np.ndarray, erosion: int) -> np.ndarray:
    """Where scoring defines the statmap: ``brain`` eroded by ``erosion`` voxels, by the very
    code that scoring uses (``scoring.postprocess``); the statmap is 0 outside by construction."""
    from .scoring import ScoringParams, postprocess

    brain = np.asarray(brain, bool)
    params = ScoringParams(erosion=int(erosion), median_size=1)
    return postprocess(np.zeros(brain.shape, np.float32), brain, params)[1].astype(bool)


def scan_level_auroc(scores: Any, is_pathological: Any) -> float:
    """AUROC of per-scan scores for pathological vs healthy scans (NaN if one class only).

    Scans with a non-finite score are ignored.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(is_pathological, dtype=bool).ravel()
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


@dataclass
class EvaluationResult:
    """Per-scan and pooled metrics of one or more models, plus the scans left out."""

    per_scan: pd.DataFrame
    pooled: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    mask_dilation: int = 0


# --------------------------------------------------------------------------- discovery


def _parse_entities(stem: str) -> dict[str, str] | None:
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


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scans_from_table(table: Path) -> list[tuple[ScanKey, float]]:
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
            ents = _parse_entities(scan_id)
            key = _key_from_entities(ents) if ents else None
        if key is None:
            subject = _strip(_na(row.get("participant_id", "")), "sub-")
            if not subject:
                raise DataError(f"{table}: row without participant_id or a parsable scan_id")
            key = ScanKey(subject, _strip(_na(row.get("session_id", "")), "ses-"),
                          _strip(_na(row.get("run", "")), "run-"))
        scans.append((key, _to_float(row.get("score", math.nan))))
    return scans


def _scans_from_glob(output_dir: Path) -> list[tuple[ScanKey, float]]:
    suffix = "_stat-anomaly_statmap.nii.gz"
    scans = []
    for path in sorted(output_dir.glob(f"sub-*/**/anat/*{suffix}")):
        ents = _parse_entities(path.name[: -len(suffix)])
        key = _key_from_entities(ents) if ents else None  # skips space-/res- (template) maps
        if key is None or ScanOutputs(key).native_statmap != path.relative_to(output_dir):
            continue
        scans.append((key, _score_from_record(output_dir / ScanOutputs(key).scores)))
    return scans


def _score_from_record(path: Path) -> float:
    """The ``score`` of a per-scan scores JSON, NaN if there is none."""
    try:
        return _to_float(json.loads(path.read_text(encoding="utf-8")).get("score"))
    except (OSError, ValueError, AttributeError):
        return math.nan


def _lesion_path(labels_dir: Path, key: ScanKey) -> Path | None:
    """The lesion mask of ``key``; falls back to a name with only sub/ses entities."""
    candidates = [key, ScanKey(key.subject, key.session)]
    for k in candidates:
        path = labels_dir / k.subdir / build_name(k, "mask", label="lesion")
        if path.exists():
            return path
    return None


# --------------------------------------------------------------------------- loading


def _load(path: Path) -> nb.Nifti1Image:
    try:
        return nb.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot read NIfTI image ({exc})") from exc


def _shape3(img: nb.Nifti1Image, path: Path) -> tuple[int, ...]:
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D image, got shape {img.shape}")
    return shape


def _check_grid(ref: nb.Nifti1Image, ref_path: Path, img: nb.Nifti1Image, path: Path) -> None:
    s_ref, s_img = _shape3(ref, ref_path), _shape3(img, path)
    if s_ref != s_img or not np.allclose(ref.affine, img.affine, atol=AFFINE_TOL, rtol=0):
        raise DataError(
            f"grid mismatch between {ref_path} (shape {s_ref}) and {path} (shape {s_img}): "
            f"shape and affine must agree within {AFFINE_TOL}"
        )


def _array(img: nb.Nifti1Image, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype).reshape(shape)


def _read_sidecar(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON sidecar ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: JSON sidecar is not an object")
    return meta


def _thresholds(meta: dict, path: Path) -> dict[str, float] | None:
    raw = meta.get("Thresholds")
    if raw is None:
        return None
    try:
        return {_fpr_key(k): float(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: Thresholds must map FPR to a number ({exc})") from exc


class _Pool:
    """Concatenated in-brain voxels with a deterministic uniform subsample above ``cap``.

    Bottom-k sampling on per-voxel random keys keeps memory bounded by ``cap`` plus one scan.
    Exact confusion counts at calibrated thresholds are accumulated separately.
    """

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap = cap
        self.rng = np.random.default_rng(seed)
        self.scores = np.empty(0, np.float32)
        self.labels = np.empty(0, bool)
        self.keys = np.empty(0, np.float64)
        self.n_total = 0
        self.n_pos = 0
        self.counts: dict[str, np.ndarray] = {}
        self.fpr_counts: dict[str, np.ndarray] = {}  # (FP, TN) where the map is defined
        self.template_counts: dict[str, np.ndarray] = {}  # (FP, TN), healthy, template space
        self.n_template_scans = 0

    def add(self, scores: np.ndarray, labels: np.ndarray, thr: dict[str, float] | None,
            defined: np.ndarray | None = None) -> None:
        self.n_total += scores.size
        self.n_pos += int(np.count_nonzero(labels))
        for fpr, t in (thr or {}).items():
            c = np.asarray(_counts(scores, labels, t), dtype=np.int64)
            self.counts[fpr] = self.counts.get(fpr, 0) + c
            neg = (_negatives(scores, labels, t) if defined is None
                   else _negatives(scores[defined], labels[defined], t))
            self.fpr_counts[fpr] = self.fpr_counts.get(fpr, 0) + np.asarray(neg, np.int64)
        self.scores = np.concatenate([self.scores, scores.astype(np.float32)])
        self.labels = np.concatenate([self.labels, labels])
        self.keys = np.concatenate([self.keys, self.rng.random(scores.size)])
        if self.scores.size > self.cap:
            idx = np.sort(np.argpartition(self.keys, self.cap - 1)[: self.cap])
            self.scores, self.labels, self.keys = self.scores[idx], self.labels[idx], self.keys[idx]

    def metrics(self) -> dict[str, float]:
        out = voxel_metrics(self.scores, self.labels)
        out["n_voxels"] = self.n_total
        out["n_voxels_sampled"] = int(self.scores.size)
        out["prevalence"] = self.n_pos / self.n_total if self.n_total else math.nan
        for fpr in sorted(self.counts, key=float, reverse=True):
            tp, fp, fn, tn = (int(v) for v in self.counts[fpr])
            out[f"dice_fpr{fpr}"] = _dice(tp, fp, fn)
            fp, tn = (int(v) for v in self.fpr_counts[fpr])
            out[f"fpr_observed_fpr{fpr}"] = fp / (fp + tn) if fp + tn else math.nan
        for fpr in sorted(self.template_counts, key=float, reverse=True):
            fp, tn = (int(v) for v in self.template_counts[fpr])
            out[f"fpr_template_fpr{fpr}"] = fp / (fp + tn) if fp + tn else math.nan
        out["n_fpr_template_scans"] = self.n_template_scans
        return out


# --------------------------------------------------------------------------- defined region

_FALLBACK_REGION = "native brain mask (no template-space brain mask or transform)"


def _scoring_erosion(output_dir: Path, key: ScanKey, cache: dict[str, int]) -> int:
    """The ``erosion`` of the bundle that scored ``key`` (its scores record names the bundle
    folder), else the scoring default."""
    from .scoring import ScoringParams

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


def _template_outputs(output_dir: Path, key: ScanKey) -> ScanOutputs | None:
    """The scan's outputs at the resolution of its template-space statmap (None without)."""
    matches = sorted((output_dir / key.subdir).glob(
        f"{key.scan_id}_space-*_res-*_stat-anomaly_statmap.nii.gz"))
    if not matches:
        return None
    ents = _parse_entities(matches[0].name.split("_stat-")[0]) or {}
    try:
        return ScanOutputs(key, res=int(ents["res"]))
    except (KeyError, ValueError):
        return None


def _native_defined(
    output_dir: Path, outs: ScanOutputs | None, erosion: int, stat_img: nb.Nifti1Image,
    shape: tuple[int, ...], work: Path,
) -> np.ndarray | None:
    """Native voxels whose statmap value is interpolated from defined template voxels only
    (None when OUTPUT_DIR lacks the template-space brain mask or the transform)."""
    from .preprocessing.registration import to_native
    from .templates import load_template

    if outs is None:
        return None
    tbrain_path, xfm = output_dir / outs.template_brain_mask, output_dir / outs.xfm
    if not (tbrain_path.exists() and xfm.exists()):
        return None
    template = load_template(outs.res)
    tbrain_img = _load(tbrain_path)
    if _shape3(tbrain_img, tbrain_path) != template.shape:
        raise DataError(f"{tbrain_path}: shape {tbrain_img.shape} is not the {outs.res} mm "
                        "template grid")
    tbrain = _array(tbrain_img, template.shape, np.float32) > 0
    defined = defined_region(tbrain, erosion).astype(np.float32)
    ref = nb.Nifti1Image(np.zeros(shape, np.float32), stat_img.affine)
    native = to_native(defined, template, ref, xfm, work / "to_native")
    return np.asarray(native).reshape(shape) >= 0.999


def _template_fpr(
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
    tstat_img, tbrain_img = _load(tstat_path), _load(tbrain_path)
    _check_grid(tstat_img, tstat_path, tbrain_img, tbrain_path)
    tshape = _shape3(tstat_img, tstat_path)
    tstat = _array(tstat_img, tshape, np.float32)
    region = defined_region(_array(tbrain_img, tshape, np.float32) > 0, erosion)
    region &= np.isfinite(tstat)
    s = tstat[region]
    no_lesion = np.zeros(s.shape, bool)
    return {fpr: _negatives(s, no_lesion, t) for fpr, t in thresholds.items()}


# --------------------------------------------------------------------------- evaluation


def _evaluate_dir(
    output_dir: Path, labels_dir: Path, mask_dilation: int, cap: int,
    erosion: int | None = None,
) -> tuple[str, list[dict], dict, list[str]]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ba-evaluate-") as tmp:
        return _evaluate_dir_in(output_dir, labels_dir, mask_dilation, cap, erosion, Path(tmp))


def _evaluate_dir_in(
    output_dir: Path, labels_dir: Path, mask_dilation: int, cap: int, erosion: int | None,
    work: Path,
) -> tuple[str, list[dict], dict, list[str]]:
    table = output_dir / GROUP_TABLE
    scans = _scans_from_table(table) if table.exists() else _scans_from_glob(output_dir)
    scans.sort(key=lambda item: item[0].scan_id)
    model_name: str | None = None
    rows: list[dict] = []
    skipped: list[str] = []
    pool = _Pool(cap)
    struct = ndimage.generate_binary_structure(3, 1)
    erosions: dict[str, int] = {}
    for key, score in scans:
        outs = ScanOutputs(key)
        stat_path = output_dir / outs.native_statmap
        brain_path = output_dir / outs.native_brain_mask
        lesion_path = _lesion_path(labels_dir, key)
        reason = None
        if lesion_path is None:
            expected = labels_dir / key.subdir / build_name(key, "mask", label="lesion")
            reason = f"no lesion mask {expected}"
        elif not stat_path.exists():
            reason = f"statmap missing: {stat_path}"
        elif not brain_path.exists():
            reason = f"brain mask missing: {brain_path}"
        if reason:
            skipped.append(f"{output_dir.name}: {key.scan_id}: {reason}")
            continue
        meta_path = sidecar(stat_path)
        meta = _read_sidecar(meta_path)
        if model_name is None:
            model = meta.get("Model")
            name = model.get("Name") if isinstance(model, dict) else None
            model_name = str(name) if name else output_dir.name
        thresholds = _thresholds(meta, meta_path)

        stat_img, brain_img, lesion_img = _load(stat_path), _load(brain_path), _load(lesion_path)
        _check_grid(stat_img, stat_path, lesion_img, lesion_path)
        _check_grid(stat_img, stat_path, brain_img, brain_path)
        shape = _shape3(stat_img, stat_path)
        stat = _array(stat_img, shape, np.float32)
        lesion_f = _array(lesion_img, shape, np.float32)
        brain = _array(brain_img, shape, np.float32) > 0
        if mask_dilation > 0:
            brain = ndimage.binary_dilation(brain, struct, iterations=mask_dilation)
        region = brain & np.isfinite(stat) & np.isfinite(lesion_f)
        lesion = np.nan_to_num(lesion_f) > 0
        s, y = stat[region], lesion[region]
        # Observed FPRs count only voxels where the statmap is defined (module docstring).
        e = _scoring_erosion(output_dir, key, erosions) if erosion is None else int(erosion)
        touts = _template_outputs(output_dir, key)
        native_defined = _native_defined(output_dir, touts, e, stat_img, shape, work)
        if native_defined is None:
            defined, fpr_region = None, _FALLBACK_REGION
        else:
            undiluted = (_array(brain_img, shape, np.float32) > 0) & native_defined
            defined, fpr_region = undiluted[region], f"defined: brain eroded by {e} voxel(s)"
        pool.add(s, y, thresholds, defined)
        metrics = voxel_metrics(s, y, thresholds, defined)
        n_lesion = int(np.count_nonzero(lesion))
        template_fpr = None
        if n_lesion == 0 and thresholds:
            template_fpr = _template_fpr(output_dir, touts, e, thresholds)
        if template_fpr is not None:
            pool.n_template_scans += 1
        for fpr in thresholds or {}:
            value = math.nan
            if template_fpr is not None:
                fp, tn = template_fpr[fpr]
                pool.template_counts[fpr] = pool.template_counts.get(fpr, 0) + np.asarray(
                    (fp, tn), np.int64)
                value = fp / (fp + tn) if fp + tn else math.nan
            metrics[f"fpr_template_fpr{fpr}"] = value
        metrics["fpr_region"] = fpr_region
        rows.append({
            "scan_id": key.scan_id,
            "participant_id": f"sub-{key.subject}",
            "session_id": f"ses-{key.session}" if key.session else "n/a",
            "run": key.run or "n/a",
            "pathological": n_lesion > 0,
            "lesion_voxels": n_lesion,
            "lesion_voxels_in_mask": int(np.count_nonzero(y)),
            **metrics,
            "score": score,
        })
    if not rows:
        raise EmptySelectionError(
            f"{output_dir}: none of its {len(scans)} scan(s) could be matched with a lesion "
            f"mask in {labels_dir}"
        )
    pooled = pool.metrics()
    pathological = np.array([r["pathological"] for r in rows])
    pooled["scan_auroc"] = scan_level_auroc([r["score"] for r in rows], pathological)
    pooled["n_scans"] = len(rows)
    pooled["n_pathological"] = int(pathological.sum())
    pooled["n_healthy"] = len(rows) - int(pathological.sum())
    return model_name or output_dir.name, rows, pooled, skipped


def evaluate_outputs(
    output_dirs: list[Path],
    labels_dir: Path,
    mask_dilation: int = 0,
    max_pooled_voxels: int = MAX_POOLED_VOXELS,
    erosion: int | None = None,
) -> EvaluationResult:
    """Evaluate each OUTPUT_DIR (one model each) against the lesion masks in ``labels_dir``.

    Scans come from ``group_anomaly.tsv`` (status ok) or, without it, from the native
    statmaps found on disk. Metrics are computed inside the native brain mask (dilated by
    ``mask_dilation`` voxels) where statmap and label are finite; observed false-positive
    rates only where the statmap is defined (see the module docstring; ``erosion`` overrides
    the erosion read from each scan's bundle).
    """
    labels_dir = Path(labels_dir)
    if not output_dirs:
        raise EmptySelectionError("no output directory given to evaluate")
    for d in [*output_dirs, labels_dir]:
        if not Path(d).is_dir():
            raise MissingInputError(f"{d}: directory does not exist")
    if mask_dilation < 0:
        raise ValueError("mask_dilation must be >= 0")
    per_scan: list[dict] = []
    pooled: list[dict] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for d in output_dirs:
        d = Path(d)
        name, rows, pool, skip = _evaluate_dir(d, labels_dir, mask_dilation, max_pooled_voxels,
                                               erosion)
        if name in seen:  # two folders of the same model: keep them apart
            name = f"{name} ({d.name})"
        seen.add(name)
        per_scan += [{"model": name, **r} for r in rows]
        pooled.append({"model": name, **pool})
        skipped += skip
    scans_df = pd.DataFrame(per_scan)
    pooled_df = pd.DataFrame(pooled)
    lead = ["model", "n_scans", "n_pathological", "n_healthy"]
    pooled_df = pooled_df[lead + [c for c in pooled_df.columns if c not in lead]]
    return EvaluationResult(scans_df, pooled_df, skipped, mask_dilation)


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

    from .preprocessing.registration import to_template, warp_paths
    from .templates import load_template

    output_dir, labels_dir = Path(output_dir), Path(labels_dir)
    lesion_path = _lesion_path(labels_dir, key)
    if lesion_path is None:
        raise MissingInputError(f"{labels_dir}: no lesion mask for {key.scan_id}")
    matches = sorted((output_dir / key.subdir).glob(
        f"{key.scan_id}_space-*_res-*_stat-anomaly_statmap.nii.gz"))
    if not matches:
        raise MissingInputError(f"{output_dir / key.subdir}: no template-space statmap for "
                                f"{key.scan_id}")
    res = int(_parse_entities(matches[0].name.split("_stat-")[0])["res"])
    outs = ScanOutputs(key, res=res)
    paths = {name: output_dir / rel for name, rel in (
        ("stat", outs.native_statmap), ("brain", outs.native_brain_mask),
        ("tstat", outs.template_statmap), ("tbrain", outs.template_brain_mask),
        ("xfm", outs.xfm))}
    for path in paths.values():
        if not path.exists():
            raise MissingInputError(f"{path}: not found")
    out: dict[str, float] = {}

    stat_img, brain_img = _load(paths["stat"]), _load(paths["brain"])
    lesion_img = _load(lesion_path)
    _check_grid(stat_img, paths["stat"], lesion_img, lesion_path)
    _check_grid(stat_img, paths["stat"], brain_img, paths["brain"])
    shape = _shape3(stat_img, paths["stat"])
    stat = _array(stat_img, shape, np.float32)
    lesion = np.nan_to_num(_array(lesion_img, shape, np.float32)) > 0
    region = (_array(brain_img, shape, np.float32) > 0) & np.isfinite(stat)
    out["native_oracle_dice"] = _oracle_dice(stat[region], lesion[region])[0]
    vox_ml = float(abs(np.linalg.det(stat_img.affine[:3, :3]))) / 1000.0
    out["native_lesion_ml"] = float(np.count_nonzero(lesion)) * vox_ml

    template = load_template(res)
    tstat_img, tbrain_img = _load(paths["tstat"]), _load(paths["tbrain"])
    _check_grid(tstat_img, paths["tstat"], tbrain_img, paths["tbrain"])
    tshape = _shape3(tstat_img, paths["tstat"])
    if tshape != template.shape:
        raise DataError(f"{paths['tstat']}: shape {tshape} is not the {res} mm template grid")
    warp = warp_paths(paths["xfm"])[0]
    transforms = [str(warp), str(paths["xfm"])] if warp.exists() else [str(paths["xfm"])]
    lesion_f = nb.Nifti1Image(lesion.astype(np.float32), lesion_img.affine)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ba-agreement-") as tmp:
        tlesion_f = to_template(lesion_f, template, transforms, Path(tmp),
                                interpolation="linear")
    tlesion = tlesion_f > 0.5
    tstat = _array(tstat_img, tshape, np.float32)
    tbrain = _array(tbrain_img, tshape, np.float32) > 0
    tvox_ml = float(abs(np.linalg.det(tstat_img.affine[:3, :3]))) / 1000.0
    out["template_lesion_ml"] = float(np.count_nonzero(tlesion)) * tvox_ml
    native_mm = float(max(_zooms(stat_img.affine)))
    t_mm = float(max(_zooms(tstat_img.affine)))
    out["template_voxel_mm"] = target = max(t_mm, native_mm) if voxel_mm is None else voxel_mm
    if not math.isclose(target, t_mm, rel_tol=1e-3):
        # The soft (interpolated) label is thresholded once, after the second resampling.
        tstat, tlesion, tbrain = _regrid(tstat_img.affine, target, tstat, tlesion_f, tbrain)
    tregion = tbrain & np.isfinite(tstat)
    out["template_oracle_dice"] = _oracle_dice(tstat[tregion], tlesion[tregion])[0]
    out["difference"] = out["template_oracle_dice"] - out["native_oracle_dice"]
    return out


# --------------------------------------------------------------------------- output

_DESCRIPTIONS = {
    "model": "Model name (statmap sidecar Model.Name, else the OUTPUT_DIR folder name).",
    "scan_id": "Scan identifier (BIDS entities of the scan).",
    "participant_id": "Participant label.",
    "session_id": "Session label, n/a without sessions.",
    "run": "Run label, n/a without runs.",
    "pathological": "True if the lesion mask has at least one voxel.",
    "lesion_voxels": "Number of lesion voxels in the whole lesion mask.",
    "lesion_voxels_in_mask": "Number of lesion voxels inside the evaluation mask.",
    "n_voxels": "Number of voxels evaluated (brain mask where statmap and label are finite).",
    "n_voxels_sampled": "Voxels used for AUROC, AUPRC and oracle Dice (deterministic random "
                        f"subsample when above {MAX_POOLED_VOXELS}).",
    "prevalence": "Fraction of evaluated voxels that are lesion.",
    "auroc": "Voxel-wise area under the ROC curve (n/a without lesion or healthy voxels).",
    "auprc": "Voxel-wise average precision (n/a without lesion voxels).",
    "oracle_dice": "Best Dice over all thresholds (statmap >= threshold).",
    "oracle_threshold": "Statmap threshold giving the oracle Dice.",
    "score": "Per-scan anomaly score from group_anomaly.tsv.",
    "scan_auroc": "Scan-level AUROC of the per-scan score, pathological vs healthy scans.",
    "n_scans": "Number of scans evaluated.",
    "n_pathological": "Number of evaluated scans with a non-empty lesion mask.",
    "n_healthy": "Number of evaluated scans with an empty lesion mask (healthy).",
    "n_fpr_template_scans": "Number of healthy scans the template-space observed FPR rests on.",
    "fpr_region": "Where the observed FPR was counted: where the statmap is defined (the brain "
                  "mask eroded as scoring erodes it, brought to the native grid), or the whole "
                  "native brain mask when the outputs lack the template-space mask or transform.",
}


def _describe(col: str) -> dict[str, str]:
    if col.startswith("dice_fpr"):
        fpr = col[len("dice_fpr"):]
        desc = f"Dice of statmap > threshold calibrated at voxel FPR {fpr} on healthy data."
    elif col.startswith("fpr_observed_fpr"):
        fpr = col[len("fpr_observed_fpr"):]
        desc = (f"Observed false-positive rate among non-lesion native voxels where the "
                f"statmap is defined (see fpr_region), at the threshold calibrated for FPR "
                f"{fpr}.")
    elif col.startswith("fpr_template_fpr"):
        fpr = col[len("fpr_template_fpr"):]
        desc = (f"Healthy scans only: observed false-positive rate of the template-space "
                f"statmap inside the eroded template brain mask (the set the threshold was "
                f"calibrated on), at the threshold calibrated for FPR {fpr}.")
    else:
        desc = _DESCRIPTIONS.get(col, col)
    return {"Description": desc}


def _tsv_text(df: pd.DataFrame) -> str:
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == bool:
            out[col] = out[col].map({True: "true", False: "false"})
    return out.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.4f",
                      lineterminator="\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def write_evaluation(
    result: EvaluationResult, dest_dir: Path, group_report: bool = True
) -> list[Path]:
    """Write evaluation_scans/pooled TSVs (+ JSON sidecars) and evaluation.json atomically.

    With ``group_report`` and when ``dest_dir`` is a scored OUTPUT_DIR (it holds
    ``group_anomaly.tsv``), its ``group_report.html`` is rebuilt so that its "Evaluation"
    section shows these tables at once (a later ``bids-anomaly report ... group`` or group
    level keeps showing them). A report that fails to build is logged, never fatal.
    """
    dest_dir = Path(dest_dir)
    written: list[Path] = []
    for name, df in (("evaluation_scans", result.per_scan), ("evaluation_pooled", result.pooled)):
        tsv = dest_dir / f"{name}.tsv"
        written.append(write_text(tsv, _tsv_text(df)))
        written.append(write_json(sidecar(tsv), {c: _describe(c) for c in df.columns}))
    models = {
        str(row["model"]): {k: _json_value(v) for k, v in row.items() if k != "model"}
        for row in result.pooled.to_dict(orient="records")
    }
    summary = {
        "Models": models,
        "MaskDilation": result.mask_dilation,
        "Conventions": {
            "oracle_threshold": "statmap >= threshold",
            "calibrated": "statmap > threshold",
        },
        "Skipped": list(result.skipped),
    }
    written.append(write_json(dest_dir / "evaluation.json", summary))
    if group_report and (dest_dir / GROUP_TABLE).is_file():
        from .reports import build_group_report

        try:
            written.append(build_group_report(dest_dir))
        except Exception as exc:  # the tables are written; a report must not lose them
            LOG.error("group report in %s not rebuilt: %s", dest_dir, exc)
    return written


def _pick(row: pd.Series, prefix: str, fpr: float) -> Any:
    for col, value in row.items():
        if str(col).startswith(prefix):
            try:
                if math.isclose(float(str(col)[len(prefix):]), fpr):
                    return value
            except ValueError:
                continue
    return math.nan


def _fmt(value: Any) -> str:
    v = _to_float(value)
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def format_pooled_table(result: EvaluationResult) -> list[list[str]]:
    """Rows (header first) comparing the models' pooled metrics side by side."""
    rows = [["model", "n_scans", "AUROC", "AUPRC", "oracle Dice", "Dice@1%FPR", "Dice@0.1%FPR",
             "scan AUROC"]]
    for _, r in result.pooled.iterrows():
        rows.append([
            str(r["model"]), str(int(r["n_scans"])), _fmt(r.get("auroc")), _fmt(r.get("auprc")),
            _fmt(r.get("oracle_dice")), _fmt(_pick(r, "dice_fpr", 0.01)),
            _fmt(_pick(r, "dice_fpr", 0.001)), _fmt(r.get("scan_auroc")),
        ])
    return rows
