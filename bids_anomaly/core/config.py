"""Explicit run configuration, passed from the CLI (or a script) into the library."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CONTRASTS = ("T1w", "T2w", "FLAIR")


@dataclass(frozen=True)
class SelectionConfig:
    """Which scans to take from BIDS_DIR."""

    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: dict = field(default_factory=dict)
    contrasts: tuple[str, ...] = ("T1w",)
    healthy_filter: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ResourceConfig:
    """Compute resources: nipype plugin, processes, threads, memory and device."""

    nprocs: int = field(default_factory=lambda: max(1, len(os.sched_getaffinity(0))))
    omp_nthreads: int = 0  # 0: the cores shared out between the nodes that run at once
    mem_gb: float | None = None
    device: str = "auto"
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)

    def threads_for(self, parallel: int) -> int:
        """Threads for each of ``parallel`` like nodes (one per scan): ``omp_nthreads`` when
        set, else ``nprocs`` shared out between the nodes that can run at once, so one
        participant gets every core and a batch runs one single-threaded scan per core."""
        if self.omp_nthreads > 0:
            return self.omp_nthreads
        return max(1, self.nprocs // max(1, min(parallel, self.nprocs)))


@dataclass(frozen=True)
class PreprocConfig:
    """Preprocessing recipe (stored in the model bundle so scoring repeats it exactly)."""

    resolution: int = 2
    # auto (deepbet unless already stripped) | deepbet | none
    brain_extraction: str = "auto"
    registration: str = "affine"  # affine | affine-coarse | syn
    n4: bool = True
    n4_shrink: int = 4

    def to_dict(self) -> dict:
        return {
            "resolution": self.resolution,
            "brain_extraction": self.brain_extraction,
            "registration": self.registration,
            "n4": self.n4,
            "n4_shrink": self.n4_shrink,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PreprocConfig:
        return cls(**{k: d[k] for k in cls().to_dict() if k in d})


@dataclass(frozen=True)
class ProgressConfig:
    """How a run shows its progress: ``auto`` (a rich bar on a terminal, else plain lines),
    ``rich``, ``plain`` (a line per step and at most one per ``interval_s`` or quarter of a
    step) or ``quiet`` (nothing on the console). The run's log always gets a line per step."""

    mode: str = "auto"
    interval_s: float = 30.0


@dataclass(frozen=True)
class RunConfig:
    """Everything a participant-, group- or train-level run needs."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    seed: int = 0
    skip_bids_validation: bool = True
    verbose: int = 0
    command: str = ""
    progress: ProgressConfig = field(default_factory=ProgressConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Training options on top of :class:`RunConfig`."""

    model_type: str = "dae"
    model_name: str | None = None
    model_config: dict = field(default_factory=dict)
    folds: int = 5  # k-fold cross-fitting: every healthy participant calibrates once
    resume: bool = False

    @property
    def name(self) -> str:
        return self.model_name or self.model_type
