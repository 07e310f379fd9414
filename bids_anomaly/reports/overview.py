"""The group report's overview mosaic: one row of thumbnails per scan (slicesdir style).

Rows are ordered flagged first, then by score (highest first), failed scans last; each row
links to the scan's section of its participant report. The rows follow the table's filter
(search box, "flagged only") and highlight together with the table row and the score point.
Thumbnails are the participant level's JPEG strips (:mod:`.thumbnails`), inlined as data URIs
(a few kB each: 200 scans stay near 1 MB).
"""

from __future__ import annotations

import base64
from pathlib import Path

from ..core.naming import ScanKey, ScanOutputs
from .assets import asset
from .html import esc, is_missing
from .loaders import key_from_name, strip_prefix
from .thumbnails import thumbnail_from_derivatives, write_thumbnail

__all__ = ["OVERVIEW_CSS", "OVERVIEW_JS", "overview_html", "thumbnail_uris"]


def _key(row: dict[str, str]) -> ScanKey | None:
    """The row's scan: from its scan id, else from its participant/session/run columns."""
    sid = row.get("scan_id")
    key = key_from_name(str(sid)) if not is_missing(sid) else ScanKey("")
    sub = key.subject or strip_prefix(row.get("participant_id"), "sub")
    if not sub:
        return None
    return ScanKey(sub, key.session or strip_prefix(row.get("session_id"), "ses"),
                   key.run or strip_prefix(row.get("run"), "run"), key.acquisition)


def thumbnail_uris(output_dir: Path, rows: list[dict[str, str]], failed: list[bool],
                   build_missing: bool = True) -> list[str | None]:
    """A JPEG data URI per row (None: no thumbnail). A scored scan without its strip (older
    outputs) gets one drawn from its derivatives, and written for the next report."""
    out: list[str | None] = []
    for row, bad in zip(rows, failed):
        key = _key(row)
        data = None
        if key is not None and not bad:
            path = output_dir / ScanOutputs(key).thumbnail
            if path.is_file():
                data = path.read_bytes()
            elif build_missing:
                written = write_thumbnail(output_dir, key)
                data = written.read_bytes() if written else thumbnail_from_derivatives(
                    output_dir, key)
        out.append("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
                   if data else None)
    return out


def overview_html(n_thumbs: int, n_rows: int) -> str:
    """The section; the rows are built by :data:`OVERVIEW_JS` from the report's data."""
    missing = n_rows - n_thumbs
    note = (f" {missing} scan(s) have no thumbnail (failed, or no derivatives): a placeholder "
            "stands in." if missing else "")
    return (
        '<h2 id="overview-title">Overview</h2>'
        '<p class="muted small">Every scan: axial slices of the preprocessed T1w in template '
        "space with the anomaly overlay (hot colours above the voxel threshold, the mask "
        "outlined). Flagged scans first, then by score. Hover a row to find it in the table "
        f"and the score plot; click it to open the participant report.{esc(note)}</p>"
        '<div id="overview" class="ov" data-testid="overview" role="list"></div>'
    )


OVERVIEW_CSS = asset("overview.css")

# Runs after the table script, which exposes window.bidsAnomalyGroup (data, filter, highlight).
OVERVIEW_JS = asset("overview.js")
