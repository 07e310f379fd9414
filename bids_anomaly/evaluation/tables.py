"""What ``evaluate`` writes: the per-scan and pooled TSVs with their JSON descriptions, the
summary JSON, and the pooled table the console prints.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.atomic import write_json, write_text
from ..core.naming import sidecar
from .evaluate import EvaluationResult
from .metrics import MAX_POOLED_VOXELS
from .outputs import GROUP_TABLE, to_float

LOG = logging.getLogger("bids_anomaly.evaluation")

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
        from ..reports import build_group_report

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
    v = to_float(value)
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
