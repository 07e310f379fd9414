"""Concurrent participant-level runs into one OUTPUT_DIR, as a SLURM job array does.

Eight ``bids-anomaly BIDS OUT participant --participant-label <one>`` processes start at
once, each with its own work dir, all writing into the same OUTPUT_DIR: the shared files
(``dataset_description.json``, ``.bidsignore``, ``logs/``) must come out whole, every
participant's derivatives must be complete and readable, and nothing half-written (``.tmp``)
may be left behind. The group level then sees all eight.

The processes use nipype's Linear plugin (nodes run in the process itself): with the default
MultiProc plugin each process also starts a forkserver whose worker imports torch, nipype and
the rest again, which doubles the CPU time (about 30 s instead of 15 s per participant here)
and pushes eight of them on two cores past two minutes. The writes into OUTPUT_DIR are the
same code either way; the default plugin is covered by test_end_to_end and
test_container_contract.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.bids_io.derivatives import BIDSIGNORE

LABELS = ["t01", "t02", "t03", "t04", "p01", "p02", "p03", "p04"]
TIMEOUT = 900


def _cli() -> list[str]:
    exe = Path(sysconfig.get_path("scripts")) / "bids-anomaly"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "bids_anomaly.cli.main"]


def _env() -> dict[str, str]:
    # 8 processes share the CPUs: one thread each, idle OpenMP threads asleep.
    return {**os.environ, "NIPYPE_NO_ET": "1", "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
            "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("concurrency")
    cohort = generate_cohort(root / "bids", SynthConfig(
        n_healthy=3, n_healthy_test=4, n_patients=4, voxel_size=4.0, template_resolution=2,
        with_skull=False, seed=31))
    train = subprocess.run(
        [*_cli(), "train", str(cohort.root), str(root / "models-out"), "--model-type", "zscore",
         "--registration", "affine-coarse", "--healthy-filter", "split=train",
         "-w", str(root / "train-work"), "--nprocs", "1",
         "--plugin", "Linear"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert train.returncode == 0, f"training failed:\n{train.stdout}\n{train.stderr}"
    bundle = root / "models-out" / "models" / "zscore"

    out = root / "out"
    procs, logs = {}, {}
    t0 = time.perf_counter()
    for label in LABELS:
        logs[label] = open(root / f"stdout-{label}.txt", "w+")  # closed below
        procs[label] = subprocess.Popen(
            [*_cli(), str(cohort.root), str(out), "participant", "--model", str(bundle),
             "--participant-label", label, "-w", str(root / f"work-{label}"), "--nprocs", "1",
             "--plugin", "Linear"],
            stdout=logs[label], stderr=subprocess.STDOUT, text=True, env=_env())
    codes, outputs = {}, {}
    try:
        deadline = time.monotonic() + TIMEOUT
        for label, proc in procs.items():
            codes[label] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for label, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            logs[label].seek(0)
            outputs[label] = logs[label].read()
            logs[label].close()
    seconds = time.perf_counter() - t0
    group = subprocess.run([*_cli(), str(cohort.root), str(out), "group"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    return {"cohort": cohort, "out": out, "codes": codes, "outputs": outputs,
            "group": group, "seconds": seconds}


def test_every_process_succeeds(concurrent):
    failed = {k: v for k, v in concurrent["codes"].items() if v != 0}
    assert not failed, "\n\n".join(f"sub-{k}: exit {v}\n{concurrent['outputs'][k][-3000:]}"
                                   for k, v in failed.items())
    print(f"8 concurrent participant runs: {concurrent['seconds']:.0f} s")


def test_every_participant_complete(concurrent):
    out = concurrent["out"]
    for label in LABELS:
        anat = out / f"sub-{label}" / "anat"
        names = {p.name for p in anat.iterdir()}
        for suffix in ("space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
                       "space-MNI152NLin2009aSym_res-2_stat-anomaly_statmap.nii.gz",
                       "stat-anomaly_statmap.nii.gz", "label-anomaly_mask.nii.gz",
                       "desc-anomaly_clusters.tsv", "desc-anomaly_scores.json",
                       "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat"):
            assert f"sub-{label}_{suffix}" in names, (label, suffix)
        assert (out / f"sub-{label}.html").is_file()
        record = json.loads((anat / f"sub-{label}_desc-anomaly_scores.json").read_text())
        assert record["participant_id"] == f"sub-{label}" and record["status"] == "ok"


def test_every_file_is_readable(concurrent):
    out = concurrent["out"]
    images = sorted(out.rglob("*.nii.gz"))
    assert len(images) >= 8 * 6
    for path in images:
        data = np.asarray(nb.load(path).dataobj)  # decompresses the whole file
        assert data.size and np.isfinite(data).all(), path
    for path in sorted(out.rglob("*.json")):
        json.loads(path.read_text())
    for path in sorted(out.rglob("*.tsv")):
        pd.read_csv(path, sep="\t")


def test_shared_files_intact(concurrent):
    out = concurrent["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["bids-anomaly"]
    assert (out / ".bidsignore").read_text().splitlines() == BIDSIGNORE
    leftovers = [str(p) for p in out.rglob("*") if ".tmp" in p.name or ".write-test" in p.name]
    assert not leftovers, leftovers


def test_group_level_sees_everyone(concurrent):
    group = concurrent["group"]
    assert group.returncode == 0, group.stdout + group.stderr
    out = concurrent["out"]
    df = pd.read_csv(out / "group_anomaly.tsv", sep="\t")
    assert len(df) == 8
    assert sorted(df.participant_id) == sorted(f"sub-{s}" for s in LABELS)
    assert set(df.status) == {"ok"}
    assert (out / "group_report.html").is_file()


# -- the shared files, raced directly (fast, many processes released together) ------------


def _race(args) -> None:
    barrier, out, bids, n = args
    from bids_anomaly.bids_io import derivatives

    barrier.wait()
    for _ in range(n):
        derivatives.ensure_dataset(out, bids)
        derivatives.write_group_table(out)


def test_shared_files_under_a_direct_race(tmp_path):
    """16 processes create the dataset files and rewrite the group table at the same time."""
    from bids_anomaly.bids_io import derivatives

    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    ctx = mp.get_context("fork")
    n_workers = 16
    barrier = ctx.Barrier(n_workers)
    workers = [ctx.Process(target=_race, args=((barrier, out, bids, 5),))
               for _ in range(n_workers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * n_workers
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert (out / ".bidsignore").read_text().splitlines() == derivatives.BIDSIGNORE
    assert (out / "group_anomaly.tsv").read_text().split("\t")[0] == "participant_id"
    json.loads((out / "group_anomaly.json").read_text())
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
