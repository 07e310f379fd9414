"""Read what the scoring pipeline left in OUTPUT_DIR, tolerating missing or broken pieces.

A report must still be written when a scan failed half-way, so every reader here returns
``None`` / an empty value (and a message) instead of raising on a missing or unreadable file.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.naming import ScanKey, ScanOutputs, build_name, sidecar

SCORES_GLOB = "*_desc-anomaly_scores.json"
GROUP_TSV = "group_anomaly.tsv"  # written by the group level, read by its report
_ENTITY = re.compile(r"(?:^|_)(sub|ses|acq|run)-([A-Za-z0-9]+)")


def strip_prefix(label: Any, prefix: str) -> str | None:
    if label is None:
        return None
    s = str(label).strip()
    if s.lower() in ("", "n/a", "none", "null"):
        return None
    return s[len(prefix) + 1 :] if s.startswith(prefix + "-") else s


def key_from_scores_path(path: Path) -> ScanKey:
    """The ScanKey encoded in a ``..._desc-anomaly_scores.json`` file name."""
    return key_from_name(path.name[: -len(SCORES_GLOB) + 1])


def key_from_name(name: str) -> ScanKey:
    """The ScanKey of a scan id or file name stem (``sub-01_ses-1_run-2``; sub may be '')."""
    ents = dict(_ENTITY.findall(name))
    return ScanKey(ents.get("sub", ""), ents.get("ses"), ents.get("run"), ents.get("acq"))


def read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"missing file {path.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"cannot read {path.name}: {exc}"
    if not isinstance(obj, dict):
        return None, f"{path.name} does not hold a JSON object"
    return obj, None


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a TSV (values as strings, missing cells as ``n/a``)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        rows = []
        for raw in reader:
            rows.append({c: ("n/a" if raw.get(c) in (None, "") else str(raw[c])) for c in columns})
    return columns, rows


def load_volume(path: Path) -> np.ndarray | None:
    """A 3-D float32 array (first volume of 4-D images) or None when missing/unreadable."""
    if not path.is_file():
        return None
    try:
        import nibabel as nb

        data = np.asarray(nb.load(str(path)).dataobj, dtype=np.float32)
    except Exception:  # noqa: BLE001 - any unreadable image is reported as absent
        return None
    while data.ndim > 3:
        data = data[..., 0]
    return data if data.ndim == 3 else None


def read_head(path: Path, max_lines: int = 6, max_chars: int = 400) -> list[str] | None:
    """First lines of a text file; None for binary files (e.g. nipype ``.pklz``)."""
    try:
        with open(path, "rb") as fh:
            chunk = fh.read(8192)
    except OSError:
        return None
    if b"\x00" in chunk or path.suffix in (".pklz", ".pkl", ".gz"):
        return None
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        text = chunk.decode("utf-8", errors="replace")
    lines = [ln[:max_chars] for ln in text.splitlines() if ln.strip()]
    return lines[:max_lines]


@dataclass
class CrashFile:
    path: Path  # relative to OUTPUT_DIR
    head: list[str] | None  # first lines when it is text

    def mentions(self, subject: str) -> bool:
        token = f"sub-{subject}"
        text = str(self.path) + "\n" + "\n".join(self.head or [])
        return re.search(re.escape(token) + r"(?![A-Za-z0-9])", text) is not None


def crash_files(output_dir: Path, limit: int = 200) -> list[CrashFile]:
    logs = output_dir / "logs"
    if not logs.is_dir():
        return []
    found = sorted(p for p in logs.rglob("crash-*") if p.is_file())[:limit]
    return [CrashFile(p.relative_to(output_dir), read_head(p)) for p in found]


@dataclass
class ScanRecord:
    """One scan of a participant: its scores record and derivative paths."""

    key: ScanKey
    scores_path: Path  # absolute
    scores: dict[str, Any] = field(default_factory=dict)
    read_error: str | None = None
    outputs: ScanOutputs | None = None

    @property
    def scan_id(self) -> str:
        sid = self.scores.get("scan_id")
        return str(sid) if sid else self.key.scan_id

    @property
    def status(self) -> str:
        if self.read_error:
            return "failed"
        return str(self.scores.get("status") or "unknown")

    @property
    def failed(self) -> bool:
        return self.status.lower() not in ("ok", "success", "succeeded")

    @property
    def error(self) -> str | None:
        err = self.scores.get("error")
        return self.read_error or (str(err) if err not in (None, "") else None)


def find_scans(output_dir: Path, subject: str) -> list[ScanRecord]:
    """Every scores record under ``sub-<subject>/`` sorted by session, acquisition, run."""
    root = output_dir / f"sub-{subject}"
    if not root.is_dir():
        return []
    records = []
    for path in sorted(root.rglob(SCORES_GLOB)):
        key = key_from_scores_path(path)
        if key.subject != subject:
            continue
        scores, err = read_json(path)
        rec = ScanRecord(key, path, scores or {}, err)
        rec.outputs = _outputs_for(output_dir, key)
        records.append(rec)
    records.sort(key=lambda r: (r.key.session or "", r.key.acquisition or "", _run_key(r.key.run)))
    return records


def _run_key(run: str | None) -> tuple[int, str]:
    if run is None:
        return (-1, "")
    return (int(run), run) if run.isdigit() else (10**9, run)


def _outputs_for(output_dir: Path, key: ScanKey) -> ScanOutputs:
    """Outputs on the 2 mm grid, or 1 mm when only those exist."""
    for res in (2, 1):
        out = ScanOutputs(key, res=res)
        if (output_dir / out.template_statmap).exists() or (output_dir / out.preproc()).exists():
            return out
    return ScanOutputs(key)


# --------------------------------------------------------------------------- native input QC

_RAW_PREFIX = "bids:raw:"
QC_SPACING_MM = 1.5  # display grid of the native QC figure (coarser input grids are kept)


def _raw_roots(output_dir: Path) -> list[Path]:
    """Where the raw dataset may be: the derivative's DatasetLinks/SourceDatasets (file URIs),
    then the folders above OUTPUT_DIR (``BIDS_DIR/derivatives/bids-anomaly``)."""
    from urllib.parse import unquote, urlparse

    roots: list[Path] = []
    desc, _ = read_json(output_dir / "dataset_description.json")
    uris: list[Any] = []
    if desc:
        links = desc.get("DatasetLinks")
        uris.append(links.get("raw") if isinstance(links, dict) else None)
        for src in desc.get("SourceDatasets") or []:
            uris.append(src.get("URL") if isinstance(src, dict) else None)
    for uri in uris:
        if isinstance(uri, str) and uri.startswith("file:"):
            roots.append(Path(unquote(urlparse(uri).path)))
    roots.extend(list(output_dir.resolve().parents)[:3])
    return roots


def native_input_path(output_dir: Path, outs: ScanOutputs) -> Path | None:
    """The raw T1w a scan's native brain mask was computed on (from the mask sidecar's
    ``Sources``, resolved against the raw dataset), or None when it cannot be found."""
    mask = output_dir / outs.native_brain_mask
    if not mask.is_file():
        return None
    meta, _ = read_json(output_dir / sidecar(outs.native_brain_mask))
    sources = meta.get("Sources") if meta else None
    rels = [s[len(_RAW_PREFIX):] for s in sources or [] if isinstance(s, str)
            and s.startswith(_RAW_PREFIX)]
    rels.append((outs.key.subdir / build_name(outs.key, "T1w")).as_posix())
    for root in _raw_roots(output_dir):
        for rel in rels:
            path = (root / rel).resolve()
            if root.resolve() in path.parents and path.is_file():
                return path
    return None


def load_native_qc(output_dir: Path, outs: ScanOutputs,
                   spacing: float = QC_SPACING_MM) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """Native input T1w, its brain mask (RAS voxel axes, cropped to the mask, isotropic display
    grid) and the input's path; None when either is missing, unreadable or off-grid."""
    input_path = native_input_path(output_dir, outs)
    if input_path is None:
        return None
    try:
        import nibabel as nb
        from scipy import ndimage

        img = nb.as_closest_canonical(nb.load(str(input_path)))
        msk = nb.as_closest_canonical(nb.load(str(output_dir / outs.native_brain_mask)))
        data = np.asarray(img.dataobj, dtype=np.float32)
        while data.ndim > 3:
            data = data[..., 0]
        mask = np.asarray(msk.dataobj) > 0
        while mask.ndim > 3:
            mask = mask[..., 0]
        if data.shape != mask.shape or not np.allclose(img.affine, msk.affine, atol=1e-3):
            return None  # the mask is not on this input's grid (input changed since scoring)
        if not mask.any():
            return None
        idx = np.argwhere(mask)
        margin = 8
        box = tuple(slice(max(lo - margin, 0), hi + margin + 1)
                    for lo, hi in zip(idx.min(0), idx.max(0)))
        data, mask = data[box], mask[box]
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
        target = max(float(zooms.min()), spacing)
        factors = zooms / target
        if not np.allclose(factors, 1.0, atol=0.01):
            data = ndimage.zoom(data, factors, order=1, grid_mode=True, mode="nearest")
            mask = ndimage.zoom(mask.astype(np.uint8), factors, order=0, grid_mode=True,
                                mode="nearest") > 0
    except Exception:  # noqa: BLE001 - a QC figure is optional
        return None
    return data, mask, input_path
