"""The reports' stylesheets and scripts: package files beside this module, inlined in each page."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def asset(name: str) -> str:
    """The text of ``bids_anomaly/reports/<name>`` (a ``.css`` or ``.js`` file)."""
    return files(__package__).joinpath(name).read_text(encoding="utf-8")
