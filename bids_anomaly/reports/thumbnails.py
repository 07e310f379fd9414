"""Overview thumbnails: one small JPEG strip per scan for the group report's mosaic.

The participant level writes ``sub-XX/figures/<scan>_desc-overview_thumb.jpg`` (a few axial
slices of the preprocessed T1w in template space with the anomaly overlay) next to the
participant report's figures. The group report inlines these files; for older outputs
without one it draws the strip from the derivatives (and keeps it), or shows a placeholder.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from ..core.atomic import write_bytes
from ..core.naming import ScanKey, ScanOutputs
from . import figures
from .loaders import load_volume

LOG = logging.getLogger("bids_anomaly")

N_SLICES = 4
SCALE = 1.0  # of the template grid: ~80 × 95 px per slice at 2 mm
JPEG_QUALITY = 70


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a float RGB image in [0, 1]."""
    from PIL import Image

    arr = np.clip(np.asarray(rgb, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def render_thumbnail(preproc: np.ndarray, statmap: np.ndarray | None, mask: np.ndarray | None,
                     threshold: float | None, brain_mask: np.ndarray | None = None) -> bytes:
    """The strip of one scan as JPEG bytes."""
    stat = statmap if statmap is not None else np.zeros_like(preproc)
    rgb = figures.anomaly_strip(preproc, stat, mask, threshold, brain_mask=brain_mask,
                                n_slices=N_SLICES, scale=SCALE)
    return encode_jpeg(rgb)


def thumbnail_from_derivatives(output_dir: Path, key: ScanKey, res: int = 2) -> bytes | None:
    """Draw the strip from the scan's template-space derivatives; None when they are missing."""
    outs = ScanOutputs(key, res=res)
    pre = load_volume(output_dir / outs.preproc("T1w"))
    if pre is None:
        return None
    stat, mask, brain = (load_volume(output_dir / p) for p in
                         (outs.template_statmap, outs.template_mask, outs.template_brain_mask))
    stat, mask, brain = (v if v is not None and v.shape == pre.shape else None
                         for v in (stat, mask, brain))
    return render_thumbnail(pre, stat, mask, _threshold(output_dir / outs.scores), brain)


def _threshold(scores: Path) -> float | None:
    try:
        rec = json.loads(scores.read_text())
        value = rec.get("voxel_threshold", rec.get("threshold"))
        return float(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def write_thumbnail(output_dir: Path, key: ScanKey, res: int = 2) -> Path | None:
    """Write the scan's strip atomically; its path, or None (logged) when it cannot be drawn.

    Never raises: a missing thumbnail only costs the group report a placeholder."""
    try:
        data = thumbnail_from_derivatives(output_dir, key, res)
        if data is None:
            LOG.warning("%s: no preprocessed T1w in template space; no overview thumbnail",
                        key.scan_id)
            return None
        return write_bytes(output_dir / ScanOutputs(key, res=res).thumbnail, data)
    except Exception as exc:  # noqa: BLE001 - a figure must never fail the scan
        LOG.warning("%s: overview thumbnail failed: %s", key.scan_id, exc)
        return None
