"""The model card (``model.json``) as typed dataclasses: schema version, JSON round trip,
migration of older cards.

Training builds one :class:`ModelCard` (``training.fit.fit_bundle``), the bundle writer adds
the model's spec and the files' checksums, and scoring reads it back as attributes. On disk
the card stays plain JSON with the layout it always had: top-level ``model_type``,
``hyperparameters``, ``contrasts``, ``shape`` (the :class:`ModelSpec`), ``preprocessing``,
``normalisation``, ``calibration``, ``training`` and provenance.

Schema ``1.1`` is the typed card. ``1.0`` cards (everything written before it, including
those that predate ``checksum_algorithm``, ``space`` or the intensity standardisation) load
through :func:`migrate_1_0`; any other version is refused with a :class:`BundleError` (exit
65). Hyper-parameters a model gained later keep their ``legacy_defaults`` at model build time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..calibration.types import Calibration
from ..core.config import PreprocConfig
from ..core.errors import BundleError
from ..preprocessing.standardise import IntensityStandardisation
from .base import AnomalyModel

CARD_SCHEMA = "1.1"
CHECKSUM_ALGORITHM = "sha256"


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples → lists), so a card equals its round trip."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class ModelSpec:
    """What model to build: registry type, hyper-parameters, contrast order, grid shape."""

    model_type: str
    hyperparameters: dict
    contrasts: tuple[str, ...]
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, model: AnomalyModel) -> ModelSpec:
        return cls(model.type_name, _plain(model.hparams), tuple(model.contrasts),
                   tuple(int(s) for s in model.shape))

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "hyperparameters": self.hyperparameters,
                "contrasts": list(self.contrasts), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        return cls(str(d["model_type"]), dict(d["hyperparameters"]),
                   tuple(d["contrasts"]), tuple(int(s) for s in d["shape"]))


@dataclass(frozen=True)
class Normalisation:
    """Intensity normalisation: the per-volume rule and the learned cohort standardisation
    (None for bundles written before it existed)."""

    per_volume: dict = field(default_factory=dict)
    standardisation: IntensityStandardisation | None = None

    def to_dict(self) -> dict:
        return {"per_volume": self.per_volume,
                "standardisation": (self.standardisation.to_dict()
                                    if self.standardisation else None)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Normalisation:
        std = d.get("standardisation")
        return cls(dict(d.get("per_volume") or {}),
                   IntensityStandardisation.from_dict(std) if std else None)


@dataclass(frozen=True)
class TrainingRecord:
    """How the model was trained: cohort, folds, epochs, device, time, loss history."""

    dataset: str = ""
    participants: list[str] = field(default_factory=list)
    calibration_participants: list[str] = field(default_factory=list)
    folds: list[dict] = field(default_factory=list)
    epoch_selection: str = ""
    scans: list[dict] = field(default_factory=list)
    n_scans: int = 0
    models_trained: int = 0
    minutes_per_model: float | None = None
    seed: int | None = None
    device: str = ""
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    extra: dict = field(default_factory=dict)  # keys of older cards this version does not name

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return _plain({**self.extra, **d})

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainingRecord:
        names = {f.name for f in fields(cls)} - {"extra"}
        d = _plain(dict(d))
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})


@dataclass(frozen=True)
class ModelCard:
    """A bundle's card. ``files`` and ``model`` are filled in by the bundle writer."""

    name: str
    template: str
    resolution: int
    model: ModelSpec
    calibration: Calibration
    description: str = ""
    space: str | None = None
    preprocessing: PreprocConfig | None = None
    inference_precision: str | None = None
    normalisation: Normalisation | None = None
    training: TrainingRecord | None = None
    software: dict = field(default_factory=dict)
    intended_use: str = ""
    reference_cohort: dict | None = None
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    files: dict[str, str] = field(default_factory=dict)
    schema_version: str = CARD_SCHEMA
    extra: dict = field(default_factory=dict)  # top-level keys this version does not name

    @property
    def contrasts(self) -> tuple[str, ...]:
        return self.model.contrasts

    @property
    def standardisation(self) -> IntensityStandardisation | None:
        return self.normalisation.standardisation if self.normalisation else None

    def to_dict(self) -> dict:
        """The JSON document of ``model.json`` (sections left unset are not written)."""
        d: dict[str, Any] = {"schema_version": self.schema_version, **self.extra,
                             "name": self.name, "description": self.description,
                             "template": self.template, "space": self.space,
                             "resolution": self.resolution}
        if self.preprocessing is not None:
            d["preprocessing"] = self.preprocessing.to_dict()
        d["inference_precision"] = self.inference_precision
        if self.normalisation is not None:
            d["normalisation"] = self.normalisation.to_dict()
        if self.training is not None:
            d["training"] = self.training.to_dict()
        d.update(software=self.software, intended_use=self.intended_use,
                 reference_cohort=self.reference_cohort, **self.model.to_dict(),
                 calibration=self.calibration.to_dict(),
                 checksum_algorithm=self.checksum_algorithm, files=self.files)
        return _plain({k: v for k, v in d.items() if v is not None})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelCard:
        """A card of the current schema (see :func:`card_from_dict` for older ones)."""
        top = {f.name for f in fields(cls)} - {"model", "extra"}
        spec = ("model_type", "hyperparameters", "contrasts", "shape")
        sections: dict[str, Callable[[Any], Any]] = {
            "preprocessing": PreprocConfig.from_dict, "normalisation": Normalisation.from_dict,
            "training": TrainingRecord.from_dict, "calibration": Calibration.from_dict}
        kwargs = {k: d[k] for k in top if d.get(k) is not None}
        for key, parse in sections.items():
            if key in kwargs:
                kwargs[key] = parse(kwargs[key])
        kwargs["resolution"] = int(d["resolution"])
        extra = {k: v for k, v in d.items() if k not in top and k not in spec}
        return cls(model=ModelSpec.from_dict(d), extra=_plain(extra), **kwargs)

    @classmethod
    def from_json(cls, text: str, source: str = "model.json") -> ModelCard:
        try:
            return card_from_dict(json.loads(text), source)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{source} is not valid JSON: {exc}") from exc


def migrate_1_0(d: dict) -> dict:
    """1.0 → 1.1. The layout is the same; what early 1.0 cards lack gets the value they were
    written with: checksums were always sha256 and the space was the template."""
    d = dict(d)
    d.setdefault("checksum_algorithm", CHECKSUM_ALGORITHM)
    d.setdefault("space", d.get("template"))
    d["schema_version"] = "1.1"
    return d


# version → the function that takes a card of that version one step forward
MIGRATIONS: dict[str, Callable[[dict], dict]] = {"1.0": migrate_1_0}


def card_from_dict(d: Mapping, source: str = "model.json") -> ModelCard:
    """The typed card of a ``model.json`` document, older schemas migrated; a version this
    bids-anomaly does not know (a newer one) is refused with a :class:`BundleError`."""
    if not isinstance(d, Mapping):
        raise BundleError(f"{source}: a model card must be a JSON object")
    d = dict(d)
    version = str(d.get("schema_version", ""))
    while version != CARD_SCHEMA:
        if version not in MIGRATIONS:
            raise BundleError(
                f"{source}: bundle schema version {version or 'missing'} is not supported "
                f"(this bids-anomaly reads {CARD_SCHEMA} and migrates "
                f"{', '.join(MIGRATIONS)}; a newer bids-anomaly may read it)")
        d = MIGRATIONS[version](d)
        version = str(d["schema_version"])
    algorithm = d.get("checksum_algorithm", CHECKSUM_ALGORITHM)
    if algorithm != CHECKSUM_ALGORITHM:
        raise BundleError(f"{source}: checksum algorithm '{algorithm}' is not supported "
                          f"(this bids-anomaly verifies {CHECKSUM_ALGORITHM})")
    if not isinstance(d.get("files", {}), dict):
        raise BundleError(f"{source}: 'files' must map file names to checksums")
    try:
        return ModelCard.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: the model card cannot be read: "
                          f"{type(exc).__name__}: {exc}") from exc


def with_model(card: ModelCard, model: AnomalyModel, files: dict[str, str]) -> ModelCard:
    """``card`` with ``model``'s spec and the bundle files' checksums (what the writer adds)."""
    return replace(card, model=ModelSpec.of(model), files=dict(files),
                   checksum_algorithm=CHECKSUM_ALGORITHM, schema_version=CARD_SCHEMA)
