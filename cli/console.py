"""Rich console output: logging, run summaries and metric tables."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

console = Console(stderr=False, highlight=False)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    log = logging.getLogger("bids_anomaly")
    log.setLevel(min(level, logging.INFO))
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setLevel(level)
        # Step progress has its own display; the run's log file keeps those lines.
        handler.addFilter(lambda record: not record.name.startswith("bids_anomaly.progress"))
        log.addHandler(handler)


def print_summary(summary) -> None:
    """One table row per scan; failures with their reason."""
    ok = len(summary.scans) - len(summary.failed)
    if summary.failed or len(summary.scans) <= 40:
        table = Table(title=f"{summary.level}: {ok} ok, {len(summary.failed)} failed",
                      title_justify="left")
        table.add_column("scan")
        table.add_column("status")
        table.add_column("message", overflow="fold")
        for s in summary.scans:
            style = "green" if s.status == "ok" else "red"
            table.add_row(s.scan_id, f"[{style}]{s.status}[/]", s.message)
        console.print(table)
    for name, path in summary.outputs.items():
        if name in ("bundle", "group_report", "group_table", "training_report"):
            console.print(f"{name.replace('_', ' ')}: {path}")
    if summary.failed:
        print(f"{len(summary.failed)} scan(s) failed; see the table above and logs/",
              file=sys.stderr)


def print_card(rows: list[tuple[str, str]]) -> None:
    """A bundle's card as a two-column table."""
    table = Table(title="Model bundle (checksums verified)", title_justify="left",
                  show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


def print_evaluation(result) -> None:
    from bids_anomaly.evaluation import format_pooled_table

    rows = format_pooled_table(result)
    table = Table(title="Evaluation (pooled over scans, inside the brain)", title_justify="left")
    for h in rows[0]:
        table.add_column(h, justify="right")
    for r in rows[1:]:
        table.add_row(*r)
    console.print(table)
    if result.skipped:
        console.print(f"{len(result.skipped)} scan(s) skipped (no label)")
