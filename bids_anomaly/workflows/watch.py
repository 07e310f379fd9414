"""Running a workflow with its progress shown (one step of a run)."""

from __future__ import annotations

from pathlib import Path

from nipype import Workflow

from ..core.config import ResourceConfig
from ..progress import Step, TrainingView, WorkflowProgress
from .base import WorkflowRun, node_dirs, run_workflow

BATCH_PLUGINS = ("SLURM", "SGE", "PBS")


def run_watched(wf: Workflow, resources: ResourceConfig, crash_dir: Path, step: Step,
                items: list[str] | None = None, training: TrainingView | None = None
                ) -> WorkflowRun:
    """:func:`run_workflow` with ``step`` fed by the nodes' events and records.

    ``items``: the full names of the nodes ``step`` counts (default: every node). With a
    batch plugin the step shows queued/running/done; Graph plugins report no node events,
    so the step shows only that the graph was submitted and the time elapsed."""
    if resources.plugin.endswith("Graph"):
        step.update(info=f"submitted to {resources.plugin} as one job graph")
        return run_workflow(wf, resources, crash_dir)
    with WorkflowProgress(step, node_dirs(wf), items, batch=resources.plugin in BATCH_PLUGINS,
                          training=training) as monitor:
        return run_workflow(wf, resources, crash_dir, on_status=monitor)
