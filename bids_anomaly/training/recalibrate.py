"""Site adaptation: re-reference a bundle to a new site's healthy controls, weights untouched.

The bundle's model reconstructs each control (it never saw them, so every residual is out of
sample); their residuals set new voxel-wise normative maps, voxel thresholds (leave one out)
and the healthy score distribution, exactly as out-of-fold calibration does at ``train``. The
new bundle's card keeps the training record and names the cohort its reference now rests on.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..calibration.out_of_fold import calibrate_out_of_fold
from ..calibration.statmap import csf_weights
from ..models.bundle import CARD, Bundle, save_bundle, sha256
from ..preprocessing.pipeline import PreprocResult, load_volume
from ..preprocessing.standardise import standardise
from .fit import calibration_npz

LOG = logging.getLogger("bids_anomaly")


@dataclass
class ReferenceScan:
    """One healthy control of the new site: its preprocessing result and identity."""

    preproc_json: str
    participant: str
    scan_id: str
    sha256: str | None = None  # of the T1w file, to recognise the scan when it is scored


def recalibrate_bundle(bundle: Bundle, scans: list[ReferenceScan], dest: Path, dataset: str,
                       device: str = "cpu") -> Path:
    """Write a copy of ``bundle`` at ``dest`` whose healthy reference is ``scans``."""
    if not scans:
        raise ValueError("calibrate needs at least one healthy scan")
    contrasts = list(bundle.model_card.contrasts)
    residuals, masks, weights = [], [], []
    params = bundle.calibration.params
    for scan in scans:
        pre = PreprocResult.load(Path(scan.preproc_json))
        volume, brain = load_volume(pre, contrasts)
        volume = standardise(volume, brain, bundle.model_card.standardisation, contrasts)
        residuals.append(volume - bundle.model.reconstruct(volume, brain, device=device))
        masks.append(brain)
        weights.append(csf_weights(volume, brain, params))
    calib = calibrate_out_of_fold(residuals, masks, params, weights=weights,
                                  fprs=tuple(bundle.calibration.thresholds),
                                  default_fpr=bundle.calibration.default_fpr,
                                  participants=[s.participant for s in scans])
    del residuals
    if calib.reference["level"] != "ok":
        LOG.warning("%s", calib.reference["message"])
    cohort = {
        "kind": "site calibration (bids-anomaly calibrate)",
        "dataset": dataset,
        "participants": sorted({s.participant for s in scans}),
        "scans": [{"scan_id": s.scan_id, "participant": s.participant, "role": "calibration",
                   **({"sha256": s.sha256} if s.sha256 else {})} for s in scans],
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "parent_bundle": {"path": str(bundle.path), "model_json_sha256":
                          sha256(bundle.path / CARD), "weights_sha256": bundle.weights_sha256},
    }
    thresholds = ", ".join(f"{k}: {v:.3f}" for k, v in calib.thresholds.items())
    LOG.info("New healthy reference: %d scans; thresholds %s; observed mask FPR %s",
             len(scans), thresholds,
             {k: round(v, 5) for k, v in calib.mask_fpr.items()})
    card = replace(bundle.model_card, reference_cohort=cohort, calibration=calib)
    return save_bundle(dest, bundle.model, card,
                       extra_files={"calibration.npz": calibration_npz(calib)})
