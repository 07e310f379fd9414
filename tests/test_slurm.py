"""The SLURM recipes against a real scheduler: a throw-away single-node cluster.

``tests/slurm_cluster.py`` starts munged, slurmctld and slurmd (Debian's ``slurm-wlm`` and
``munge``, as root) once for this module; every test here that needs it skips, with the
reason and the daemons' log tails, where it cannot start. On that cluster:

* ``containers/submit.sh --native`` (no Apptainer here: the installed CLI in every task)
  scores a four-participant cohort as a job array, one task per participant, and the group
  job runs after the array. One participant's image is broken: its task fails alone, the
  others complete and the group job still runs; once the image is fixed,
  ``submit.sh --resubmit-failed <array job>`` re-runs that one task and the group job, and
  the derivatives and the group table then equal those of a plain local run (MultiProc).
* ``--plugin SLURM`` (nipype's plugin, ``containers/nipype_slurm_plugin.json``) runs the
  workflow nodes as SLURM jobs and writes the same derivatives as MultiProc.
* ``submit.sh --dry-run`` prints the sbatch command lines: --nprocs/--mem/--time/--device
  become --cpus-per-task/--mem/--time/--gres (no cluster needed).

Job states come from the cluster's jobcomp/filetxt file (there is no slurmdbd for sacct);
each test prints them as a sacct-style table (``pytest -s`` shows it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd
import pytest

from .derivatives_compare import assert_same_outputs
from .slurm_cluster import ClusterUnavailable, SlurmCluster

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
SUBMIT = CONTAINERS / "submit.sh"
TIMEOUT = 600
BROKEN = "p01"  # participants.tsv row 4: array task 4
# Wall-clock values and run-specific provenance, which differ between two runs.


def _scripts() -> str:
    return sysconfig.get_path("scripts")


def _cli() -> list[str]:
    exe = Path(_scripts()) / "bids-anomaly"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "bids_anomaly.cli.main"]


def _env(base: dict[str, str] | None = None) -> dict[str, str]:
    """One thread per process; the installed console script first on PATH (the jobs inherit
    this environment through sbatch's default --export=ALL)."""
    env = dict(base if base is not None else os.environ)
    env.update(NIPYPE_NO_ET="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", COLUMNS="200",
               PATH=f"{_scripts()}{os.pathsep}{env.get('PATH', os.defpath)}")
    return env


def sacct_table(records: list[dict[str, str]]) -> str:
    """Job completion records as ``sacct -X -o JobID,JobName,State,ExitCode,Submit,...``
    would print them (times of day only)."""
    head = ("JobID", "JobName", "State", "ExitCode", "Submit", "Eligible", "Start", "End",
            "AllocTRES")
    rows = [head]
    for r in sorted(records, key=lambda r: (r.get("StartTime", ""), int(r["JobId"]))):
        task = r.get("ArrayTaskId", "")
        job = f"{r['ArrayJobId']}_{task}" if task not in ("", "4294967294") else r["JobId"]
        rows.append((job, r.get("Name", "")[:34], r.get("JobState", ""), r.get("ExitCode", ""),
                     *(r.get(f"{k}Time", "")[11:] for k in ("Submit", "Eligible", "Start", "End")),
                     r.get("Tres", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The module's cluster; its daemons are stopped (by pid) and checked gone at the end."""
    root = tmp_path_factory.mktemp("slurm")
    try:
        c = SlurmCluster.start(root / "cluster")
    except ClusterUnavailable as exc:
        pytest.skip(f"no test SLURM cluster: {exc}")
    print(f"\nSLURM test cluster up in {c.start_seconds:.1f} s: pids {c.pids}, "
          f"RealMemory {c.mem_mb} MB, {c.conf}")
    try:
        yield c
    finally:
        pids = c.pids
        left = c.stop()
        assert not left, f"daemons still running after stop: {left} of {pids}"
        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"{name} ({pid}) alive"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four participants (4 mm, skull-free), a zscore bundle from the three healthy ones and
    a plain local run of all four with the default MultiProc plugin: the reference. It shares
    the training's work dir, so the three healthy scans' preprocessing (the same recipe) comes
    from nipype's cache, as it would for a user scoring their training set."""
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("slurm-cohort")
    generated = generate_cohort(root / "bids", SynthConfig(
        n_healthy=3, n_healthy_test=0, n_patients=1, voxel_size=4.0, template_resolution=2,
        with_skull=False, seed=41))
    bids = generated.root
    shutil.rmtree(bids / "derivatives", ignore_errors=True)
    train = subprocess.run(
        [*_cli(), "train", str(bids), str(root / "train"), "--model-type", "zscore",
         "--registration", "affine-coarse", "--healthy-filter", "split=train",
         "-w", str(root / "train-work"), "--nprocs", "1",
         "--plugin", "Linear"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert train.returncode == 0, train.stdout + train.stderr
    bundle = root / "train" / "models" / "zscore"
    ref = root / "ref"
    t0 = time.perf_counter()
    local = subprocess.run(
        [*_cli(), str(bids), str(ref), "participant", "--model", str(bundle),
         "-w", str(root / "train-work"), "--nprocs", "2"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert local.returncode == 0, local.stdout + local.stderr
    group = subprocess.run([*_cli(), str(bids), str(ref), "group"], capture_output=True,
                           text=True, timeout=TIMEOUT, env=_env())
    assert group.returncode == 0, group.stdout + group.stderr
    print(f"\nlocal reference run (MultiProc, 4 participants): {time.perf_counter() - t0:.0f} s")
    labels = pd.read_csv(bids / "participants.tsv", sep="\t").participant_id.tolist()
    return {"root": root, "bids": bids, "bundle": bundle, "ref": ref, "labels": labels}


# -- comparing derivatives --------------------------------------------------------------------


def _group_table(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / "group_anomaly.tsv", sep="\t")
    return df.sort_values("participant_id").reset_index(drop=True)


# -- submit.sh on the cluster -----------------------------------------------------------------


def _submit(cluster: SlurmCluster, cwd: Path, bids: Path, out: Path, bundle: Path,
            *options: str) -> tuple[str, str, str]:
    """Run submit.sh --native; (array job id, group job id, its stdout)."""
    env = _env(cluster.env)
    env.update(NPROCS="1", MEM="1G", GROUP_MEM="1G", TIME="00:20:00",
               WORK_ROOT=str(cwd / "scratch"), EXTRA_ARGS="--plugin Linear")
    proc = subprocess.run(
        ["bash", str(SUBMIT), "--native", *options, str(bids), str(out), str(bundle)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"job array (\d+)", proc.stdout)
    group = re.search(r"group level: job (\d+) \(after (\d+)\)", proc.stdout)
    assert array and group and group.group(2) == array.group(1), proc.stdout
    return array.group(1), group.group(1), proc.stdout


def _check_chain(cluster: SlurmCluster, array: str, group: str, tasks: list[int],
                 cwd: Path) -> dict[int, dict[str, str]]:
    """Wait for the array and the group job; the group job started after every task ended.
    Returns the tasks' completion records by task id."""
    queued = cluster.run(["squeue", "-h", "-j", group, "-o", "%i %T %r %E"]).stdout.strip()
    records = cluster.wait_jobs([array, group], timeout=TIMEOUT)
    print(f"\nsqueue right after submit.sh (group job): {queued or '(already ended)'}")
    print(sacct_table(records))
    by_task = {int(r["ArrayTaskId"]): r for r in records if r.get("ArrayJobId") == array
               and r["JobId"] != group}
    assert sorted(by_task) == tasks, (sorted(by_task), tasks)
    (grp,) = [r for r in records if r["JobId"] == group]
    assert grp["JobState"] == "COMPLETED", (grp, _logs(cwd))
    assert grp["StartTime"] >= max(r["EndTime"] for r in by_task.values()), \
        "the group job must start after every array task has ended"
    if queued:
        assert "Dependency" in queued or "RUNNING" in queued, queued
    for r in by_task.values():  # --cpus-per-task / --mem from NPROCS / MEM
        assert "cpu=1" in r["Tres"] and "mem=1G" in r["Tres"], r["Tres"]
    return by_task


def _logs(cwd: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted((cwd / "logs").glob("*")))


def test_submit_array_then_group_with_failed_task_resubmitted(cluster, cohort, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(cohort["bids"], bids)
    labels = cohort["labels"]
    n = len(labels)
    assert labels.index(f"sub-{BROKEN}") == 3  # array task 4
    image = bids / f"sub-{BROKEN}" / "anat" / f"sub-{BROKEN}_T1w.nii.gz"
    good = image.read_bytes()
    image.write_bytes(good[:3000])  # truncated: reading it fails, the task fails
    out = tmp_path / "out"

    t0 = time.perf_counter()
    array, group, stdout = _submit(cluster, tmp_path, bids, out, cohort["bundle"])
    assert f"job array {array} (tasks 1-{n} of {n} participants)" in stdout
    tasks = _check_chain(cluster, array, group, list(range(1, n + 1)), tmp_path)
    print(f"array of {n} tasks + group job: {time.perf_counter() - t0:.0f} s")
    states = {t: r["JobState"] for t, r in tasks.items()}
    assert states == {**{t: "COMPLETED" for t in range(1, n + 1)}, 4: "FAILED"}, \
        (states, _logs(tmp_path))
    assert tasks[4]["ExitCode"] != "0:0"
    table = _group_table(out)
    assert len(table) == n
    status = dict(zip(table.participant_id, table.status))
    assert status.pop(f"sub-{BROKEN}") == "failed" and set(status.values()) == {"ok"}

    # Fix the input, re-submit only the failed task (found from the scheduler's records).
    image.write_bytes(good)
    t0 = time.perf_counter()
    array2, group2, stdout = _submit(cluster, tmp_path, bids, out, cohort["bundle"],
                                     "--resubmit-failed", array)
    assert f"array job {array}: re-submitting tasks 4" in stdout, stdout
    assert f"job array {array2} (tasks 4 of {n} participants)" in stdout
    tasks2 = _check_chain(cluster, array2, group2, [4], tmp_path)
    print(f"re-submitted task 4 + group job: {time.perf_counter() - t0:.0f} s")
    assert tasks2[4]["JobState"] == "COMPLETED", _logs(tmp_path)

    # Nothing left to re-submit.
    proc = subprocess.run(["bash", str(SUBMIT), "--native", "--resubmit-failed", array2,
                           str(bids), str(out), str(cohort["bundle"])], cwd=tmp_path,
                          env=_env(cluster.env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "nothing to re-submit" in proc.stdout, proc.stderr

    # The dataset is complete and equals the plain local run.
    for sub in labels:
        assert_same_outputs(cohort["ref"], out, f"{sub}/**/*")
    pd.testing.assert_frame_equal(_group_table(out), _group_table(cohort["ref"]))
    assert set(_group_table(out).status) == {"ok"}
    # A successful task removes its work dir; none is left.
    assert not list((tmp_path / "scratch" / "bids-anomaly-work").glob("sub-*"))


# -- nipype's SLURM plugin --------------------------------------------------------------------


def test_nipype_slurm_plugin_matches_multiproc(cluster, cohort, tmp_path):
    args = json.loads((CONTAINERS / "nipype_slurm_plugin.json").read_text())
    # The example asks 8G per node: less where the test node has less.
    if cluster.mem_mb < 8 * 1024:
        args["sbatch_args"] = re.sub(r"--mem=\S+", "--mem=1G", args["sbatch_args"])
    plugin_args = tmp_path / "plugin_args.json"
    plugin_args.write_text(json.dumps(args))
    out = tmp_path / "out"
    before = {r["JobId"] for r in cluster.jobcomp()}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*_cli(), str(cohort["bids"]), str(out), "participant", "--model",
         str(cohort["bundle"]), "--participant-label", "p01", "-w",
         str(tmp_path / "work"), "--plugin", "SLURM", "--plugin-args", str(plugin_args)],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(cluster.env), cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = [r for r in cluster.jobcomp() if r["JobId"] not in before]
    print(f"\n--plugin SLURM, 1 participant: {seconds:.0f} s, {len(jobs)} SLURM jobs\n"
          + sacct_table(jobs))
    names = [r["Name"] for r in jobs]
    # nipype names each job <node>.<workflow>.<LOGNAME>: one per node of the participant.
    assert sorted(n.split(".")[0] for n in names) == [
        "preproc_sub-p01", "score_sub-p01", "sink_sub-p01"], names
    assert {r["JobState"] for r in jobs} == {"COMPLETED"}
    want = re.search(r"--cpus-per-task=(\d+)", args["sbatch_args"]).group(1)
    assert all(f"cpu={want}" in r["Tres"] for r in jobs), [r["Tres"] for r in jobs]
    assert_same_outputs(cohort["ref"], out, "sub-p01/**/*")


# -- resource requests: submit.sh --dry-run (no cluster) -------------------------------------


def _dry_run(tmp_path: Path, *options: str, env: dict | None = None) -> list[list[str]]:
    bids = tmp_path / "bids"
    bids.mkdir(exist_ok=True)
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    (tmp_path / "model").mkdir(exist_ok=True)
    proc = subprocess.run(
        ["bash", str(SUBMIT), "--dry-run", *options, str(bids), str(tmp_path / "out"),
         str(tmp_path / "model"), "none", "--", "--account=abc"],
        cwd=tmp_path, env={**_env(), **(env or {})}, capture_output=True, text=True,
        timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "logs").exists(), "a dry run creates nothing"
    return [shlex.split(line.split(" <<")[0]) for line in proc.stdout.splitlines()
            if line.startswith(("sbatch ", "export "))]


def test_dry_run_maps_resources_to_sbatch(tmp_path):
    lines = _dry_run(tmp_path, "--nprocs", "3", "--mem", "1.5GB", "--time", "01:30:00",
                     "--device", "cuda:1", "--array", "2,3")
    exports = dict(line[1].split("=", 1) for line in lines if line[0] == "export")
    array, group = [line for line in lines if line[0] == "sbatch"]
    print("\n" + "\n".join(shlex.join(line) for line in (array, group)))
    assert array[:2] == ["sbatch", "--parsable"]
    assert array[2:] == ["--cpus-per-task=3", "--mem=1536M", "--time=01:30:00", "--gres=gpu:1",
                         "--account=abc", "--array=2,3%50",
                         str(CONTAINERS / "slurm_array.sbatch")]
    assert exports["USE_GPU"] == "1" and exports["IMAGE"] == "none"
    assert Path(exports["BIDS_ANOMALY"]).name == "bids-anomaly"
    assert "--dependency=afterany:ARRAY_JOB_ID" in group and "--account=abc" in group
    assert "--mem=4G" in group and "--cpus-per-task=1" in group

    # The environment spelling, the app's memory units, no GPU for cpu.
    lines = _dry_run(tmp_path, env={"NPROCS": "2", "MEM": "8GB", "DEVICE": "cpu",
                                    "MAX_PARALLEL": "7"})
    array = [line for line in lines if line[0] == "sbatch"][0]
    assert array[2:5] == ["--cpus-per-task=2", "--mem=8G", "--account=abc"]
    assert "--array=1-3%7" in array and not any("gres" in a for a in array)
    # Nothing given: the #SBATCH defaults of slurm_array.sbatch apply.
    array = [line for line in _dry_run(tmp_path) if line[0] == "sbatch"][0]
    assert array[2:] == ["--account=abc", "--array=1-3%50",
                         str(CONTAINERS / "slurm_array.sbatch")]


@pytest.mark.parametrize("options, message", [
    (["--mem", "lots"], "--mem lots"),
    (["--nprocs", "0"], "--nprocs 0"),
    (["--device", "tpu"], "--device tpu"),
    (["--array", "2,9"], "task 9 is outside 1-3"),
    (["--array", "x"], "--array x"),
])
def test_dry_run_refuses_bad_requests(tmp_path, options, message):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    (tmp_path / "model").mkdir()
    proc = subprocess.run(
        ["bash", str(SUBMIT), "--dry-run", "--native", *options, str(bids),
         str(tmp_path / "out"), str(tmp_path / "model")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 64, proc.stdout + proc.stderr
    assert message in proc.stderr
