"""Reports of a finished run: participant pages, the group table and page."""

from __future__ import annotations

import time
from pathlib import Path

from ..bids_io import derivatives
from ..core.config import ProgressConfig
from ..core.errors import EmptySelectionError, ExitCode
from ..core.paths import ensure_writable_dir
from ..progress import Reporter
from .common import LOG, RunSummary, ScanStatus


def build_reports(output_dir: Path, subjects: list[str],
                  progress: ProgressConfig | None = None) -> dict[str, str]:
    """Participant reports; a report that fails is logged, never fatal."""
    from ..reports import build_participant_report

    out = {}
    step = Reporter(progress).step("participant reports", len(subjects), "participants")
    t0 = time.monotonic()
    for i, subject in enumerate(subjects, 1):
        try:
            out[f"sub-{subject}"] = str(build_participant_report(output_dir, subject))
        except Exception as exc:  # a report must never lose the run's results
            LOG.error("participant report for sub-%s failed: %s", subject, exc)
        step.update(done=i, eta_s=(time.monotonic() - t0) / i * (len(subjects) - i))
    step.close(f"{len(out)}/{len(subjects)} participant reports written")
    return out


def run_group(output_dir: Path, progress: ProgressConfig | None = None) -> RunSummary:
    """Group level: the table of every scan and the group report."""
    from ..reports import build_group_report

    t0 = time.perf_counter()
    ensure_writable_dir(output_dir, "OUTPUT_DIR")
    step = Reporter(progress).step("group level", 2, "parts")
    step.update(info="collecting the scans' records")
    df = derivatives.write_group_table(output_dir)
    if df.empty:
        step.close("no scored participants")
        raise EmptySelectionError(
            f"no scored participants in {output_dir}: run the participant level first"
        )
    step.update(done=1, info=f"group report of {len(df)} scans")
    summary = RunSummary("group")
    for _, row in df.iterrows():
        summary.scans.append(ScanStatus(
            row["scan_id"], row["status"], row["error"] if isinstance(row["error"], str) else "",
            ExitCode.OK))
    summary.outputs["group_table"] = str(output_dir / "group_anomaly.tsv")
    summary.outputs["group_report"] = str(build_group_report(output_dir))
    step.close(f"table and report of {len(df)} scans")
    summary.seconds = time.perf_counter() - t0
    return summary


def run_reports(output_dir: Path, level: str, subjects: list[str] | None = None,
                progress: ProgressConfig | None = None) -> RunSummary:
    """Rebuild reports from existing derivatives, without recomputing anything."""
    if level == "group":
        return run_group(output_dir, progress)
    if not subjects:
        subjects = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
    summary = RunSummary("report")
    summary.outputs.update(build_reports(output_dir, subjects, progress))
    return summary
