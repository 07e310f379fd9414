"""A model bundle at a glance: its card, summarised, with every checksum verified.

``bundle_info(path)`` loads the bundle through :func:`~bids_anomaly.models.bundle.load_bundle`
(schema, sha256 of every listed file, weights), so a tampered or incomplete bundle raises
:class:`~bids_anomaly.core.errors.BundleError` (exit code 65) before anything is shown. The CLI's
``bids-anomaly info`` prints :meth:`BundleInfo.rows` or, with ``--json``, :meth:`to_dict`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bundle import CARD, load_bundle


@dataclass(frozen=True)
class BundleInfo:
    """What a user asks of a bundle before trusting its scores."""

    path: str
    name: str
    model_type: str
    description: str
    contrasts: list[str]
    template: str
    resolution_mm: float
    schema_version: str
    written: str  # model.json's modification time (the cards carry no training date)
    training: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> sha256, each verified
    checksums_verified: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for a terminal."""
        t, r, th = self.training, self.reference, self.thresholds
        warn = f" — warning: {r['message']}" if r.get("message") else ""
        voxel = ", ".join(f"{float(fpr) * 100:g}% FPR: z ≥ {z:.3f}"
                          + (f" (mask observed {th['observed_fpr'][fpr] * 100:.3g}%)"
                             if fpr in th.get("observed_fpr", {}) else "")
                          for fpr, z in th.get("voxel", {}).items())
        return [
            ("name", self.name),
            ("model", f"{self.model_type}: {self.description}"),
            ("contrasts", ", ".join(self.contrasts)),
            ("template", f"{self.template} at {self.resolution_mm:g} mm"),
            ("training cohort", f"{t.get('n_participants', 'n/a')} participants, "
                                f"{t.get('n_scans', 'n/a')} scans from {t.get('dataset', 'n/a')}"),
            ("training", f"{t.get('models_trained', 'n/a')} models ({t.get('folds', 'n/a')} "
                         f"folds + shipped), {t.get('seconds', 'n/a')} s on "
                         f"{t.get('device', 'n/a')}, seed {t.get('seed', 'n/a')}"),
            ("written", self.written),
            ("healthy reference", f"{r.get('kind', 'n/a')}: {r.get('n_scans', 'n/a')} scans of "
                                  f"{len(r.get('participants', []))} participants "
                                  f"({r.get('dataset', 'n/a')})"
                                  + (f", {r['date']}" if r.get("date") else "") + warn),
            ("reference participants", ", ".join(r.get("participants", [])) or "n/a"),
            ("voxel thresholds", voxel or "n/a"),
            ("default FPR", str(th.get("default_fpr", "n/a"))),
            ("software", ", ".join(f"{k} {v}" for k, v in self.software.items())),
            ("files (sha256 verified)", "; ".join(f"{k} {v[:12]}…"
                                                  for k, v in self.files.items())),
        ]


def bundle_info(path: Path) -> BundleInfo:
    """Load and verify the bundle at ``path``; its card summarised."""
    bundle = load_bundle(Path(path))
    card = bundle.model_card
    train = card.training.to_dict() if card.training else {}
    cohort = card.reference_cohort or {}
    cal = bundle.calibration
    status = cal.reference
    written = _dt.datetime.fromtimestamp((bundle.path / CARD).stat().st_mtime).astimezone()
    return BundleInfo(
        path=str(bundle.path.resolve()),
        name=card.name,
        model_type=card.model.model_type,
        description=card.description,
        contrasts=list(card.contrasts),
        template=card.template,
        resolution_mm=float(card.resolution),
        schema_version=card.schema_version,
        written=written.isoformat(timespec="seconds"),
        training={
            "dataset": train.get("dataset"),
            "n_participants": len(train.get("participants") or []),
            "n_scans": train.get("n_scans"),
            "folds": len(train.get("folds") or []),
            "models_trained": train.get("models_trained"),
            "seconds": train.get("seconds"),
            "device": train.get("device"),
            "seed": train.get("seed"),
            "best_epoch": train.get("best_epoch"),
            "date": train.get("date"),
        },
        reference={
            "kind": cohort.get("kind", "out-of-fold training reference" if train else "n/a"),
            "dataset": cohort.get("dataset", train.get("dataset")),
            "date": cohort.get("date"),
            "participants": sorted(cal.participants or cohort.get("participants") or []),
            "n_scans": status["n_scans"],
            "level": status["level"],
            "message": status["message"],
        },
        thresholds={"voxel": dict(cal.thresholds), "default_fpr": cal.default_fpr,
                    "observed_fpr": dict(cal.mask_fpr)},
        software=dict(card.software),
        files=dict(card.files),
    )
