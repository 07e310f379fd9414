"""Self-contained HTML reports (participant and group level) and their figures."""

from .group import build_group_report
from .participant import build_participant_report

__all__ = ["build_group_report", "build_participant_report"]
