"""Scoring end to end (preprocessing included, trained model): latency, stages, throughput.

    python benchmarks/scoring.py [--bundle DIR] [--dataset nichart|ixi-t1|synth] [-n 20]
                                 [--nprocs 2] [--keep DIR]

Three measurements, each with a fresh work dir and a fresh OUTPUT_DIR (nothing cached):

* cold: one participant through the CLI in a new process (interpreter start, imports,
  nipype, preprocessing, scoring, derivatives, participant report) — what one SLURM array
  task costs; ``--cold-runs`` times (median), and with ``--baseline-src DIR`` (another
  checkout, e.g. ``git worktree add /tmp/old <commit>``) the same runs of that code,
  interleaved, with the ratio;
* latency: each of the N participants alone through ``runner.run_participant`` in this
  (warm) process: per-participant wall time (median, p90) and per-stage times, read from
  the scores record each scan gets (``preprocessing.timings`` and ``timings``: load,
  inference, native_and_write); "other" is the rest (nipype, sink, report);
* throughput: the N participants in one ``run_participant`` call with ``--nprocs``
  workers: participants per minute.

CPU time (utime + stime of this process and every descendant, from /proc) is printed
next to wall time: on a shared, loaded machine it is the steadier figure.

Peak memory: the largest summed RSS of this process and all its descendants (nipype
workers), sampled every 0.2 s, and the largest single descendant.

The model: ``--bundle`` (default: the quality benchmark's IXI-trained dae when it exists),
otherwise a dae trained here on a small synthetic cohort for ``--train-minutes``. Data:
real T1w scans from ``../shared/data`` (default nichart: 2 mm native, with skull, so deepbet
runs) or a synthetic 2 mm cohort with skull and random pose (``--dataset synth``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import DATA, print_table
from scale import Sampler

DEFAULT_BUNDLE = Path("/tmp/bids-anomaly-quality/train/models/dae")
PRE_STAGES = ["load", "brain_mask", "n4", "registration", "resample_normalise"]
SCORE_STAGES = ["load", "inference", "native_and_write"]


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (empty if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2:].split()


class CpuSampler(Sampler):
    """:class:`scale.Sampler` plus the CPU seconds of the whole process tree.

    Each process's last sampled CPU time (utime + stime) is kept under (pid, start time), so
    a process that ends loses at most one sampling period, and ``cpu_s()`` is the tree's CPU
    use, a figure that a loaded machine distorts far less than wall time.
    """

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(pid, every)
        self.seen: dict[tuple[int, str], float] = {}

    def sample(self, kids: list[int]) -> None:
        super().sample(kids)
        tick = os.sysconf("SC_CLK_TCK")
        for p in (self.pid, *kids):
            f = _stat_fields(p)
            if len(f) > 19:
                self.seen[(p, f[19])] = (int(f[11]) + int(f[12])) / tick

    def cpu_s(self) -> float:
        return sum(self.seen.values())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def synth_dataset(root: Path, n: int, seed: int) -> tuple[Path, list[str]]:
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    n_pat = n // 2
    cohort = generate_cohort(root, SynthConfig(
        n_healthy=0, n_healthy_test=n - n_pat, n_patients=n_pat, voxel_size=2.0,
        with_skull=True, seed=seed))
    labels = sorted(p.name[4:] for p in cohort.root.glob("sub-*") if p.is_dir())
    return cohort.root, labels


def train_bundle(root: Path, minutes: float, nprocs: int) -> Path:
    """A dae trained on a small synthetic healthy cohort (when no --bundle is available)."""
    from bids_anomaly.core.config import ResourceConfig, RunConfig, SelectionConfig, TrainConfig
    from bids_anomaly.runner.train import run_train
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    cohort = generate_cohort(root / "train-bids", SynthConfig(
        n_healthy=8, n_healthy_test=0, n_patients=0, voxel_size=2.0, seed=123))
    cfg = RunConfig(bids_dir=cohort.root, output_dir=root / "train-out",
                    work_dir=root / "train-work",
                    selection=SelectionConfig(healthy_filter=(("split", "train"),)),
                    resources=ResourceConfig(nprocs=nprocs))
    run_train(cfg, TrainConfig(model_type="dae", model_config={"max_minutes": minutes}))
    return root / "train-out" / "models" / "dae"


def run_cfg(bids: Path, out: Path, work: Path, labels: list[str], nprocs: int, omp: int):
    from bids_anomaly.core.config import ResourceConfig, RunConfig, SelectionConfig

    return RunConfig(bids_dir=bids, output_dir=out, work_dir=work,
                     selection=SelectionConfig(participant_labels=tuple(labels)),
                     resources=ResourceConfig(nprocs=nprocs, omp_nthreads=omp, device="cpu"))


def cold_run(root: Path, bids: Path, bundle: Path, label: str, args, sampler,
             src: Path | None) -> tuple[float, float, dict[str, float]]:
    """(wall s, CPU s, stage times) of one participant through the CLI in a new process;
    ``src``: run that source tree's code instead (PYTHONPATH)."""
    cmd = [sys.executable, "-m", "bids_anomaly.cli.main", str(bids), str(root / "out"),
           "participant", "--model", str(bundle), "--participant-label", label,
           "-w", str(root / "work"), "--nprocs", str(args.nprocs), "--device", "cpu"]
    if args.omp_nthreads:
        cmd += ["--omp-nthreads", str(args.omp_nthreads)]
    env = dict(os.environ)
    if src is not None:  # -S: no .pth files, so an editable install cannot shadow ``src``
        import site

        cmd[1:1] = ["-S"]
        env["PYTHONPATH"] = os.pathsep.join([str(src), *site.getsitepackages()])
    t, c = time.perf_counter(), sampler.cpu_s()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root.parent)
    wall = time.perf_counter() - t
    time.sleep(2 * sampler.every)
    cpu = sampler.cpu_s() - c
    if r.returncode:
        sys.exit(f"cold run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    stages = stage_times(root / "out", label)
    if args.keep is None:
        shutil.rmtree(root / "work", ignore_errors=True)
    return wall, cpu, stages


def stage_times(out: Path, label: str) -> dict[str, float]:
    """Stage times from the scores record(s) of one participant (summed over its scans)."""
    times: dict[str, float] = {}
    for rec in sorted((out / f"sub-{label}").rglob("*_desc-anomaly_scores.json")):
        data = json.loads(rec.read_text())
        for k, v in data.get("preprocessing", {}).get("timings", {}).items():
            times[f"pre_{k}"] = times.get(f"pre_{k}", 0.0) + float(v)
        for k, v in data.get("timings", {}).items():
            times[f"score_{k}"] = times.get(f"score_{k}", 0.0) + float(v)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help=f"trained model bundle (default: {DEFAULT_BUNDLE} if present)")
    ap.add_argument("--dataset", default="nichart", choices=["nichart", "ixi-t1", "synth"])
    ap.add_argument("-n", "--participants", type=int, default=20)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--omp-nthreads", type=int, default=0,
                    help="threads per node (0: the CLI default)")
    ap.add_argument("--train-minutes", type=float, default=1.0)
    ap.add_argument("--latency-n", type=int, default=0,
                    help="participants timed alone (0: all of them; -1: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="work here and keep everything (default: temp)")
    ap.add_argument("--cold-runs", type=int, default=3, help="fresh-process runs (median)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="a source tree of another version: its cold runs, interleaved")
    args = ap.parse_args()

    os.environ.setdefault("NIPYPE_NO_ET", "1")
    root = args.keep or Path(tempfile.mkdtemp(prefix="ba-bench-scoring-"))
    root.mkdir(parents=True, exist_ok=True)
    sampler = CpuSampler(os.getpid())
    sampler.start()
    t_imp = time.perf_counter()
    from bids_anomaly.runner.participant import run_participant

    print(f"imports {time.perf_counter() - t_imp:.1f} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs", flush=True)
    try:
        bundle = args.bundle or (DEFAULT_BUNDLE if DEFAULT_BUNDLE.exists() else None)
        if bundle is None:
            t = time.perf_counter()
            bundle = train_bundle(root, args.train_minutes, args.nprocs)
            print(f"trained a synthetic dae in {time.perf_counter() - t:.0f} s", flush=True)
        card = json.loads((bundle / "model.json").read_text())
        print(f"bundle {bundle} ({card['model_type']}, {card['resolution']} mm, trained on "
              f"{card['training']['dataset']})", flush=True)

        if args.dataset == "synth":
            bids, labels = synth_dataset(root / "bids", args.participants, args.seed)
        else:
            bids = DATA / args.dataset
            if not bids.exists():
                print(f"SKIP: {bids} not found")
                return
            labels = sorted(p.name[4:] for p in bids.glob("sub-*") if p.is_dir())
        labels = labels[: args.participants]
        n = len(labels)

        # Cold: one participant, new process, fresh folders (each version in turn).
        versions = {"this": None}
        if args.baseline_src:
            versions["baseline"] = args.baseline_src.resolve()
        colds: dict[str, list[tuple[float, float]]] = {v: [] for v in versions}
        for k in range(args.cold_runs):
            for version, src in versions.items():
                wall, cpu, stages = cold_run(root / f"cold-{version}-{k}", bids, bundle,
                                             labels[0], args, sampler, src)
                colds[version].append((wall, cpu))
                if version == "this":
                    cold_stages = stages
                print(f"cold run {k + 1} ({version}, new process, 1 participant): {wall:.1f} s,"
                      f" CPU {cpu:.1f} s", flush=True)
        cold = statistics.median(w for w, _ in colds["this"])

        rows = []
        n_lat = n if args.latency_n == 0 else max(0, min(n, args.latency_n))
        if n_lat:
            for i, lab in enumerate(labels[:n_lat]):
                out, work = root / "out-latency", root / f"work-latency-{i}"
                t, c = time.perf_counter(), sampler.cpu_s()
                s = run_participant(run_cfg(bids, out, work, [lab], args.nprocs,
                                            args.omp_nthreads), str(bundle))
                wall = time.perf_counter() - t
                time.sleep(2 * sampler.every)  # let the sampler see the last CPU ticks
                cpu = sampler.cpu_s() - c
                st = stage_times(out, lab)
                row = {"participant": lab, "status": "ok" if not s.failed else "FAILED",
                       "wall_s": wall, "cpu_s": cpu, **st}
                row["other"] = wall - sum(st.values())
                rows.append(row)
                print(f"  sub-{lab}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
                if args.keep is None:
                    shutil.rmtree(work, ignore_errors=True)
            cols = (["participant", "status", "wall_s", "cpu_s"] + [f"pre_{k}" for k in PRE_STAGES]
                    + [f"score_{k}" for k in SCORE_STAGES] + ["other"])
            print()
            print_table(rows, cols)

        out, work = root / "out-batch", root / "work-batch"
        t, c = time.perf_counter(), sampler.cpu_s()
        s = run_participant(run_cfg(bids, out, work, labels, args.nprocs, args.omp_nthreads),
                            str(bundle))
        batch = time.perf_counter() - t
        time.sleep(2 * sampler.every)
        batch_cpu = sampler.cpu_s() - c
        n_failed = len(s.failed)
        sampler.stop.set()
        sampler.join()
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0

        print(f"\n{args.dataset}, {n} participants, --nprocs {args.nprocs}, omp-nthreads "
              f"{args.omp_nthreads or 'default'}, CPU, model {card['model_type']}")
        print(f"cold single participant (new process, imports included): median {cold:.1f} s "
              f"of {args.cold_runs}, CPU {statistics.median(c for _, c in colds['this']):.1f} s"
              f" (stages of the last: "
              f"{', '.join(f'{k} {v:.1f}' for k, v in cold_stages.items())})")
        if "baseline" in colds:
            base = statistics.median(w for w, _ in colds["baseline"])
            print(f"  baseline {args.baseline_src}: median {base:.1f} s, CPU "
                  f"{statistics.median(c for _, c in colds['baseline']):.1f} s; this / baseline "
                  f"= {cold / base:.2f}")
        if rows:
            ok = [r_ for r_ in rows if r_["status"] == "ok"]
            walls = [r_["wall_s"] for r_ in ok]
            print(f"per participant, alone, warm process: median {statistics.median(walls):.1f}"
                  f" s, p90 {percentile(walls, 90):.1f} s, min {min(walls):.1f}, max "
                  f"{max(walls):.1f} (n={len(ok)}; target <= 30 s median); CPU time median "
                  f"{statistics.median(r_['cpu_s'] for r_ in ok):.1f} s")
            stage_rows = []
            for c in cols[4:]:
                vals = [r_.get(c, 0.0) for r_ in ok]
                stage_rows.append({"stage": c, "median_s": statistics.median(vals),
                                   "p90_s": percentile(vals, 90),
                                   "share": statistics.median(vals) / statistics.median(walls)})
            print_table(stage_rows, ["stage", "median_s", "p90_s", "share"])
        print(f"batch: {n} participants in {batch:.1f} s ({n_failed} failed): "
              f"{60.0 * n / batch:.2f} participants/min, {batch / n:.1f} s/participant, "
              f"CPU {batch_cpu / n:.1f} s/participant")
        if rows:
            print(f"batch vs alone (ratio of s/participant): "
                  f"{(batch / n) / statistics.median(walls):.2f}")
        print(f"peak memory: tree {sampler.tree_peak / 1024.0:.0f} MiB (this process + workers),"
              f" this process {sampler.main_hwm / 1024.0:.0f} MiB, largest child "
              f"{child_peak:.0f} MiB")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        sampler.stop.set()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
