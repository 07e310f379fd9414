"""Small helpers for self-contained HTML: escaping, inline images, embedded JSON, the page shell.

Every user-derived string (ids, error messages, model cards, file names) must go through
:func:`esc` (text and attribute values) or :func:`json_script` (data for inline JS). Nothing
here references a network resource: styles and scripts are inline and images are data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from typing import Any

from .assets import asset

NA = "n/a"

AGEING_NOTE = (
    "Scores measure deviation from the healthy reference the model was trained and "
    "calibrated on. If that reference is young, normal ageing (atrophy, enlarged ventricles "
    "and sulci, white-matter changes) also raises scores and can flag a scan: a high score "
    "or a flag is not a diagnosis. Compare with age-matched controls and have flagged scans "
    "reviewed by a qualified reader."
)

CSS = asset("base.css")


def esc(value: Any) -> str:
    """HTML-escape ``value`` for text and quoted attributes; ``None`` becomes ``n/a``."""
    if value is None:
        return NA
    return html.escape(str(value), quote=True)


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "n/a", "na", "nan", "none")


def to_float(value: Any) -> float | None:
    """``float(value)`` or ``None`` for missing / non-numeric / non-finite values."""
    if is_missing(value) or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if is_missing(value):
        return None
    s = str(value).strip().lower()
    if s in ("true", "1", "yes", "y", "t"):
        return True
    if s in ("false", "0", "no", "n", "f"):
        return False
    return None


def fmt_num(value: Any, digits: int = 2) -> str:
    """Fixed-point number with trailing zeros stripped (``1256.0`` -> ``1256``); else ``n/a``."""
    x = to_float(value)
    if x is None:
        return NA if is_missing(value) else str(value)
    s = f"{x:.{digits}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def fmt_score(value: Any) -> str:
    """A score with 4 significant digits (``3.217``, ``0.01234``)."""
    x = to_float(value)
    if x is None:
        return NA
    return f"{x:.4g}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, **attrs: str) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}"{extra}>'


def json_script(obj: Any, element_id: str) -> str:
    """``<script type="application/json">`` with ``obj``; safe against ``</script>`` breakout."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    text = (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


_SAFE_HREF = re.compile(r"^(?!//)[A-Za-z0-9._~\-/%#?=&+]+$")


def safe_relative_href(value: Any) -> str | None:
    """``value`` if it is a plain relative link (no scheme such as ``javascript:``), else None."""
    if is_missing(value):
        return None
    s = str(value).strip()
    if not _SAFE_HREF.match(s) or s.startswith("/") or ".." in s.split("/"):
        return None
    return s


def kv_list(items: list[tuple[str, Any]]) -> str:
    """A definition list of (label, value) pairs; values are escaped (dict/list -> JSON)."""
    rows = []
    for k, v in items:
        if isinstance(v, dict | list):
            v = json.dumps(v, ensure_ascii=False, default=str)
        rows.append(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>")
    return f'<dl class="kv">{"".join(rows)}</dl>'


def crash_list(crashes, note: str = "") -> str:
    """The "Crash files" section: each file's path and the head of its traceback."""
    items = []
    for c in crashes:
        head = f"<pre>{esc(chr(10).join(c.head))}</pre>" if c.head else ""
        items.append(f"<li><code>{esc(c.path)}</code>{head}</li>")
    return f'<h2>Crash files</h2>{note}<ul data-testid="crash-files">{"".join(items)}</ul>'


def table(columns: list[str], rows: list[list[Any]], numeric: set[str] | None = None,
          testid: str | None = None) -> str:
    """A plain HTML table; every cell is escaped."""
    numeric = numeric or set()
    tid = f' data-testid="{esc(testid)}"' if testid else ""
    head = "".join(
        f'<th{" class=num" if c in numeric else ""}>{esc(c)}</th>' for c in columns
    )
    body = []
    for r in rows:
        cells = "".join(
            f'<td{" class=num" if c in numeric else ""}>{esc(v)}</td>'
            for c, v in zip(columns, r, strict=False)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str, *, css: str = "", script: str = "") -> str:
    """A complete HTML document; no external resources (CSP forbids any network fetch)."""
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           "script-src 'unsafe-inline'; connect-src 'none'; form-action 'none'")
    js = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{esc(title)}</title><style>{CSS}{css}</style></head>\n"
        f"<body>\n{body}\n{js}\n</body></html>\n"
    )
