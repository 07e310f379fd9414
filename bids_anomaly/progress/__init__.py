"""Progress of long steps: node-side records, the main-process monitor and the displays."""

from .display import Reporter, Step, StepState, format_duration
from .monitor import TrainingView, WorkflowProgress
from .records import PROGRESS_FILE, node_progress

__all__ = ["PROGRESS_FILE", "Reporter", "Step", "StepState", "TrainingView",
           "WorkflowProgress", "format_duration", "node_progress"]
