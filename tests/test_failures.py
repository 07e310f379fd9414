"""Failures of workflow nodes are attributed to the right scan, and every error is visible.

Participants ``1``, ``10`` and ``11`` share prefixes: a failure of ``10`` must never be
recorded against ``1`` (nor ``11``), crash files of a concurrent run into the same
OUTPUT_DIR must never be read, and unreadable results or records become named failures.

The unit tests run tiny nipype workflows of Function nodes (Linear plugin, in-process); the
end-to-end tests share one zscore bundle trained on 4 mm synthetic scans (module fixture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from nipype import Node, Workflow
from nipype.interfaces.utility import Function

from bids_anomaly.bids_io import derivatives
from bids_anomaly.core.config import ResourceConfig, RunConfig
from bids_anomaly.core.errors import ExitCode
from bids_anomaly.core.naming import ScanKey
from bids_anomaly.workflows.base import (
    WorkflowRun,
    node_name,
    result_path,
    run_workflow,
    scan_outcomes,
)

from .conftest import tree_hash

SCANS = ("sub-1", "sub-10", "sub-11")
LINEAR = ResourceConfig(nprocs=1, plugin="Linear")


def _step(x, fail):
    if fail:
        from bids_anomaly.core.errors import DataError

        raise DataError(fail)
    return x


def toy_workflow(base: Path, fails: dict[tuple[str, str], str], chain=("score", "sink"),
                 scans=SCANS) -> tuple[Workflow, dict[str, list[Node]]]:
    """Per scan a chain of nodes ``<prefix>_<scan id>``; ``fails[(prefix, scan)]`` raises."""
    wf = Workflow(name="toy_wf", base_dir=str(base))
    nodes: dict[str, list[Node]] = {}
    for sid in scans:
        made: list[Node] = []
        for prefix in chain:
            node = Node(Function(input_names=["x", "fail"], output_names=["out"],
                                 function=_step), name=node_name(prefix, sid))
            node.inputs.fail = fails.get((prefix, sid), "")
            if made:
                wf.connect(made[-1], "out", node, "x")
            else:
                node.inputs.x = sid
                wf.add_nodes([node])
            made.append(node)
        nodes[sid] = made
    return wf, nodes


def plant_crash(folder: Path, node: str, message: str) -> Path:
    """A nipype-style text crash file, as another run would write it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-x-{node.split('.')[-1]}-1.txt"
    path.write_text(f"Node: {node}\nWorking directory: /elsewhere\n\nNode inputs:\n\n"
                    f"Traceback (most recent call last):\n"
                    f"bids_anomaly.errors.DataError: {message}\n")
    return path


def run_toy(wf: Workflow, crash_dir: Path, before_run=None) -> WorkflowRun:
    """run_workflow with the Linear plugin; ``before_run(wf)`` runs once the run has begun."""
    if before_run is not None:
        real = wf.run

        def run(**kwargs):
            before_run(wf)
            return real(**kwargs)

        wf.run = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIPYPE_CONFIG_DIR", os.environ.get("NIPYPE_CONFIG_DIR", ""))
        return run_workflow(wf, LINEAR, crash_dir)


# -- node names --------------------------------------------------------------------------


def test_node_names_are_one_per_scan_id():
    ids = ["sub-1", "sub-10", "sub-11", "sub-1_ses-0", "sub-10_ses-", "sub-1.0", "sub-1_0",
           "sub-1 0", "sub-1/0", "sub-01"]
    names = [node_name("preproc", s) for s in ids]
    assert len(set(names)) == len(ids), names
    assert node_name("preproc", "sub-10_ses-1") == "preproc_sub-10_ses-1"  # readable
    for name in names:
        Node(Function(input_names=["x"], output_names=["x"], function=_step), name=name)


# -- attribution by exact node identity --------------------------------------------------


@pytest.fixture(scope="module")
def sink_fails(tmp_path_factory):
    """sink_sub-10 fails; another run drops crash files naming sub-1/sub-11 nodes into logs/."""
    root = tmp_path_factory.mktemp("sinkfail")
    logs = root / "out" / "logs"
    crash_dir = logs / "run-mine"
    wf, nodes = toy_workflow(root / "work", {("sink", "sub-10"): "sink failed for sub-10"})

    def other_run(wf):  # during this run: another process's crashes, same node names
        plant_crash(logs, "toy_wf.score_sub-1", "foreign failure of sub-1")
        plant_crash(logs / "run-other", "toy_wf.sink_sub-11", "foreign failure of sub-11")

    run = run_toy(wf, crash_dir, other_run)
    done, failed = scan_outcomes(run, nodes)
    return {"run": run, "done": done, "failed": failed, "crash_dir": crash_dir}


def test_failing_sink_node_fails_its_own_scan_only(sink_fails):
    done, failed = sink_fails["done"], sink_fails["failed"]
    assert sorted(done) == ["sub-1", "sub-11"]
    assert sorted(failed) == ["sub-10"]
    f = failed["sub-10"]
    assert f.message == "sink failed for sub-10"
    assert f.code == ExitCode.DATA_ERROR
    assert Path(f.crash_file).parent == sink_fails["crash_dir"]
    assert "sink_sub-10" in Path(f.crash_file).name


def test_other_runs_crash_files_are_not_read(sink_fails):
    run = sink_fails["run"]
    assert set(run.crashes) == {"toy_wf.sink_sub-10"}
    assert all(p.parent == sink_fails["crash_dir"] for p in run.crashes.values())


def test_failing_score_node_fails_its_scan_with_that_nodes_message(tmp_path):
    wf, nodes = toy_workflow(tmp_path / "work", {("score", "sub-1"): "cannot score sub-1"})
    run = run_toy(wf, tmp_path / "logs" / "run-x")
    done, failed = scan_outcomes(run, nodes)
    assert sorted(done) == ["sub-10", "sub-11"]
    assert failed["sub-1"].message == "cannot score sub-1"
    # Linear reports the sink it skipped as "end": the graph says it did not run.
    assert run.states["toy_wf.sink_sub-1"] == "skipped"
    assert run.states["toy_wf.sink_sub-10"] == "finished"


def test_run_gets_its_own_crash_folder(tmp_path):
    """setup_run: a crash folder per process under logs/, never logs/ itself."""
    from bids_anomaly.runner.common import LOG, setup_run

    bids = tmp_path / "bids"
    bids.mkdir()
    cfg = RunConfig(bids, tmp_path / "out", tmp_path / "work")
    handlers = list(LOG.handlers)
    try:
        crash_dir = setup_run(cfg)
    finally:
        for h in LOG.handlers[:]:
            if h not in handlers:
                LOG.removeHandler(h)
                h.close()
    logs = cfg.output_dir / "logs"
    assert crash_dir.parent == logs and crash_dir.name.endswith(f"-{os.getpid()}")
    assert crash_dir.with_suffix(".log").is_file()  # next to this run's log


# -- errors that used to vanish ----------------------------------------------------------


def test_unreadable_result_file_is_a_failure_naming_the_cause(tmp_path):
    wf, nodes = toy_workflow(tmp_path / "work", {}, chain=("preproc",))
    run = run_toy(wf, tmp_path / "logs" / "run-x")
    res = result_path(wf, nodes["sub-11"][0])
    res.write_bytes(b"this is not a gzipped pickle")
    done, failed = scan_outcomes(run, nodes)
    assert sorted(done) == ["sub-1", "sub-10"]
    msg = failed["sub-11"].message
    assert str(res) in msg and "cannot read result file" in msg
    assert re.search(r"Gzip|gzip|pickl|unpickl", msg), msg  # the cause, not just "failed"


def test_nipype_error_fails_a_scan_that_did_not_finish(tmp_path):
    """nipype raised; sub-11 never ran (a stale result of an earlier run is on disk)."""
    crash_dir = tmp_path / "logs" / "run-x"
    wf, nodes = toy_workflow(tmp_path / "work", {}, chain=("preproc",))
    run_toy(wf, crash_dir)  # every node finishes: result files on disk
    wf, nodes = toy_workflow(tmp_path / "work", {("preproc", "sub-10"): "bad sub-10"},
                             chain=("preproc",))
    real = wf.run

    def broken_pool(**kwargs):
        wf.remove_nodes([nodes["sub-11"][0]])  # lost with its worker
        try:
            real(**kwargs)
        except Exception:  # sub-10's failure: nipype raises, then the pool breaks too
            pass
        raise RuntimeError("the process pool broke: a worker died")

    wf.run = broken_pool
    run = run_toy(wf, crash_dir)
    assert run.error and "the process pool broke" in run.error
    done, failed = scan_outcomes(run, nodes)
    assert sorted(done) == ["sub-1"]
    assert failed["sub-10"].message == "bad sub-10"  # its own crash file
    assert failed["sub-10"].crash_file
    assert "the process pool broke: a worker died" in failed["sub-11"].message
    assert failed["sub-11"].crash_file is None


def test_corrupt_scores_record_is_a_failed_row(tmp_path):
    out = tmp_path / "out"
    derivatives.write_failure(out, ScanKey("1"), "bad scan", {})
    corrupt = out / "sub-10/anat/sub-10_desc-anomaly_scores.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"scan_id": "sub-10", "status": "ok", ')  # cut short
    not_a_record = out / "sub-11/ses-2/anat/sub-11_ses-2_desc-anomaly_scores.json"
    not_a_record.parent.mkdir(parents=True)
    not_a_record.write_text("[1, 2]")
    df = derivatives.write_group_table(out).set_index("scan_id")
    assert sorted(df.index) == ["sub-1", "sub-10", "sub-11_ses-2"]
    assert df.loc["sub-10", "status"] == "failed"
    assert df.loc["sub-10", "participant_id"] == "sub-10"
    assert str(corrupt) in df.loc["sub-10", "error"]
    assert "Expecting" in df.loc["sub-10", "error"]  # the JSON problem
    assert df.loc["sub-11_ses-2", "status"] == "failed"
    assert df.loc["sub-11_ses-2", "session_id"] == "ses-2"
    assert str(not_a_record) in df.loc["sub-11_ses-2", "error"]
    table = pd.read_csv(out / "group_anomaly.tsv", sep="\t").set_index("scan_id")
    assert table.loc["sub-10", "status"] == "failed"


# -- end to end: participants 1, 10 and 11 -----------------------------------------------


def cli(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "250"}, **kwargs)


def _rename_subject(bids: Path, old: str, new: str) -> None:
    shutil.move(bids / f"sub-{old}", bids / f"sub-{new}")
    for p in sorted((bids / f"sub-{new}").rglob("*")):
        if p.is_file() and f"sub-{old}" in p.name:
            p.rename(p.with_name(p.name.replace(f"sub-{old}", f"sub-{new}")))
    tsv = bids / "participants.tsv"
    tsv.write_text(tsv.read_text().replace(f"sub-{old}\t", f"sub-{new}\t"))


def _shrink_brain(path: Path) -> None:
    """Keep a 5^3-voxel block: a valid image (passes the input checks) with no brain."""
    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = np.zeros_like(data)
    c = tuple(slice(n // 2 - 2, n // 2 + 3) for n in data.shape)
    out[c] = data[c] + 100.0
    nb.save(nb.Nifti1Image(out, img.affine), path)


def summary_rows(stdout: str) -> dict[str, str]:
    """scan id -> status from the CLI's summary table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        if len(cells) > 3 and cells[1].startswith("sub-"):
            rows[cells[1]] = cells[2]
    return rows


def flat(text: str) -> str:
    return re.sub(r"[\s│┃|]+", "", text)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Participants 1, 2, 11 (healthy, the training set) and 10 (a valid image, no brain).

    The bundle is trained with ``-w work`` so that scoring 1 and 11 with the same work dir
    reuses their preprocessing.
    """
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("failures")
    c = generate_cohort(root / "bids", SynthConfig(
        n_healthy=3, n_healthy_test=1, n_patients=0, voxel_size=4.0, template_resolution=2,
        n_sessions=1, with_skull=False, seed=13))
    bids = c.root
    shutil.rmtree(bids / "derivatives", ignore_errors=True)
    for old, new in (("h01", "1"), ("h02", "11"), ("h03", "2"), ("t01", "10")):
        _rename_subject(bids, old, new)
    _shrink_brain(bids / "sub-10/anat/sub-10_T1w.nii.gz")
    r = cli("train", bids, root / "train", "--participant-label", "1", "2", "11",
            "--model-type", "zscore", "--brain-extraction", "none", "-w", root / "work",
            "--nprocs", "2", "--registration", "affine-coarse")
    assert r.returncode == 0, r.stdout + r.stderr
    return {"bids": bids, "bundle": root / "train" / "models" / "zscore", "root": root,
            "hash": tree_hash(bids)}


@pytest.fixture(scope="module")
def scored(cohort):
    root = cohort["root"]
    out = root / "out"
    run = cli(cohort["bids"], out, "participant", "--model", cohort["bundle"],
              "--participant-label", "1", "10", "11", "-w", root / "work", "--nprocs", "2")
    group = cli(cohort["bids"], out, "group")
    assert tree_hash(cohort["bids"]) == cohort["hash"]
    return {"run": run, "group": group, "out": out}


def test_only_the_broken_participant_fails_in_the_summary(scored):
    r = scored["run"]
    assert r.returncode == 65, r.stdout + r.stderr  # 10's DataError
    assert summary_rows(r.stdout) == {"sub-1": "ok", "sub-10": "failed", "sub-11": "ok"}, \
        r.stdout
    assert flat("sub-10_T1w.nii.gz: brain extraction found") in flat(r.stdout)


def test_per_scan_records_and_outputs(scored):
    out = scored["out"]
    for s in ("1", "11"):
        rec = json.loads((out / f"sub-{s}/anat/sub-{s}_desc-anomaly_scores.json").read_text())
        assert rec["status"] == "ok" and rec["score"] is not None, (s, rec)
        assert (out / f"sub-{s}/anat/sub-{s}_stat-anomaly_statmap.nii.gz").is_file()
    rec = json.loads((out / "sub-10/anat/sub-10_desc-anomaly_scores.json").read_text())
    assert rec["status"] == "failed"
    assert "sub-10_T1w.nii.gz" in rec["error"] and "brain extraction found" in rec["error"]
    assert not list((out / "sub-10").rglob("*.nii.gz"))


def test_group_table(scored):
    assert scored["group"].returncode == 0, scored["group"].stdout + scored["group"].stderr
    df = pd.read_csv(scored["out"] / "group_anomaly.tsv", sep="\t").set_index("participant_id")
    assert dict(df["status"]) == {"sub-1": "ok", "sub-10": "failed", "sub-11": "ok"}
    assert "brain extraction found" in df.loc["sub-10", "error"]
    assert df.loc[["sub-1", "sub-11"], "score"].notna().all()


def test_crash_file_in_the_runs_folder_and_its_participants_report(scored):
    out = scored["out"]
    crashes = sorted((out / "logs").rglob("crash-*"))
    assert len(crashes) == 1, crashes
    crash = crashes[0]
    assert re.fullmatch(r"run-\d{8}-\d{6}-\d+", crash.parent.name), crash
    assert crash.read_text().startswith("Node: preproc_wf.preproc_sub-10\n")
    assert crash.name in (out / "sub-10.html").read_text()
    assert crash.name not in (out / "sub-1.html").read_text()


def test_concurrent_runs_never_report_each_others_crashes(cohort):
    """A (10: crashes) and B (1 and 11) at once into one OUTPUT_DIR, separate work dirs.

    B finds sub-1 preprocessed in its work dir but preprocesses sub-11 (seconds), so A's
    crash lands while B's workflows run.
    """
    root = cohort["root"]
    out = root / "shared-out"
    node = node_name("preproc", "sub-1")
    shutil.copytree(root / "work" / "preproc_wf" / node, root / "work-B" / "preproc_wf" / node)
    common = [sys.executable, "-m", "bids_anomaly.cli.main", str(cohort["bids"]), str(out),
              "participant", "--model", str(cohort["bundle"]), "--nprocs", "2"]
    env = {**os.environ, "COLUMNS": "250"}
    procs = {name: subprocess.Popen(
        [*common, "--participant-label", *labels, "-w", str(root / f"work-{name}")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for name, labels in (("B", ("1", "11")), ("A", ("10",)))}
    try:
        res = {name: (p.communicate(timeout=600)[0], p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    (b_out, b_code), (a_out, a_code) = res["B"], res["A"]
    assert b_code == 0, b_out
    assert summary_rows(b_out) == {"sub-1": "ok", "sub-11": "ok"}, b_out
    assert a_code == 65, a_out
    assert summary_rows(a_out) == {"sub-10": "failed"}, a_out
    for s in ("1", "11"):
        rec = json.loads((out / f"sub-{s}/anat/sub-{s}_desc-anomaly_scores.json").read_text())
        assert rec["status"] == "ok", rec
    folders = {p.parent.name for p in (out / "logs").rglob("crash-*")}
    assert len(folders) == 1  # only A crashed, into its own folder
