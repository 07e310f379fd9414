"""How a run shares its cores, and the warm worker server nipype's workers fork from."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nb
import numpy as np

from bids_anomaly.core.config import ResourceConfig


def test_cores_are_shared_out_between_the_nodes_that_run_at_once():
    r = ResourceConfig(nprocs=2)
    assert r.threads_for(1) == 2  # one participant: both cores
    assert r.threads_for(2) == 1 and r.threads_for(10) == 1  # a batch: one scan per core
    assert ResourceConfig(nprocs=16).threads_for(3) == 5
    assert ResourceConfig(nprocs=1).threads_for(1) == 1
    assert ResourceConfig(nprocs=2).threads_for(0) == 2
    assert ResourceConfig(nprocs=8, omp_nthreads=3).threads_for(1) == 3  # --omp-nthreads wins


def test_worker_preload_names_real_modules():
    """Every module the forkserver preloads exists: a misspelt one would be skipped silently
    and each worker would import it again."""
    code = ("import sys, bids_anomaly.workflows.preload as p; "
            "print([m for m in p.MODULES if m not in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_worker_server_only_for_multiproc_forkserver(tmp_path):
    from bids_anomaly.workflows.workers import start_worker_server

    assert not start_worker_server(ResourceConfig(plugin="Linear"), tmp_path)
    assert not start_worker_server(ResourceConfig(plugin_args={"mp_context": "spawn"}), tmp_path)


_PREPROCESS = """
import json, sys
from bids_anomaly.preprocessing.pipeline import preprocess_scan
res = preprocess_scan({"T1w": sys.argv[1]}, sys.argv[2], threads=int(sys.argv[3]))
print(json.dumps(res.brain_extraction))
"""


def test_a_scan_preprocessed_alone_is_preprocessed_as_in_a_batch(tmp_path):
    """Alone, a scan's node gets every core; in a batch, one. The outputs are the same bytes:
    the cores go only to what does not change with them (ANTs and N4 run single-threaded)."""
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path / "bids"
    generate_cohort(root, SynthConfig(n_healthy=1, n_healthy_test=0, n_patients=0,
                                      voxel_size=2.0, template_resolution=2,
                                      with_skull=True, seed=3))
    t1w = str(root / "sub-h01/anat/sub-h01_T1w.nii.gz")
    outs = {}
    for threads in (1, 2):  # separate processes: ITK reads its thread count once per process
        out = tmp_path / f"pre{threads}"
        run = subprocess.run([sys.executable, "-c", _PREPROCESS, t1w, str(out), str(threads)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        outs[threads] = out
        assert json.loads(run.stdout.strip().splitlines()[-1]) == "deepbet"
    assert (outs[1] / "xfm.mat").read_bytes() == (outs[2] / "xfm.mat").read_bytes()
    for name in ("native_brain_mask.nii.gz", "template_brain_mask.nii.gz",
                 "template_T1w.nii.gz"):
        a = np.asarray(nb.load(outs[1] / name).dataobj)
        b = np.asarray(nb.load(outs[2] / name).dataobj)
        assert np.array_equal(a, b), name


def test_thread_count_does_not_invalidate_the_work_directory(tmp_path):
    """A scan preprocessed and scored in a batch (1 thread) is reused when it is run alone
    (every core): the thread count is not part of the nodes' hashes; the device is."""
    from nipype import Node

    from bids_anomaly.workflows.interfaces import Preprocess, Score

    t1w = tmp_path / "t1.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), t1w)

    def pre(threads, device="cpu"):
        n = Node(Preprocess(), name="p")
        n.inputs.t1w, n.inputs.config = str(t1w), {"resolution": 2}
        n.inputs.threads, n.inputs.device = threads, device
        n.inputs.use_gpu = device.startswith("cuda")
        return n.inputs.get_hashval()[1]

    assert pre(1) == pre(2)
    assert pre(1) != pre(1, "cuda")

    def score(threads):
        n = Node(Score(), name="s")
        n.inputs.preproc, n.inputs.bundle, n.inputs.threads = str(t1w), str(tmp_path), threads
        return n.inputs.get_hashval()[1]

    assert score(1) == score(2)


def test_participants_share_one_gpu(monkeypatch):
    """On a one-GPU machine MultiProc runs as many GPU nodes at once as the card has room
    for (nipype alone would run one), never more than the processes; a user's
    --plugin-args n_gpu_procs wins; nothing is set off CUDA."""
    from types import SimpleNamespace

    import torch

    from bids_anomaly.workflows import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=80 * 2**30))
    assert base.plugin_args(ResourceConfig(nprocs=16, device="cuda"))[1]["n_gpu_procs"] == 16
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=8 * 2**30))
    assert base.plugin_args(ResourceConfig(nprocs=16, device="auto"))[1]["n_gpu_procs"] == 4
    own = ResourceConfig(nprocs=16, device="cuda", plugin_args={"n_gpu_procs": 2})
    assert base.plugin_args(own)[1]["n_gpu_procs"] == 2
    assert "n_gpu_procs" not in base.plugin_args(ResourceConfig(nprocs=16, device="cpu"))[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "n_gpu_procs" not in base.plugin_args(ResourceConfig(nprocs=16, device="auto"))[1]
