"""``init_train_wf`` and ``init_calibrate_wf``: the one-node graphs that write a bundle."""

from __future__ import annotations

from pathlib import Path

from nipype import Node, Workflow

from .base import node_name
from .interfaces import Fit, Recalibrate


def init_train_wf(name: str, preproc: list[str], spec: dict, dest: Path, work_dir: Path,
                  threads: int, use_gpu: bool) -> tuple[Workflow, Node]:
    """A Fit node (:func:`~bids_anomaly.training.fit.fit_bundle`) on the preprocessed scans
    (``preproc.json`` files); ``spec`` is the ``FitInputs`` fields the runner fills in. It
    writes the bundle ``dest``; checkpoints go where ``spec["checkpoint"]`` says."""
    wf = Workflow(name=f"train_{node_name('wf', name)}", base_dir=str(work_dir))
    node = Node(Fit(), name="fit", n_procs=threads, mem_gb=3.0)
    node.inputs.preproc = list(preproc)
    node.inputs.spec = spec
    node.inputs.dest = str(Path(dest).resolve())  # nipype runs the node from its own folder
    node.inputs.use_gpu = use_gpu
    node.overwrite = True  # the bundle is the product: always (re)write it
    wf.add_nodes([node])
    return wf, node


def init_calibrate_wf(name: str, bundle: Path, preproc: list[str], scans: list[dict],
                      dataset: str, dest: Path, work_dir: Path, device: str,
                      threads: int) -> tuple[Workflow, Node]:
    """A Recalibrate node (:func:`~bids_anomaly.training.recalibrate.recalibrate_bundle`):
    ``bundle`` re-referenced on the healthy ``scans`` (participant, scan id, sha256), written
    to ``dest``."""
    wf = Workflow(name=f"calibrate_{node_name('wf', name)}", base_dir=str(work_dir))
    node = Node(Recalibrate(), name="calibrate", n_procs=threads, mem_gb=3.0)
    node.inputs.bundle = str(Path(bundle).resolve())
    node.inputs.preproc = list(preproc)
    node.inputs.scans = scans
    node.inputs.dataset = dataset
    node.inputs.dest = str(Path(dest).resolve())
    node.inputs.device = device
    node.inputs.threads = threads
    node.inputs.use_gpu = device.startswith("cuda")
    node.overwrite = True
    wf.add_nodes([node])
    return wf, node
