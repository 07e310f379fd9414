"""The model bundle: a directory of data (JSON + safetensors), never code.

``model.json`` is the model card (:class:`~bids_anomaly.models.card.ModelCard`) and the
contract between training and scoring (nnU-Net plans style): model type and
hyper-parameters, contrasts, template, resolution, the preprocessing recipe, calibration and
the sha256 of every data file. Weights load through safetensors only; nothing is unpickled,
so a bundle from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..calibration.types import Calibration, NormativeMaps
from ..core.errors import BundleError
from ..core.reference import file_sha256 as sha256
from .base import AnomalyModel
from .card import CARD_SCHEMA, ModelCard, ModelSpec, card_from_dict, with_model
from .registry import get_model_class

WEIGHTS = "weights.safetensors"
NORMATIVE = "normative.safetensors"
CARD = "model.json"


@dataclass
class Bundle:
    """A loaded bundle: the model and its typed card (the calibration included)."""

    path: Path
    model: AnomalyModel
    model_card: ModelCard

    @property
    def card(self) -> dict:
        """The card as plain JSON, the document of ``model.json`` (for scripts and tests)."""
        return self.model_card.to_dict()

    @property
    def calibration(self) -> Calibration:
        return self.model_card.calibration

    @property
    def name(self) -> str:
        return self.model_card.name

    @property
    def weights_sha256(self) -> str:
        return self.model_card.files[WEIGHTS]

    def check_fits(self, contrasts: list[str], template: str, resolution: int) -> None:
        """Refuse scans whose contrasts, template or resolution differ from the bundle's."""
        card = self.model_card
        if sorted(contrasts) != sorted(card.contrasts):
            raise BundleError(
                f"model bundle {self.path} expects contrasts {list(card.contrasts)}, "
                f"the scan provides {list(contrasts)}"
            )
        if template != card.template:
            raise BundleError(
                f"model bundle {self.path} is in template {card.template}, not {template}"
            )
        if int(resolution) != card.resolution:
            raise BundleError(
                f"model bundle {self.path} works at {card.resolution} mm, not {resolution} mm"
            )


def save_bundle(dest: Path, model: AnomalyModel, card: ModelCard | Mapping,
                calibration: Calibration | None = None,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a bundle directory atomically (built in a temp dir, then renamed into place).

    ``card`` is the typed card training built, or a partial JSON card (name, template,
    resolution, ...) that ``model`` and ``calibration`` complete; the writer adds the model's
    spec and every file's checksum."""
    from safetensors.torch import save_file

    if not isinstance(card, ModelCard):
        if calibration is None:
            raise ValueError("a partial card needs its calibration")
        card = card_from_dict({**card, "schema_version": CARD_SCHEMA,
                               **ModelSpec.of(model).to_dict(),
                               "calibration": calibration.to_dict()})
    if calibration is not None:
        card = replace(card, calibration=calibration)
    calibration = card.calibration

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file(model.state_dict(), str(tmp / WEIGHTS))
        if calibration.normative is not None:
            from safetensors.numpy import save_file as save_arrays

            # float16 halves the size; calibration computed its thresholds on these values.
            dtype = NormativeMaps.STORAGE_DTYPE
            save_arrays({"mean": calibration.normative.mean.astype(dtype),
                         "sd": calibration.normative.sd.astype(dtype)},
                        str(tmp / NORMATIVE))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CARD).write_text(with_model(card, model, files).to_json())
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # readable by any UID (shared bundles on clusters)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def load_bundle(path: Path) -> Bundle:
    """Load and verify a bundle (schema version, sha256 of every file, weight names); an
    older card is migrated, a newer one refused (:func:`~.card.card_from_dict`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card_path = path / CARD
    if not card_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {CARD} is missing")
    try:
        doc = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path} is not valid JSON: {exc}") from exc
    card = card_from_dict(doc, str(card_path))
    for name, digest in card.files.items():
        f = _bundle_file(path, name)
        if not f.is_file():
            raise BundleError(f"model bundle {path}: {name} is missing")
        if sha256(f) != digest:
            raise BundleError(
                f"model bundle {path}: checksum of {name} does not match model.json "
                "(file corrupt or modified)"
            )
    if WEIGHTS not in card.files:
        raise BundleError(f"model bundle {path}: {WEIGHTS} is not listed in {CARD}")
    try:
        cls = get_model_class(card.model.model_type)
        # Hyper-parameters the card predates keep the value they had then.
        hparams = {**cls.legacy_defaults, **card.model.hyperparameters}
        model = cls(list(card.contrasts), card.model.shape, hparams)
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state)
        if NORMATIVE in card.files:
            card.calibration.normative = _load_normative(path / NORMATIVE, model)
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BundleError(f"model bundle {path} cannot be loaded: {exc}") from exc
    return Bundle(path, model, card)


def _bundle_file(bundle: Path, name: object) -> Path:
    """``bundle / name`` for a plain file name of the bundle; anything else is refused.

    A card is data from elsewhere: a name with a folder, ``..``, an absolute path, a hidden
    name or a link would make the loader read (and hash) a file outside the bundle."""
    ok = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
          and "\\" not in name and "\0" not in name and not name.startswith("."))
    if not ok:
        raise BundleError(f"model bundle {bundle}: {CARD} lists '{name}', which is not a plain "
                          "file name inside the bundle (refused)")
    f = bundle / name
    if f.is_symlink():
        raise BundleError(f"model bundle {bundle}: {name} is a symbolic link (refused: bundle "
                          "files must be plain files inside the bundle)")
    return f


def _load_normative(path: Path, model: AnomalyModel) -> NormativeMaps:
    from safetensors.numpy import load_file as load_arrays

    arrays = load_arrays(str(path))
    want = (len(model.contrasts), *model.shape)
    maps = NormativeMaps(arrays["mean"].astype(np.float32), arrays["sd"].astype(np.float32))
    for name, a in (("mean", maps.mean), ("sd", maps.sd)):
        if a.shape != want:
            raise ValueError(f"{path.name}: {name} has shape {a.shape}, the card needs {want}")
    if not (maps.sd > 0).all():
        raise ValueError(f"{path.name}: sd must be positive everywhere")
    return maps
