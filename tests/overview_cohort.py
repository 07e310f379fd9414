"""A fake scored OUTPUT_DIR of many scans with overview thumbnails (browser test, benchmark,
screenshots): ``group_anomaly.tsv``, one thumbnail strip per scored scan (the template with a
random bright blob as its anomaly), stub participant reports, and the group report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_anomaly.core.atomic import write_bytes
from bids_anomaly.core.naming import ScanKey, ScanOutputs
from bids_anomaly.core.templates import load_template
from bids_anomaly.reports import build_group_report
from bids_anomaly.reports.thumbnails import render_thumbnail

COLUMNS = ["participant_id", "session_id", "run", "scan_id", "model", "score", "percentile",
           "flagged", "status", "error", "n_clusters", "anomaly_volume_mm3", "report"]
FAIL_EVERY = 41  # every 41st scan failed (no thumbnail: a placeholder)
DISTINCT = 24  # thumbnails drawn per flag state, then reused (each ~25 ms to draw)


def write_overview_scans(out: Path, n: int = 200, seed: int = 2) -> Path:
    """Write the fake OUTPUT_DIR into ``out``; returns the group report's path."""
    rng = np.random.default_rng(seed)
    tpl = load_template(2)
    t1 = np.asarray(tpl.t1, np.float32) * tpl.mask
    inside = np.argwhere(tpl.mask[8:-8, 8:-8, 8:-8]) + 8
    noise = rng.normal(0, 0.5, t1.shape).astype(np.float32) * tpl.mask
    ball = np.exp(-((np.indices((15, 15, 15)) - 7.0) ** 2).sum(axis=0) / 18.0)
    lines = ["\t".join(COLUMNS)]
    drawn: dict[tuple[int, bool], bytes] = {}
    for i in range(n):
        sub = f"{i:03d}"
        key = ScanKey(sub)
        failed = i % FAIL_EVERY == 0
        score = float(rng.normal(1, 0.5))
        flagged = score > 1.8
        if not failed and (i % DISTINCT, flagged) in drawn:
            write_bytes(out / ScanOutputs(key).thumbnail, drawn[i % DISTINCT, flagged])
        elif not failed:
            x, y, z = inside[rng.integers(len(inside))] - 7
            stat = np.roll(noise, int(rng.integers(-3, 4)), axis=0)
            stat[x:x + 15, y:y + 15, z:z + 15] += ball * (8 if flagged else 3)
            stat *= tpl.mask
            mask = (stat > 3.2) & tpl.mask
            drawn[i % DISTINCT, flagged] = render_thumbnail(t1, stat.astype(np.float32), mask,
                                                             3.2, tpl.mask)
            write_bytes(out / ScanOutputs(key).thumbnail, drawn[i % DISTINCT, flagged])
        (out / f"sub-{sub}.html").write_text(
            f'<!DOCTYPE html><title>sub-{sub}</title><section id="scan-sub-{sub}">'
            f"participant report of sub-{sub}</section>\n")
        lines.append("\t".join([
            f"sub-{sub}", "n/a", "n/a", f"sub-{sub}", "dae",
            "n/a" if failed else f"{score:.4f}",
            "n/a" if failed else f"{rng.uniform(0, 100):.1f}",
            "n/a" if failed else str(flagged), "failed" if failed else "ok",
            "out of memory" if failed else "n/a", str(int(flagged)),
            f"{rng.uniform(0, 3000):.1f}", f"sub-{sub}.html"]))
    (out / "group_anomaly.tsv").write_text("\n".join(lines) + "\n")
    return build_group_report(out)
