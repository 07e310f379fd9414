"""Self-contained HTML report of one participant: every scan's score, maps, QC and provenance.

``build_participant_report(output_dir, "01")`` writes ``OUTPUT_DIR/sub-01.html`` (images
inlined as base64 PNG, CSS/JS inline, nothing fetched from the network) and the figure PNGs
into ``OUTPUT_DIR/sub-01/figures/``. Scans are the ``*_desc-anomaly_scores.json`` records
found under ``sub-01/``; missing images or failed scans are reported, never fatal.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.atomic import write_bytes, write_text
from ..core.naming import ScanOutputs
from . import figures
from .assets import asset
from .html import (
    AGEING_NOTE,
    NA,
    crash_list,
    esc,
    fmt_num,
    fmt_score,
    is_missing,
    kv_list,
    page,
    table,
    to_bool,
    to_float,
)
from .loaders import CrashFile, ScanRecord, crash_files, find_scans, read_tsv, strip_prefix
from .participant_figures import Level, figure_html, images_html, qc_html

__all__ = ["build_participant_report", "MAX_REPORT_BYTES"]

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 5 * 1024 * 1024
_BUDGET_BYTES = int(4.8 * 1024 * 1024)
_MAX_CLUSTER_ROWS = 100


_LEVELS = (
    Level(2.0, 1.5, 8),
    Level(1.5, 1.0, 8),
    Level(1.0, 1.0, 6),
    Level(1.0, 1.0, 6, qc=False),
    Level(1.0, 1.0, 6, qc=False, inline_all=False),
)

_JS = asset("participant.js")


def build_participant_report(output_dir: Path, subject: str) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` (and figure PNGs) and return its path."""
    output_dir = Path(output_dir)
    label = strip_prefix(subject, "sub") or str(subject)
    scans = find_scans(output_dir, label)
    crashes = crash_files(output_dir)
    n_images = sum(1 for s in scans if not s.failed)
    start = sum(n_images > n for n in (5, 10, 20, 40))
    text, pngs = "", {}
    for i, level in enumerate(_LEVELS[start:], start=start):
        text, pngs = _render(output_dir, label, scans, crashes, level)
        size = len(text.encode("utf-8"))
        if size <= _BUDGET_BYTES or i == len(_LEVELS) - 1:
            if size > MAX_REPORT_BYTES:
                log.warning("participant report of sub-%s is %.1f MB", label, size / 2**20)
            break
    for rel, data in pngs.items():
        write_bytes(output_dir / rel, data)
    return write_text(output_dir / f"sub-{label}.html", text)


# --------------------------------------------------------------------------- rendering


def _render(output_dir: Path, label: str, scans: list[ScanRecord], crashes: list[CrashFile],
            level: Level) -> tuple[str, dict[Path, bytes]]:
    pngs: dict[Path, bytes] = {}
    sections = [_scan_section(output_dir, rec, level, pngs) for rec in scans]
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    group_link = ""
    if (output_dir / "group_report.html").exists():
        group_link = ' · <a href="group_report.html">group report</a>'
    toc = "".join(
        f'<li><a href="#{esc(_anchor(r))}">{esc(r.scan_id)}</a> {_badge(r)} '
        f'<span class="muted small">score {esc(fmt_score(r.scores.get("score")))}</span></li>'
        for r in scans
    )
    body = [
        f"<h1>Anomaly report: sub-{esc(label)}</h1>",
        f'<p class="muted small">bids-anomaly {esc(__version__)} · generated {esc(now)}'
        f"{group_link}</p>",
        f'<div class="note" data-testid="ageing-note"><b>Interpretation.</b> {esc(AGEING_NOTE)}'
        "</div>",
    ]
    if not scans:
        body.append(f'<p class="error">No scores found under sub-{esc(label)}/.</p>')
    else:
        body.append(f'<h2>Scans ({len(scans)})</h2><ul class="toc">{toc}</ul>')
    body.extend(sections)
    body.append(_crash_section(label, scans, crashes))
    body.append(
        '<p class="muted small">Mosaics show axial slices from inferior to superior in '
        "template space, the subject's left on the image left. Figures are also saved as PNG "
        f"files in sub-{esc(label)}/figures/.</p>"
    )
    return page(f"sub-{label} anomaly report", "\n".join(body), script=_JS), pngs


def _anchor(rec: ScanRecord) -> str:
    return "scan-" + rec.key.scan_id


def _badge(rec: ScanRecord) -> str:
    if rec.failed:
        return '<span class="badge failed" data-testid="badge">FAILED</span>'
    flagged = to_bool(rec.scores.get("flagged"))
    if flagged is None:
        return '<span class="badge unknown" data-testid="badge">n/a</span>'
    if flagged:
        return '<span class="badge flagged" data-testid="badge">FLAGGED</span>'
    return '<span class="badge normal" data-testid="badge">normal</span>'


def _cohort(cohort: object) -> str:
    """The reference cohort in words: kind, dataset, participants."""
    if not isinstance(cohort, dict):
        return NA
    n = cohort.get("n_participants")
    return (f"{cohort.get('kind') or 'healthy reference'}: {cohort.get('dataset') or NA}"
            + (f" ({n} participants)" if n is not None else ""))


def _csf_weighting(scoring: object) -> str:
    """The statmap's CSF weighting in words (records written before it was recorded: n/a)."""
    if not isinstance(scoring, dict) or to_float(scoring.get("csf_weight")) is None:
        return NA
    weight = to_float(scoring["csf_weight"])
    if weight == 1.0:
        return "full weight"
    level, quantile = to_float(scoring.get("csf_level")), to_float(scoring.get("csf_quantile"))
    if level:
        return f"weighted ×{fmt_num(weight, 2)} (below {fmt_num(level, 2)} of the local level)"
    share = f"the darkest {fmt_num(100 * quantile, 0)}% of the brain" if quantile else "CSF"
    return f"weighted ×{fmt_num(weight, 2)} ({share}, relative to the local level)"


def _local_baseline(scoring: object) -> str:
    """Whether the statmap's local baseline removed shading, in words."""
    sigma = to_float(scoring.get("local_baseline_sigma")) if isinstance(scoring, dict) else None
    if sigma is None:
        return NA
    return f"removed (a Gaussian of {fmt_num(sigma, 1)} voxels)" if sigma > 0 else "kept"


def _scan_section(output_dir: Path, rec: ScanRecord, level: Level,
                  pngs: dict[Path, bytes]) -> str:
    s = rec.scores
    sid = rec.key.scan_id
    healthy = [v for v in (to_float(x) for x in (s.get("healthy_scores") or [])) if v is not None]
    model = s.get("model") if isinstance(s.get("model"), dict) else {}
    kpis = [
        f'<span class="kpi">score <b data-testid="score">{esc(fmt_score(s.get("score")))}</b>'
        "</span>",
        f'<span class="kpi">percentile among healthy <b data-testid="percentile">'
        f'{esc(fmt_num(s.get("percentile"), 1))}</b>'
        + (f' <span class="muted small">(n={len(healthy)})</span>' if healthy else "")
        + "</span>",
    ]
    reference = s.get("reference") if isinstance(s.get("reference"), dict) else {}
    n_ref = reference.get("n_scans", len(healthy) if healthy else None)
    details = [
        ("flag threshold (score)", fmt_score(s.get("flag_score"))),
        ("healthy reference", _cohort(reference.get("cohort"))),
        ("healthy reference scans (percentile, flag, thresholds)", fmt_num(n_ref, 0)),
        ("voxel threshold (z)", fmt_score(s.get("voxel_threshold", s.get("threshold")))),
        ("CSF-dark voxels in the statmap", _csf_weighting(s.get("scoring"))),
        ("slowly varying part of the z-map (shading)", _local_baseline(s.get("scoring"))),
        ("voxel false-positive rate (nominal, before the cluster filter)",
         fmt_num(s.get("default_fpr"), 6)),
        ("mask false-positive rate observed on the healthy reference",
         fmt_num(s.get("observed_mask_fpr"), 6)),
        ("clusters", fmt_num(s.get("n_clusters"), 0)),
        ("anomaly volume (mm³)", fmt_num(s.get("anomaly_volume_mm3"), 1)),
        ("model", model.get("name", NA)),
        ("status", rec.status),
    ]
    out = [
        f'<section class="scan" id="{esc(_anchor(rec))}" data-testid="scan-{esc(sid)}">',
        f"<header><h2>{esc(rec.scan_id)}</h2>{_badge(rec)}{''.join(kpis)}</header>",
        kv_list([(k, v) for k, v in details if not (k == "model" and v == NA)]),
    ]
    if s.get("in_reference") and not rec.failed:
        out.append(f'<div class="error" data-testid="in-reference"><b>Optimistic score.</b> '
                   f"This scan was a {esc(s.get('in_reference'))} participant of the model's "
                   "healthy reference: the model has seen it, or it set the thresholds it is "
                   "compared with.</div>")
    if reference.get("level") in ("warning", "refused") and not rec.failed:
        out.append(f'<div class="error" data-testid="reference-warning"><b>Small healthy '
                   f"reference.</b> {esc(reference.get('message', ''))}</div>")
    if rec.failed:
        out.append(f'<div class="error" data-testid="scan-error"><b>Scan failed.</b> '
                   f"{esc(rec.error or 'no error message recorded')}</div>")
    figs_dir = (rec.outputs or ScanOutputs(rec.key)).figures_dir
    if not rec.failed:
        out.append(images_html(output_dir, rec, level, pngs, figs_dir))
        dist = figures.score_distribution(healthy, to_float(s.get("score")),
                                          to_float(s.get("flag_score")))
        pngs[figs_dir / f"{sid}_desc-distribution_anomaly.png"] = dist
        out.append("<h3>Score among the healthy reference</h3>")
        out.append(figure_html(dist, "score distribution",
                           "Histogram and strip of the healthy calibration scores; the red "
                           "line is this scan, the dashed line the flag threshold."))
        out.append(_clusters(output_dir, rec))
        if level.qc:
            out.append(qc_html(output_dir, rec, level, pngs, figs_dir))
    out.append(_provenance(s))
    out.append("</section>")
    return "\n".join(out)


def _clusters(output_dir: Path, rec: ScanRecord) -> str:
    outs = rec.outputs or ScanOutputs(rec.key)
    path = output_dir / outs.clusters
    head = "<h3>Anomaly clusters</h3>"
    if not path.is_file():
        return head + '<p class="muted">No cluster table found.</p>'
    try:
        columns, rows = read_tsv(path)
    except (OSError, UnicodeDecodeError) as exc:
        return head + f'<p class="error">Cannot read {esc(path.name)}: {esc(exc)}</p>'
    if not rows:
        return head + '<p class="muted">No clusters above threshold.</p>'
    numeric = {c for c in columns if c != "hemisphere" and all(
        is_missing(r[c]) or to_float(r[c]) is not None for r in rows)}
    cells = [[fmt_num(r[c], 2) if c in numeric else r[c] for c in columns]
             for r in rows[:_MAX_CLUSTER_ROWS]]
    more = ""
    if len(rows) > _MAX_CLUSTER_ROWS:
        more = (f'<p class="muted small">Showing {_MAX_CLUSTER_ROWS} of {len(rows)} clusters; '
                f"see {esc(outs.clusters)}.</p>")
    return (head + table(columns, cells, numeric, testid=f"clusters-{rec.key.scan_id}") + more
            + '<p class="muted small">Centroids in template mm (MNI152NLin2009aSym). '
            "darker_fraction: share of the cluster darker than its pseudo-healthy "
            "reconstruction; on a T1w a cluster darker throughout that sits on CSF is often an "
            "enlarged ventricle or sulcus (ageing, mass effect) rather than a lesion.</p>")


def _short(value: Any, limit: int = 400) -> Any:
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def _provenance(s: dict) -> str:
    model = s.get("model") if isinstance(s.get("model"), dict) else {}
    prov = s.get("provenance") if isinstance(s.get("provenance"), dict) else {}
    if not model and not prov:
        return ""
    items: list[tuple[str, Any]] = []
    for k in ("name", "type", "sha256"):
        if not is_missing(model.get(k)):
            items.append((f"model {k}", model[k]))
    card = model.get("card") if isinstance(model.get("card"), dict) else {}
    items.extend((f"card: {k}", _short(v)) for k, v in list(card.items())[:40])
    if not is_missing(prov.get("command")):
        items.append(("command", _short(prov["command"], 2000)))
    if not is_missing(prov.get("date")):
        items.append(("date", prov["date"]))
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    if versions:
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    return ("<details><summary>Provenance and model card</summary>"
            f"{kv_list(items)}</details>")


def _crash_section(label: str, scans: list[ScanRecord], crashes: list[CrashFile]) -> str:
    if not crashes:
        return ""
    mine = [c for c in crashes if c.mentions(label)]
    note = ""
    if not mine and any(s.failed for s in scans):
        mine = crashes
        note = ('<p class="muted small">These crash files could not be attributed to a '
                "participant; all are listed.</p>")
    if not mine:
        return ""
    return crash_list(mine, note)
