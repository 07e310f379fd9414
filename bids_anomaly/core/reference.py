"""Which part of a bundle's healthy reference a scan belongs to, if any.

Scoring a participant that trained, validated or calibrated the bundle gives an optimistic
score (the model has seen it, or it sets the thresholds it is compared with). Scans are
matched by the sha256 of their T1w file (whatever the dataset is called or where it lies),
and, for cards written before the digests were recorded, by dataset path and participant.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROLES = ("fit", "validation", "calibration")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reference_role(training: dict, t1w: Path, bids_dir: Path, subject: str) -> str | None:
    """``fit``, ``validation`` or ``calibration`` when the scan was part of the bundle's
    healthy reference (``training`` is the card's "training" section), else None."""
    scans = [s for s in training.get("scans") or [] if s.get("sha256")]
    if scans:
        digest = file_sha256(Path(t1w))
        for scan in scans:
            if scan.get("sha256") == digest:
                return str(scan.get("role"))
        return None
    try:
        same = Path(training.get("dataset", "")).resolve() == Path(bids_dir).resolve()
    except OSError:
        same = False
    if not same:
        return None
    keys = (("participants", "fit"), ("validation_participants", "validation"),
            ("calibration_participants", "calibration"))
    for key, role in keys:
        if subject in (training.get(key) or []):
            return role
    return None


def reference_cohort(card: dict) -> dict:
    """The cohort a bundle's percentiles and thresholds are relative to (for reports)."""
    if card.get("reference_cohort"):
        ref = card["reference_cohort"]
        return {"kind": ref.get("kind"), "dataset": ref.get("dataset"),
                "n_participants": len(ref.get("participants") or [])}
    train = card.get("training", {})
    folds = train.get("folds")
    kind = ("training cohort, out-of-fold" if folds else "held-out training participants")
    return {"kind": kind, "dataset": train.get("dataset"),
            "n_participants": len(train.get("calibration_participants") or [])}


def reference_scans(card: dict) -> dict:
    """Everything :func:`bids_anomaly.core.reference.reference_role` needs from a card: the
    training record, plus the site-calibration cohort as ``calibration`` scans."""
    train = card.get("training", {})
    out = {k: train[k] for k in ("dataset", "participants", "validation_participants",
                                 "calibration_participants", "scans") if k in train}
    cohort = card.get("reference_cohort") or {}
    if cohort.get("scans"):
        out["scans"] = list(out.get("scans") or []) + list(cohort["scans"])
    return out
