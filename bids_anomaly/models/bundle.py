"""The model bundle: a directory of data (JSON + safetensors), never code.

``model.json`` is the model card and the contract between training and scoring (nnU-Net
plans style): model type and hyper-parameters, contrasts, template, resolution, the
preprocessing recipe, calibration and the sha256 of every data file. Weights load through
safetensors only; nothing is unpickled, so a bundle from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration.types import Calibration, NormativeMaps
from ..core.errors import BundleError
from ..core.reference import file_sha256 as sha256
from .base import AnomalyModel
from .registry import get_model_class

SCHEMA_VERSION = "1.0"
WEIGHTS = "weights.safetensors"
NORMATIVE = "normative.safetensors"
CARD = "model.json"
# The digest of every file listed under "files" in the card. Cards written before the
# algorithm was named (no "checksum_algorithm") used sha256 too.
CHECKSUM_ALGORITHM = "sha256"


@dataclass
class Bundle:
    """A loaded bundle: the model, its card and its calibration."""

    path: Path
    model: AnomalyModel
    card: dict
    calibration: Calibration

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def weights_sha256(self) -> str:
        return self.card["files"][WEIGHTS]

    def check_fits(self, contrasts: list[str], template: str, resolution: int) -> None:
        """Refuse scans whose contrasts, template or resolution differ from the bundle's."""
        if sorted(contrasts) != sorted(self.card["contrasts"]):
            raise BundleError(
                f"model bundle {self.path} expects contrasts {self.card['contrasts']}, "
                f"the scan provides {list(contrasts)}"
            )
        if template != self.card["template"]:
            raise BundleError(
                f"model bundle {self.path} is in template {self.card['template']}, not {template}"
            )
        if int(resolution) != int(self.card["resolution"]):
            raise BundleError(
                f"model bundle {self.path} works at {self.card['resolution']} mm, "
                f"not {resolution} mm"
            )


def save_bundle(dest: Path, model: AnomalyModel, card: dict, calibration: Calibration,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a bundle directory atomically (built in a temp dir, then renamed into place)."""
    from safetensors.torch import save_file

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
        full = {
            "schema_version": SCHEMA_VERSION,
            **card,
            "model_type": model.type_name,
            "hyperparameters": model.hparams,
            "contrasts": model.contrasts,
            "shape": list(model.shape),
            "calibration": calibration.to_dict(),
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "files": files,
        }
        (tmp / CARD).write_text(json.dumps(full, indent=2, default=str) + "\n")
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
    """Load and verify a bundle (schema version, sha256 of every file, weight names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card_path = path / CARD
    if not card_path.is_file():
        raise BundleError(f"{path} is not a model bundle: {CARD} is missing")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_path} is not valid JSON: {exc}") from exc
    version = str(card.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(
            f"{card_path}: bundle schema version {version or 'missing'} is not supported "
            f"(this bids-anomaly reads {SCHEMA_VERSION})"
        )
    algorithm = card.get("checksum_algorithm", CHECKSUM_ALGORITHM)
    if algorithm != CHECKSUM_ALGORITHM:
        raise BundleError(f"{card_path}: checksum algorithm '{algorithm}' is not supported "
                          f"(this bids-anomaly verifies {CHECKSUM_ALGORITHM})")
    files = card.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{card_path}: 'files' must map file names to checksums")
    for name, digest in files.items():
        f = _bundle_file(path, name)
        if not f.is_file():
            raise BundleError(f"model bundle {path}: {name} is missing")
        if sha256(f) != digest:
            raise BundleError(
                f"model bundle {path}: checksum of {name} does not match model.json "
                "(file corrupt or modified)"
            )
    if WEIGHTS not in card.get("files", {}):
        raise BundleError(f"model bundle {path}: {WEIGHTS} is not listed in {CARD}")
    try:
        cls = get_model_class(card["model_type"])
        hparams = {**cls.legacy_defaults, **card["hyperparameters"]}
        model = cls(card["contrasts"], tuple(card["shape"]), hparams)
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state)
        calibration = Calibration.from_dict(card["calibration"])
        if NORMATIVE in card["files"]:
            calibration.normative = _load_normative(path / NORMATIVE, model)
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BundleError(f"model bundle {path} cannot be loaded: {exc}") from exc
    return Bundle(path, model, card, calibration)


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
