"""The group report's HTML pieces: score plot, scan table, failures, crash files, reference.

Each takes data already assembled by :mod:`.group` and returns an HTML fragment."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from .html import NA, crash_list, esc, fmt_num, fmt_score, is_missing, to_float
from .loaders import crash_files


def reference_html(reference: dict[str, Any]) -> str:
    """How many healthy scans the percentiles, flags and thresholds rest on (and a warning)."""
    healthy = reference.get("healthy_scores") or []
    if not healthy:
        return ('<p class="muted small" data-testid="reference-size">No healthy reference '
                "scores found in the scans' records.</p>")
    status = reference.get("status") or {}
    n = status.get("n_scans", len(healthy))
    cohort = status.get("cohort") if isinstance(status.get("cohort"), dict) else {}
    where = f" ({esc(cohort.get('dataset'))})" if cohort.get("dataset") else ""
    model = f" of model <b>{esc(reference['model'])}</b>" if reference.get("model") else ""
    text = (f"Percentiles, flags and voxel thresholds rest on <b>{esc(fmt_num(n, 0))}</b> "
            f"healthy reference scans{model}{where}.")
    if status.get("level") in ("warning", "refused"):
        msg = str(status.get("message", ""))
        return (f'<div class="error" data-testid="reference-size"><b>Small healthy '
                f"reference.</b> {text} {esc(msg[:1].upper() + msg[1:])}</div>")
    return f'<p data-testid="reference-size">{text}</p>'


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * span:
        out.append(round(v, 10))
        v += step
    return out


def _jitter(key: str) -> float:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:6], 16) / 0xFFFFFF


def score_svg(rows: list[dict[str, str]], ids: list[str], flagged: list[bool | None],
               reference: dict[str, Any]) -> str:
    scores = [to_float(r.get("score")) for r in rows]
    pts = [(i, s) for i, s in enumerate(scores) if s is not None]
    healthy = reference.get("healthy_scores") or []
    thr = reference.get("threshold")
    values = [s for _, s in pts] + list(healthy) + ([thr] if thr is not None else [])
    if not values:
        return '<p class="muted" data-testid="score-plot">No scores to plot.</p>'
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.04 or 0.5
    lo, hi = lo - pad, hi + pad
    w, h, left, right, top = 960, 230, 40, 16, 10
    band_scans = (top, 130)  # y range of scan points
    base = 200  # x axis position; the healthy histogram sits between 140 and 200

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (w - left - right)

    parts = [f'<svg id="score-plot" data-testid="score-plot" viewBox="0 0 {w} {h}" '
             f'width="100%" style="max-width:{w}px" role="img" '
             'aria-label="anomaly scores of all scans">']
    if healthy:
        nb = min(40, max(8, int(math.sqrt(len(healthy))) * 2))
        width = (hi - lo) / nb
        counts = [0] * nb
        for v in healthy:
            counts[min(nb - 1, int((v - lo) / width))] += 1
        cmax = max(counts)
        for b, c in enumerate(counts):
            if c:
                bh = 55 * c / cmax
                parts.append(f'<rect class="bar" x="{x(lo + b * width):.1f}" y="{base - bh:.1f}" '
                             f'width="{max(1.0, x(lo + width) - x(lo) - 1):.1f}" '
                             f'height="{bh:.1f}"></rect>')
    parts.append(f'<line class="axis" x1="{left}" x2="{w - right}" y1="{base}" y2="{base}"></line>')
    for t in _ticks(lo, hi):
        parts.append(f'<line class="axis" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{base}" '
                     f'y2="{base + 4}"></line><text x="{x(t):.1f}" y="{base + 16}" '
                     f'text-anchor="middle">{esc(fmt_num(t, 4))}</text>')
    if thr is not None:
        parts.append(f'<line x1="{x(thr):.1f}" x2="{x(thr):.1f}" y1="{top}" y2="{base}" '
                     'stroke="#555" stroke-dasharray="4 3"><title>flag threshold '
                     f"{esc(fmt_score(thr))}</title></line>")
    span = band_scans[1] - band_scans[0]
    for i, s in pts:
        f = flagged[i]
        cls = "flagged" if f is True else "normal" if f is False else "unknown"
        cy = band_scans[0] + 6 + _jitter(ids[i]) * (span - 12)
        parts.append(f'<circle id="pt-{i}" class="pt {cls}" data-i="{i}" '
                     f'data-testid="point-{esc(ids[i])}" cx="{x(s):.1f}" cy="{cy:.1f}" r="4">'
                     f"<title>{esc(ids[i])}: {esc(fmt_score(s))}</title></circle>")
    parts.append(f'<text x="{w - right}" y="{h - 2}" text-anchor="end">anomaly score</text>')
    parts.append("</svg>")
    model = reference.get("model")
    ref_txt = (f"grey bars: healthy reference scores (n={len(healthy)}"
               + (f", model {esc(model)}" if model else "") + ")") if healthy else ""
    legend = ('<p class="legend small muted"><span>● red: flagged</span><span>● green: normal'
              "</span>" + (f"<span>{ref_txt}</span>" if ref_txt else "")
              + ("<span>dashed: flag threshold</span>" if thr is not None else "")
              + "<span>hover a row to find its point; click a point to find its row</span></p>")
    return "".join(parts) + legend


def table_html(columns: list[str], numeric: list[str]) -> str:
    heads = []
    for c in columns:
        cls = ' class="num"' if c in numeric else ""
        heads.append(f'<th data-col="{esc(c)}" data-testid="th-{esc(c)}" aria-sort="none" '
                     f'tabindex="0" scope="col"{cls}>{esc(c)}</th>')
    heads.append('<th data-col="_rating" data-testid="th-rating" aria-sort="none" tabindex="0" '
                 'scope="col">rating</th>')
    return (
        "<h2>Scans</h2>"
        '<div class="controls">'
        '<input type="search" id="filter-text" data-testid="filter-text" '
        'placeholder="filter (any column)" aria-label="filter rows">'
        '<label><input type="checkbox" id="flagged-only" data-testid="flagged-only"> '
        "flagged only</label>"
        '<span id="row-count" class="muted" data-testid="row-count"></span></div>'
        '<div class="controls">'
        '<button type="button" id="export-json" data-testid="export-json">Export ratings (JSON)'
        "</button>"
        '<button type="button" id="export-tsv" data-testid="export-tsv">Export ratings (TSV)'
        "</button>"
        '<label class="small">import ratings (JSON) <input type="file" id="import-json" '
        'data-testid="import-json" accept=".json,application/json"></label>'
        '<span id="storage-info" class="muted small" data-testid="storage-info"></span></div>'
        '<p class="muted small">Click a column header to sort (again to reverse).</p>'
        '<div class="tablewrap"><table id="scan-table" data-testid="scan-table">'
        f"<thead><tr>{''.join(heads)}</tr></thead>"
        '<tbody id="scan-tbody" data-testid="scan-tbody"></tbody></table></div>'
    )


def failed_html(rows: list[dict[str, str]], ids: list[str], failed: list[bool],
                 links: list[str | None]) -> str:
    items = []
    for i, r in enumerate(rows):
        if not failed[i]:
            continue
        link = f' (<a href="{esc(links[i])}">report</a>)' if links[i] else ""
        err = r.get("error")
        items.append(f"<li><b>{esc(ids[i])}</b>{link}: status {esc(r.get('status', NA))}"
                     f'<div class="error">{esc(err if not is_missing(err) else "no error message")}'
                     "</div></li>")
    if not items:
        return ""
    return (f"<h2>Failed scans ({len(items)})</h2>"
            f'<ul data-testid="failed-scans">{"".join(items)}</ul>')


def crash_html(output_dir: Path) -> str:
    crashes = crash_files(output_dir)
    return crash_list(crashes) if crashes else ""
