"""Self-contained group report: every scan of ``group_anomaly.tsv`` in one sortable table.

``build_group_report(output_dir)`` writes ``OUTPUT_DIR/group_report.html``. The table is
rendered by inline JS from embedded JSON (fast with thousands of rows), the score
distribution is an inline SVG with one point per scan, and each scan has a rating widget
(accept / review / reject + comment) stored in the browser's localStorage under a key that
includes the dataset path; ratings export to JSON or TSV offline (Blob download).

When ``bids-anomaly evaluate`` has written ``evaluation_pooled.tsv`` (and
``evaluation_scans.tsv``) into the output directory, an "Evaluation" section shows the
pooled voxel metrics, the scan-level AUROC and the per-scan table; without those files the
section is left out.
"""

from __future__ import annotations

import datetime as _dt
import glob
import logging
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.atomic import write_text
from .assets import asset
from .group_evaluation import (  # noqa: F401  (the evaluation tables' names, re-exported)
    EVAL_POOLED_TSV,
    EVAL_SCANS_TSV,
    ORACLE_LABEL,
    evaluation_html,
)
from .group_sections import (
    crash_html,
    failed_html,
    reference_html,
    score_svg,
    table_html,
)
from .html import (
    AGEING_NOTE,
    NA,
    esc,
    is_missing,
    json_script,
    page,
    safe_relative_href,
    to_bool,
    to_float,
)
from .loaders import GROUP_TSV, SCORES_GLOB, read_json, read_tsv, strip_prefix
from .overview import OVERVIEW_CSS, OVERVIEW_JS, overview_html, thumbnail_uris

__all__ = ["build_group_report", "GROUP_TSV", "GROUP_REPORT", "EVAL_POOLED_TSV",
           "EVAL_SCANS_TSV"]

log = logging.getLogger(__name__)

GROUP_REPORT = "group_report.html"
STORAGE_PREFIX = "bids-anomaly:ratings:"
_NON_NUMERIC = {"participant_id", "session_id", "run", "scan_id", "model", "flagged", "status",
                "error", "report"}

_CSS = asset("group.css") + OVERVIEW_CSS

_JS = asset("group.js") + OVERVIEW_JS


def build_group_report(output_dir: Path) -> Path:
    """Write ``OUTPUT_DIR/group_report.html`` from ``group_anomaly.tsv`` and return its path."""
    output_dir = Path(output_dir)
    tsv = output_dir / GROUP_TSV
    problem = None
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    if tsv.is_file():
        try:
            columns, rows = read_tsv(tsv)
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot read {GROUP_TSV}: {exc}"
    else:
        problem = f"{GROUP_TSV} not found in the output directory"
    if problem:
        log.warning("group report: %s", problem)
    text = _render(output_dir, columns, rows, problem)
    return write_text(output_dir / GROUP_REPORT, text)


def _render(output_dir: Path, columns: list[str], rows: list[dict[str, str]],
            problem: str | None) -> str:
    dataset = str(output_dir.resolve())
    numeric = [c for c in columns if _is_numeric(c, rows)]
    ids = _row_ids(rows)
    flagged = [to_bool(r.get("flagged")) for r in rows]
    failed = [_is_failed(r) for r in rows]
    links = [_link(output_dir, r) for r in rows]
    data_rows = [{c: (to_float(r[c]) if c in numeric else r[c]) for c in columns} for r in rows]
    reference = _reference(output_dir, rows)
    thumbs = thumbnail_uris(output_dir, rows, failed)
    data = {
        "dataset": dataset,
        "storage_key": STORAGE_PREFIX + dataset,
        "columns": columns,
        "numeric": numeric,
        "rows": data_rows,
        "ids": ids,
        "flagged": flagged,
        "failed": failed,
        "links": links,
        "healthy_scores": reference.get("healthy_scores", []),
        "reference_model": reference.get("model"),
        "thumbs": thumbs,
    }
    n_part = len({r.get("participant_id") for r in rows})
    n_flag = sum(1 for f in flagged if f is True)
    n_fail = sum(failed)
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    body = [
        "<h1>Anomaly detection: group report</h1>",
        f'<p class="muted small">bids-anomaly {esc(__version__)} · generated {esc(now)} · '
        f"dataset <code>{esc(dataset)}</code></p>",
        f'<p data-testid="summary"><b>{len(rows)}</b> scans of <b>{n_part}</b> participants · '
        f'<span class="badge flagged">{n_flag} flagged</span> '
        f'<span class="badge failed">{n_fail} failed</span></p>',
        f'<div class="note" data-testid="ageing-note"><b>Interpretation.</b> {esc(AGEING_NOTE)}'
        "</div>",
    ]
    if problem:
        body.append(f'<div class="error" data-testid="group-error">{esc(problem)}</div>')
    body.append("<h2>Score distribution</h2>")
    body.append(score_svg(rows, ids, flagged, reference))
    body.append(reference_html(reference))
    if rows:
        body.append(overview_html(sum(1 for t in thumbs if t), len(rows)))
    body.append(table_html(columns, numeric))
    body.append(failed_html(rows, ids, failed, links))
    body.append(evaluation_html(output_dir))
    body.append(crash_html(output_dir))
    body.append(json_script(data, "report-data"))
    body.append('<noscript><p class="error">The scan table needs JavaScript.</p></noscript>')
    return page("bids-anomaly group report", "\n".join(body), css=_CSS, script=_JS)


# --------------------------------------------------------------------------- data helpers


def _is_numeric(column: str, rows: list[dict[str, str]]) -> bool:
    if column in _NON_NUMERIC:
        return False
    seen = False
    for r in rows:
        v = r.get(column)
        if is_missing(v):
            continue
        if to_float(v) is None:
            return False
        seen = True
    return seen


def _row_ids(rows: list[dict[str, str]]) -> list[str]:
    """Unique rating keys: scan_id (plus model, then row number, for duplicates)."""
    ids: list[str] = []
    seen: set[str] = set()
    for i, r in enumerate(rows):
        base = r.get("scan_id")
        if is_missing(base):
            parts = [r.get("participant_id"), r.get("session_id"), r.get("run")]
            base = "_".join(str(p) for p in parts if not is_missing(p)) or f"row{i + 1}"
        rid = str(base)
        if rid in seen and not is_missing(r.get("model")):
            rid = f"{base}@{r['model']}"
        if rid in seen:
            rid = f"{base}#{i + 1}"
        seen.add(rid)
        ids.append(rid)
    return ids


def _is_failed(row: dict[str, str]) -> bool:
    status = str(row.get("status", NA)).strip().lower()
    if status in ("ok", "success", "succeeded"):
        return False
    return status not in ("n/a", "") or not is_missing(row.get("error"))


def _link(output_dir: Path, row: dict[str, str]) -> str | None:
    href = safe_relative_href(row.get("report"))
    if href:
        return href
    sub = strip_prefix(row.get("participant_id"), "sub")
    if sub and (output_dir / f"sub-{sub}.html").is_file():
        return safe_relative_href(f"sub-{sub}.html")
    return None


def _reference(output_dir: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Healthy reference scores and threshold from the first scores record that has them."""
    tried = 0
    for r in rows:
        sub = strip_prefix(r.get("participant_id"), "sub")
        if not sub or _is_failed(r) or tried >= 5:
            continue
        tried += 1
        root = output_dir / f"sub-{sub}"
        if not root.is_dir():
            continue
        sid = r.get("scan_id")
        pattern = SCORES_GLOB if is_missing(sid) else glob.escape(sid) + SCORES_GLOB[1:]
        candidates = sorted(root.rglob(pattern))
        for path in candidates[:3]:
            obj, _ = read_json(path)
            if not obj:
                continue
            healthy = [v for v in (to_float(x) for x in obj.get("healthy_scores") or [])
                       if v is not None]
            if healthy:
                model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
                ref = obj.get("reference") if isinstance(obj.get("reference"), dict) else {}
                return {"healthy_scores": healthy, "threshold": to_float(obj.get("threshold")),
                        "model": model.get("name"), "status": ref}
    return {}



