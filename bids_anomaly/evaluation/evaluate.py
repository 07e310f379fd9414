"""``evaluate_outputs``: the metrics of every scan of one or more OUTPUT_DIRs against lesion masks.

Where a map is defined: scoring computes the statmap only inside the template-space brain mask
eroded by the bundle's ``erosion`` and writes 0 elsewhere; the thresholds are quantiles of healthy
statmaps over exactly that set. Observed FPRs are counted only there (template space:
``fpr_template_fpr<fpr>``), or where the native resampling touches defined voxels only
(``fpr_observed_fpr<fpr>``); ``fpr_region`` says which region a row used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ..core.errors import EmptySelectionError, MissingInputError
from ..core.naming import ScanOutputs, build_name, sidecar
from .metrics import MAX_POOLED_VOXELS, VoxelPool, scan_level_auroc, voxel_metrics
from .outputs import (
    FALLBACK_REGION,
    GROUP_TABLE,
    as_array,
    check_grid,
    find_lesion_mask,
    load_image,
    native_defined_region,
    read_sidecar,
    read_thresholds,
    scans_from_glob,
    scans_from_table,
    scoring_erosion,
    shape3,
    template_negatives,
    template_outputs,
)

LOG = logging.getLogger("bids_anomaly.evaluation")

@dataclass
class EvaluationResult:
    """Per-scan and pooled metrics of one or more models, plus the scans left out."""

    per_scan: pd.DataFrame
    pooled: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    mask_dilation: int = 0


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
    scans = scans_from_table(table) if table.exists() else scans_from_glob(output_dir)
    scans.sort(key=lambda item: item[0].scan_id)
    model_name: str | None = None
    rows: list[dict] = []
    skipped: list[str] = []
    pool = VoxelPool(cap)
    struct = ndimage.generate_binary_structure(3, 1)
    erosions: dict[str, int] = {}
    for key, score in scans:
        outs = ScanOutputs(key)
        stat_path = output_dir / outs.native_statmap
        brain_path = output_dir / outs.native_brain_mask
        lesion_path = find_lesion_mask(labels_dir, key)
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
        meta = read_sidecar(meta_path)
        if model_name is None:
            model = meta.get("Model")
            name = model.get("Name") if isinstance(model, dict) else None
            model_name = str(name) if name else output_dir.name
        thresholds = read_thresholds(meta, meta_path)

        stat_img, brain_img = load_image(stat_path), load_image(brain_path)
        lesion_img = load_image(lesion_path)
        check_grid(stat_img, stat_path, lesion_img, lesion_path)
        check_grid(stat_img, stat_path, brain_img, brain_path)
        shape = shape3(stat_img, stat_path)
        stat = as_array(stat_img, shape, np.float32)
        lesion_f = as_array(lesion_img, shape, np.float32)
        brain = as_array(brain_img, shape, np.float32) > 0
        if mask_dilation > 0:
            brain = ndimage.binary_dilation(brain, struct, iterations=mask_dilation)
        region = brain & np.isfinite(stat) & np.isfinite(lesion_f)
        lesion = np.nan_to_num(lesion_f) > 0
        s, y = stat[region], lesion[region]
        # Observed FPRs count only voxels where the statmap is defined (module docstring).
        e = scoring_erosion(output_dir, key, erosions) if erosion is None else int(erosion)
        touts = template_outputs(output_dir, key)
        native_defined = native_defined_region(output_dir, touts, e, stat_img, shape, work)
        if native_defined is None:
            defined, fpr_region = None, FALLBACK_REGION
        else:
            undiluted = (as_array(brain_img, shape, np.float32) > 0) & native_defined
            defined, fpr_region = undiluted[region], f"defined: brain eroded by {e} voxel(s)"
        pool.add(s, y, thresholds, defined)
        metrics = voxel_metrics(s, y, thresholds, defined)
        n_lesion = int(np.count_nonzero(lesion))
        template_fpr = None
        if n_lesion == 0 and thresholds:
            template_fpr = template_negatives(output_dir, touts, e, thresholds)
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
