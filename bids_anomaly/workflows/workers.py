"""nipype's MultiProc workers, started warm: the forkserver imports the heavy libraries once.

MultiProc forks its workers from a forkserver (forking a process whose torch/OpenMP pools
are live deadlocks). By default every worker then imports torch, MONAI, antspyx and deepbet
itself, and every workflow of a run (preprocessing, then scoring) starts a new pool, so a
one-participant run paid those imports twice, on one core, after the main process had paid
them too. :func:`start_worker_server` starts the forkserver at the very beginning of a run
with :mod:`.preload` as a preload module: the imports run once, on a core the main process
is not using while it verifies the bundle and indexes the dataset, and each worker is a fork
of an interpreter that has them already. Importing runs no parallel region, so no OpenMP or
ITK thread pool exists yet when the workers are forked.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from pathlib import Path

from ..core.config import ResourceConfig
from .base import worker_config

PRELOAD = "bids_anomaly.workflows.preload"


def start_worker_server(resources: ResourceConfig, work_dir: Path) -> bool:
    """Start the forkserver nipype's MultiProc will fork its workers from, preloading
    :mod:`.preload`; returns False (nothing started) for other plugins or contexts.

    The server keeps the environment it starts with, so the workers' nipype configuration
    (logging levels; :func:`.base.worker_config`, in ``work_dir``) is written first.
    Non-blocking: the server imports in the background; the first worker waits for it."""
    context = resources.plugin_args.get("mp_context", "forkserver")
    if resources.plugin != "MultiProc" or context != "forkserver":
        return False
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    worker_config(work_dir)
    multiprocessing.set_forkserver_preload(["__main__", PRELOAD])
    multiprocessing.forkserver.ensure_running()
    return True
