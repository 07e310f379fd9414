"""Voxel- and scan-level metrics of anomaly maps against lesion masks: pure functions of arrays.

The oracle threshold ``t`` flags voxels with ``score >= t``; a calibrated threshold flags
``score > t``. Observed FPRs count only where the map is defined (:func:`defined_region`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

#: Pooled voxel metrics use a deterministic random subsample above this many voxels.
MAX_POOLED_VOXELS = 5_000_000


def fpr_key(fpr: str | float) -> str:
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


def oracle_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
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
    out["oracle_dice"], out["oracle_threshold"] = oracle_dice(s, y)
    for fpr, thr in (thresholds or {}).items():
        tp, fp, fn, tn = _counts(s, y, float(thr))
        key = fpr_key(fpr)
        out[f"dice_fpr{key}"] = _dice(tp, fp, fn)
        if d is not None:
            fp, tn = negatives(s[d], y[d], float(thr))
        out[f"fpr_observed_fpr{key}"] = fp / (fp + tn) if fp + tn else math.nan
    return out


def negatives(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int]:
    """(FP, TN) of the prediction ``scores > threshold`` among the non-lesion voxels."""
    neg = ~labels
    fp = int(np.count_nonzero((scores > threshold) & neg))
    return fp, int(np.count_nonzero(neg)) - fp


def defined_region(brain: np.ndarray, erosion: int) -> np.ndarray:
    """Where scoring defines the statmap: ``brain`` eroded by ``erosion`` voxels, by the very
    code that scoring uses (``scoring.postprocess``); the statmap is 0 outside by construction."""
    from ..calibration.statmap import postprocess
    from ..calibration.types import ScoringParams

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


class VoxelPool:
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
            neg = (negatives(scores, labels, t) if defined is None
                   else negatives(scores[defined], labels[defined], t))
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
