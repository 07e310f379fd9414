"""``init_preproc_wf``: one Preprocess node per scan (train, calibrate and score share it)."""

from __future__ import annotations

from pathlib import Path

from nipype import Node, Workflow

from ..bids_io.discovery import ScanInput
from ..core.config import PreprocConfig
from ..preprocessing.bias import N4_BACKEND_ENV, n4_backend_from_env
from .base import LOG, node_name
from .interfaces import Preprocess


def init_preproc_wf(scans: list[ScanInput], preproc: PreprocConfig, work_dir: Path,
                    threads: int, seed: int, device: str,
                    name: str = "preproc_wf") -> tuple[Workflow, dict[str, Node]]:
    """The preprocessing workflow and its node per scan id (the result: ``preproc.json``).

    One workflow name for every command, so a scan preprocessed once is reused from
    ``WORK_DIR/preproc_wf/preproc_<scan id>/`` by the next run with the same recipe.

    N4 is SimpleITK's unless ``BIDS_ANOMALY_N4_BACKEND=antspyx`` (preprocessing/bias.py)."""
    n4_backend = n4_backend_from_env()
    if n4_backend != "simpleitk" and preproc.n4 and scans:
        LOG.warning(
            "N4 runs through %s (%s=%s), not SimpleITK: close to, but not the same bytes as, "
            "the default; recorded in each scan's preprocessing record", n4_backend,
            N4_BACKEND_ENV, n4_backend)
    wf = Workflow(name=name, base_dir=str(work_dir))
    nodes = {}
    for scan in scans:
        node = Node(Preprocess(), name=node_name("preproc", scan.key.scan_id),
                    n_procs=threads, mem_gb=1.5)
        node.inputs.t1w = str(scan.t1w)
        node.inputs.extra = {c: str(p) for c, p in scan.files.items() if c != "T1w"}
        node.inputs.config = preproc.to_dict()
        node.inputs.threads = threads
        node.inputs.seed = seed
        node.inputs.device = "cpu" if device == "cpu" else device
        node.inputs.use_gpu = device.startswith("cuda")
        if n4_backend != "simpleitk":
            node.inputs.n4_backend = n4_backend
        wf.add_nodes([node])
        nodes[scan.key.scan_id] = node
    return wf, nodes
