"""Scaling of the participant level: time per participant and peak memory vs cohort size.

    python benchmarks/scale.py [--sizes 50 100 200] [--voxel-size 4] [--nprocs 2] [--keep DIR]

A synthetic skull-free cohort (4 training participants + max(sizes) test participants) is
generated, a zscore bundle trained once, then each size is scored by the CLI (a subprocess,
fresh work and output folders, so nothing is cached). Per size: wall time, time per
participant, peak RSS of the main process (VmHWM), peak summed RSS of all processes and
the largest descendant's peak (the highest VmHWM of any worker seen by the sampler, per size:
getrusage(RUSAGE_CHILDREN) would be a running maximum that includes the training run).
Ratios against the smallest size should be ~1 for time per participant (linear cost) and
for memory (flat memory). Each size's row is printed as soon as it is measured.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import print_table

from bids_anomaly.core.interrupt import descendants


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler(threading.Thread):
    """Polls /proc: the main process's VmHWM, the summed VmRSS of the whole tree and the
    highest VmHWM of any descendant."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.main_hwm = self.tree_peak = self.child_hwm = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample(descendants(self.pid))
            self.stop.wait(self.every)

    def sample(self, kids: list[int]) -> None:
        """One poll of the main process and its descendants ``kids``."""
        self.main_hwm = max(self.main_hwm, _status_kb(self.pid, "VmHWM"))
        tree = _status_kb(self.pid, "VmRSS") + sum(_status_kb(p, "VmRSS") for p in kids)
        self.tree_peak = max(self.tree_peak, tree)
        self.child_hwm = max([self.child_hwm, *(_status_kb(p, "VmHWM") for p in kids)])


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[50, 100, 200])
    ap.add_argument("--voxel-size", type=float, default=4.0, choices=[3.0, 4.0])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="Work here and keep everything (default: temp).")
    args = ap.parse_args()
    sizes = sorted(set(args.sizes))

    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = args.keep or Path(tempfile.mkdtemp(prefix="ba-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        cohort = generate_cohort(root / "bids", SynthConfig(
            n_healthy=4, n_healthy_test=max(sizes), n_patients=0, voxel_size=args.voxel_size,
            template_resolution=2, with_skull=False, seed=args.seed))
        print(f"generated {4 + max(sizes)} participants in {time.perf_counter() - t:.0f} s",
              flush=True)
        t = time.perf_counter()
        r = subprocess.run(cli("train", cohort.root, root / "models-out", "--healthy-filter",
                               "split=train", "--model-type", "zscore", "-w",
                               root / "train-work", "--nprocs", args.nprocs),
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"training failed:\n{r.stdout}\n{r.stderr}")
        print(f"trained zscore in {time.perf_counter() - t:.0f} s", flush=True)
        bundle = root / "models-out" / "models" / "zscore"
        tests = sorted(p.name[4:] for p in cohort.root.glob("sub-t*"))
        rows = []
        for n in sizes:
            out, work = root / f"out-{n}", root / f"work-{n}"
            t = time.perf_counter()
            p = subprocess.Popen(cli(cohort.root, out, "participant", "--model", bundle,
                                     "--participant-label", *tests[:n], "-w", work,
                                     "--nprocs", args.nprocs),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sampler = Sampler(p.pid)
            sampler.start()
            log, _ = p.communicate()
            sampler.stop.set()
            sampler.join()
            wall = time.perf_counter() - t
            if p.returncode:
                sys.exit(f"size {n} failed ({p.returncode}):\n{log[-3000:]}")
            rows.append({"participants": n, "wall_s": wall, "s_per_participant": wall / n,
                         "main_peak_mb": sampler.main_hwm / 1024.0,
                         "tree_peak_mb": sampler.tree_peak / 1024.0,
                         "max_child_peak_mb": sampler.child_hwm / 1024.0})
            print(f"{n} participants: {wall:.0f} s, {wall / n:.1f} s/participant, main peak "
                  f"{rows[-1]['main_peak_mb']:.0f} MB, tree peak {rows[-1]['tree_peak_mb']:.0f} "
                  f"MB, max child peak {rows[-1]['max_child_peak_mb']:.0f} MB", flush=True)
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        base = rows[0]
        for r_ in rows:
            r_["time_ratio"] = r_["s_per_participant"] / base["s_per_participant"]
            r_["main_mem_ratio"] = r_["main_peak_mb"] / base["main_peak_mb"]
            r_["tree_mem_ratio"] = r_["tree_peak_mb"] / base["tree_peak_mb"]
        print(f"\nvoxel size {args.voxel_size} mm, --nprocs {args.nprocs}, zscore model; "
              "ratios against the smallest size (1.0 = linear time, flat memory)")
        print_table(rows, ["participants", "wall_s", "s_per_participant", "time_ratio",
                           "main_peak_mb", "main_mem_ratio", "tree_peak_mb", "tree_mem_ratio",
                           "max_child_peak_mb"])
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
