"""Regenerate the README screenshots ``docs/group_report.png``, ``docs/group_overview.png``
and ``docs/participant_report.png``.

Usage (from the repository root; needs Debian's ``chromium`` and Playwright for Python, nothing
is downloaded)::

    python docs/make_screenshots.py [OUTPUT_DIR] [--participant sub-p01]

``OUTPUT_DIR`` defaults to ``/tmp/demo/derivatives/bids-anomaly`` (a demo run). When its
``group_report.html`` or participant report is missing, a small fake OUTPUT_DIR is built
instead (as in ``tests/test_reports_browser.py``). Screenshots are 1200x800 viewport captures,
re-encoded with a 256-colour palette when larger than 300 KB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_BYTES = 300 * 1024


def _shrink(png: Path) -> None:
    if png.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(png, optimize=True)


def _shoot(browser, html: Path, png: Path, viewport: dict, group: bool | str) -> None:
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.goto(html.resolve().as_uri())
        if group == "overview":  # the mosaic of every scan, flagged first
            page.wait_for_selector("#overview .ovrow")
            page.evaluate("document.getElementById('overview-title').scrollIntoView()")
        elif group:  # most anomalous scans first, as a reviewer would look at them
            page.wait_for_selector("#scan-tbody tr")
            page.click('[data-testid="th-score"]')
            page.click('[data-testid="th-score"]')
            page.evaluate("window.scrollTo(0, 0)")
        else:  # start at the first scan's figures
            page.evaluate("document.querySelector('section.scan').scrollIntoView()")
        page.screenshot(path=str(png), full_page=False)
    finally:
        context.close()
    _shrink(png)
    print(f"{png} ({png.stat().st_size // 1024} KB) from {html}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir", nargs="?", type=Path,
                    default=Path("/tmp/demo/derivatives/bids-anomaly"))
    ap.add_argument("--participant", default="sub-p01")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from playwright.sync_api import sync_playwright

    from tests.test_reports_browser import CHROMIUM, LAUNCH_ARGS, VIEWPORT, build_fake_output_dir

    group = args.output_dir / "group_report.html"
    part = args.output_dir / f"{args.participant}.html"
    with tempfile.TemporaryDirectory() as tmp:
        if not (group.is_file() and part.is_file()):
            print(f"no reports in {args.output_dir}: using a fake OUTPUT_DIR")
            out = build_fake_output_dir(Path(tmp))
            group, part = out / "group_report.html", out / "sub-01.html"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            try:
                _shoot(browser, group, DOCS / "group_report.png", VIEWPORT, True)
                _shoot(browser, group, DOCS / "group_overview.png", VIEWPORT, "overview")
                _shoot(browser, part, DOCS / "participant_report.png", VIEWPORT, False)
            finally:
                browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
