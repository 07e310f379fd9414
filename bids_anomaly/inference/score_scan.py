"""Scoring stage: run a bundle on one preprocessed scan; outputs in template and native space."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from ..core.reference import reference_cohort, reference_scans
from ..core.templates import TEMPLATE_NAME, load_template
from ..models.bundle import load_bundle
from ..preprocessing.pipeline import PreprocResult, load_volume
from ..preprocessing.registration import to_native
from ..preprocessing.standardise import standardise
from .scoring import flag_score, score_volume


def _save(data, affine, path: Path, dtype=np.float32) -> str:
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nb.save(img, path)
    return str(path)


def score_preprocessed(preproc_json: str, bundle_dir: str, out_dir: Path, device: str = "cpu",
                       threads: int = 1) -> dict:
    """Score one scan; return a dict of the files written in ``out_dir`` and the scores."""
    import torch

    torch.set_num_threads(max(1, threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    bundle = load_bundle(Path(bundle_dir))
    pre = PreprocResult.load(Path(preproc_json))
    card = bundle.model_card
    res = card.resolution
    bundle.check_fits(list(pre.template_images), TEMPLATE_NAME, res)
    template = load_template(res)
    volume, brain = load_volume(pre, list(card.contrasts))
    volume = standardise(volume, brain, card.standardisation, card.contrasts)  # none: older
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    result = score_volume(bundle.model, volume, brain, bundle.calibration, template.affine,
                          device=device)
    timings["inference"] = time.perf_counter() - t

    t = time.perf_counter()
    files = {
        "template_statmap": _save(result.statmap, template.affine, out_dir / "statmap.nii.gz"),
        "template_mask": _save(result.mask, template.affine, out_dir / "mask.nii.gz", np.uint8),
    }
    for i, c in enumerate(card.contrasts):
        files[f"recon_{c}"] = _save(result.recon[i], template.affine, out_dir / f"recon_{c}.nii.gz")
    native_ref = nb.load(pre.native_ref)
    nat_stat = to_native(result.statmap, template, native_ref, Path(pre.xfm), out_dir / "tmp")
    files["native_statmap"] = _save(nat_stat, native_ref.affine, out_dir / "native_statmap.nii.gz")
    # The native mask is the template mask brought back (nearest-neighbour-like at 0.5).
    nat_mask = to_native(result.mask.astype(np.float32), template, native_ref, Path(pre.xfm),
                         out_dir / "tmp") > 0.5
    files["native_mask"] = _save(nat_mask, native_ref.affine, out_dir / "native_mask.nii.gz",
                                 np.uint8)
    for f in (out_dir / "tmp").iterdir():
        f.unlink()
    (out_dir / "tmp").rmdir()
    clusters = out_dir / "clusters.tsv"
    result.clusters.to_csv(clusters, sep="\t", index=False, na_rep="n/a", float_format="%.3f")
    files["clusters"] = str(clusters)
    timings["native_and_write"] = time.perf_counter() - t
    vox_mm3 = float(abs(np.linalg.det(template.affine[:3, :3])))
    summary = {
        "score": result.score,
        "percentile": result.percentile,
        "flagged": result.flagged,
        "threshold": result.threshold,
        "flag_score": flag_score(bundle.calibration.healthy_scores,
                                 bundle.calibration.params.flag_percentile),
        "flag_percentile": bundle.calibration.params.flag_percentile,
        "default_fpr": float(bundle.calibration.default_fpr),
        "thresholds": bundle.calibration.thresholds,
        # What the shipped mask (threshold + cluster filter) flags on the calibration scans.
        "mask_fpr": bundle.calibration.mask_fpr,
        "observed_mask_fpr": bundle.calibration.mask_fpr.get(bundle.calibration.default_fpr),
        "min_cluster_voxels": bundle.calibration.params.min_cluster_voxels,
        # How the statmap was computed (CSF weighting, smoothing, ...): the bundle's choice.
        "scoring": bundle.calibration.params.to_dict(),
        "reference": {**bundle.calibration.reference,
                      "cohort": reference_cohort(bundle.card)},  # the JSON sections
        "n_clusters": int(len(result.clusters)),
        "anomaly_volume_mm3": float(result.mask.sum()) * vox_mm3,
        "healthy_scores": bundle.calibration.healthy_scores,
        "model": {
            "name": bundle.name,
            "type": card.model.model_type,
            "sha256": bundle.weights_sha256,
            "path": str(bundle.path),
            "card": {
                "dataset": card.training.dataset,
                "n_participants": len(card.training.participants),
                "n_calibration": len(card.training.calibration_participants),
                "contrasts": list(card.contrasts),
                "template": card.template,
                "resolution": res,
                "bids_anomaly_version": card.software["bids-anomaly"],
            },
            # Who the healthy reference is, to recognise a scan that was part of it.
            "reference_scans": reference_scans(bundle.card),
        },
        "preprocessing": {"brain_extraction": pre.brain_extraction,
                          "brain_volume_ml": pre.brain_volume_ml, "timings": pre.timings,
                          "n4_backend": pre.n4_backend},
        "timings": timings,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    files["summary"] = str(out_dir / "summary.json")
    return files
