"""Evaluate anomaly maps against manual lesion masks (voxel- and scan-level metrics).

Compares the native-space statmaps that the participant level wrote into one or more
OUTPUT_DIRs (one model each) with a labels derivative dataset holding
``sub-X[_ses-Y]_label-lesion_mask.nii.gz`` files on the raw T1w grid. An empty lesion mask
marks a healthy scan.

* :mod:`.metrics`: the metrics, pure functions of arrays (Dice, AUROC/AUPRC, observed FPR);
* :mod:`.outputs`: what is read (scans of an OUTPUT_DIR, maps, sidecars, lesion masks, and the
  region where each map is defined);
* :mod:`.evaluate`: :func:`evaluate_outputs`, one OUTPUT_DIR after another;
* :mod:`.tables`: what is written (TSVs, their JSON descriptions, the summary JSON).
"""

from .evaluate import EvaluationResult, evaluate_outputs
from .metrics import defined_region, scan_level_auroc, voxel_metrics
from .tables import format_pooled_table, write_evaluation

__all__ = ["EvaluationResult", "evaluate_outputs", "defined_region", "scan_level_auroc",
           "voxel_metrics", "format_pooled_table", "write_evaluation"]
