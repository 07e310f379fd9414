"""Size and render time of a group report with the overview mosaic (default: 200 scans).

Usage (repository root; Debian's chromium and Playwright for Python, nothing downloaded)::

    python benchmarks/group_report.py [--scans 200] [--repeats 3]

Builds a fake scored OUTPUT_DIR (``tests/overview_cohort.py``: thumbnails, table, stub
participant reports), then opens the report in headless chromium and prints its size, the
wall time until the table and the mosaic are complete, and DOMContentLoaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from playwright.sync_api import sync_playwright

    from tests.overview_cohort import write_overview_scans
    from tests.test_reports_browser import CHROMIUM, LAUNCH_ARGS, VIEWPORT

    n = args.scans
    done = (f"document.querySelectorAll('#scan-tbody tr').length === {n} && "
            f"document.querySelectorAll('#overview .ovrow').length === {n} && "
            "Array.from(document.querySelectorAll('#overview img')).every(i => i.complete)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        html = write_overview_scans(Path(tmp), n)
        build_s = time.perf_counter() - t0
        runs = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            for _ in range(args.repeats):
                context = browser.new_context(viewport=VIEWPORT)
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(html.resolve().as_uri())
                page.wait_for_function(done)
                wall = time.perf_counter() - t0
                dcl = page.evaluate("() => performance.getEntriesByType('navigation')[0]"
                                    ".domContentLoadedEventEnd")
                runs.append({"render_wall_s": round(wall, 3), "dcl_ms": round(dcl, 1)})
                context.close()
            browser.close()
        result = {"scans": n, "report_mb": round(html.stat().st_size / 1e6, 3),
                  "build_s": round(build_s, 2), "runs": runs,
                  "best_render_wall_s": min(r["render_wall_s"] for r in runs)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
