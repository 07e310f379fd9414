"""The group report's "Evaluation" section, from the tables ``bids-anomaly evaluate`` wrote."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .html import NA, esc, fmt_num, fmt_score, safe_relative_href, table, to_float
from .loaders import GROUP_TSV, read_json, read_tsv

EVAL_POOLED_TSV = "evaluation_pooled.tsv"  # written by bids_anomaly.evaluation.write_evaluation
EVAL_SCANS_TSV = "evaluation_scans.tsv"
EVAL_JSON = "evaluation.json"
#: Per-scan evaluation rows shown inline (the TSV link has them all).
EVAL_MAX_INLINE_ROWS = 2000
ORACLE_LABEL = "oracle Dice (upper bound; uses the labels)"


def _fpr_cols(columns: list[str], prefix: str) -> list[tuple[str, float]]:
    """``(column, fpr)`` of the columns named ``<prefix><fpr>``, largest FPR first."""
    out = []
    for c in columns:
        if c.startswith(prefix):
            fpr = to_float(c[len(prefix):])
            if fpr is not None:
                out.append((c, fpr))
    return sorted(out, key=lambda item: -item[1])


def _pct(fpr: float) -> str:
    return f"{fmt_num(fpr * 100, 4)}%"


def _metric_cells(row: dict[str, str], cols: list[tuple[str, str]]) -> list[str]:
    return [fmt_num(row.get(c), 3) for c, _ in cols]


def evaluation_html(output_dir: Path) -> str:
    """The "Evaluation" section, or "" when ``evaluate`` wrote no table into ``output_dir``."""
    pooled_tsv = output_dir / EVAL_POOLED_TSV
    if not pooled_tsv.is_file():
        return ""
    head = '<h2 id="evaluation">Evaluation</h2>'
    try:
        pcols, prows = read_tsv(pooled_tsv)
    except (OSError, UnicodeDecodeError) as exc:
        return (f'<section data-testid="evaluation">{head}<div class="error">cannot read '
                f"{esc(EVAL_POOLED_TSV)}: {esc(exc)}</div></section>")
    dice_cols = _fpr_cols(pcols, "dice_fpr")
    obs_cols = dict(_fpr_cols(pcols, "fpr_observed_fpr"))
    obs_by_fpr = {fpr: c for c, fpr in obs_cols.items()}
    metric_cols = [("auroc", "voxel AUROC"), ("auprc", "voxel AUPRC"),
                   ("oracle_dice", ORACLE_LABEL)]
    metric_cols += [(c, f"Dice at calibrated FPR {_pct(fpr)}") for c, fpr in dice_cols]
    metric_cols += [(obs_by_fpr[fpr], f"observed FPR (target {_pct(fpr)})")
                    for _, fpr in dice_cols if fpr in obs_by_fpr]
    metric_cols += [("scan_auroc", "scan-level AUROC")]
    header = ["model", "scans (pathological)", *[label for _, label in metric_cols]]
    table_rows = []
    for r in prows:
        scans = f"{fmt_num(r.get('n_scans'), 0)} ({fmt_num(r.get('n_pathological'), 0)})"
        table_rows.append([r.get("model", NA), scans, *_metric_cells(r, metric_cols)])
    pooled = table(header, table_rows, numeric=set(header[1:]), testid="evaluation-pooled")

    scan_auroc = ", ".join(
        f"<b>{esc(r.get('model', NA))}</b> {esc(fmt_num(r.get('scan_auroc'), 3))}" for r in prows)
    meta, _ = read_json(output_dir / EVAL_JSON)
    meta = meta if isinstance(meta, dict) else {}
    dilation = to_float(meta.get("MaskDilation")) or 0
    region = "the native brain mask" + (
        f" dilated by {fmt_num(dilation, 0)} voxel(s)" if dilation else "")
    written = _dt.datetime.fromtimestamp(pooled_tsv.stat().st_mtime).astimezone()
    parts = [
        '<section data-testid="evaluation">', head,
        f'<p class="muted small">Written by <code>bids-anomaly evaluate</code> on '
        f"{esc(written.isoformat(timespec='seconds'))} against lesion masks "
        "(labels are used only here, never in training or calibration).</p>",
        f"<p>Voxel metrics are computed inside {esc(region)}, <b>pooled</b> over the voxels of "
        "all evaluated scans (per-scan values below). The <b>oracle Dice</b> is the best Dice "
        "over all thresholds, chosen with the lesion labels: an upper bound that no user "
        "gets without labels. The <b>Dice at the calibrated thresholds</b> (set on healthy "
        "participants for a voxel false-positive rate) is the operating point a user "
        "actually gets. The <b>observed FPR</b> of healthy scans counts only voxels where the "
        "anomaly map is defined (the brain mask eroded as scoring erodes it), and says how many "
        "healthy scans it rests on.</p>",
        pooled,
        f'<p data-testid="evaluation-scan-auroc">Scan-level AUROC (healthy vs pathological '
        f"scans, from the per-scan score): {scan_auroc or NA}</p>",
    ]
    group_tsv = output_dir / GROUP_TSV
    if group_tsv.is_file() and group_tsv.stat().st_mtime > pooled_tsv.stat().st_mtime + 1:
        parts.append('<div class="note" data-testid="evaluation-stale">The scan table is newer '
                     "than this evaluation: run <code>bids-anomaly evaluate</code> again to "
                     "update it.</div>")
    parts.append(_evaluation_scans_html(output_dir))
    skipped = [str(x) for x in meta.get("Skipped") or []]
    if skipped:
        items = "".join(f"<li>{esc(x)}</li>" for x in skipped)
        parts.append(f"<details><summary>{len(skipped)} scan(s) not evaluated</summary>"
                     f'<ul data-testid="evaluation-skipped">{items}</ul></details>')
    parts.append("</section>")
    return "".join(parts)


def _evaluation_scans_html(output_dir: Path) -> str:
    scans_tsv = output_dir / EVAL_SCANS_TSV
    if not scans_tsv.is_file():
        return ""
    try:
        cols, rows = read_tsv(scans_tsv)
    except (OSError, UnicodeDecodeError) as exc:
        return f'<div class="error">cannot read {esc(EVAL_SCANS_TSV)}: {esc(exc)}</div>'
    metric_cols = [("auroc", "voxel AUROC"), ("auprc", "voxel AUPRC"),
                   ("oracle_dice", ORACLE_LABEL)]
    metric_cols += [(c, f"Dice at calibrated FPR {_pct(fpr)}")
                    for c, fpr in _fpr_cols(cols, "dice_fpr")]
    header = ["model", "scan", "pathological", "lesion voxels",
              *[label for _, label in metric_cols], "score"]
    shown = rows[:EVAL_MAX_INLINE_ROWS]
    body = [[r.get("model", NA), r.get("scan_id", NA), r.get("pathological", NA),
             fmt_num(r.get("lesion_voxels"), 0), *_metric_cells(r, metric_cols),
             fmt_score(r.get("score"))] for r in shown]
    more = (f" (first {len(shown)} of {len(rows)} rows; all in the TSV)"
            if len(rows) > len(shown) else "")
    href = safe_relative_href(EVAL_SCANS_TSV)
    link = f'<a href="{esc(href)}">{esc(EVAL_SCANS_TSV)}</a>' if href else esc(EVAL_SCANS_TSV)
    return (f"<details data-testid=\"evaluation-scans\"><summary>Per-scan metrics ({len(rows)} "
            f"rows){more}: {link}</summary>"
            + table(header, body, numeric=set(header[3:]), testid="evaluation-scans-table")
            + "</details>")
