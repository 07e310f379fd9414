"""GPU cohort benchmark: a synthetic cohort scored end to end through the CLI on the GPU.

    python benchmarks/gpu_cohort.py [--n 50] [--n-train 8] [--device auto|cpu|cuda]
                                    [--nprocs N] [--n-gpu-procs K] [--time-budget 480]
    python benchmarks/gpu_cohort.py --write-template-cache DIR   (where nilearn is installed)

What it does, each step timed (the JSON goes to ``--out-dir``, default ``$OUT``, after every
step, so a run cut short still leaves what it measured):

1. environment: Python, torch, GPU, cores, the versions of every package the pipeline
   imports, and which N4 and template the run uses (below);
2. a synthetic BIDS cohort from the package's own generator (``bids_anomaly.synth``, 2 mm
   native voxels, with skull, random pose, bias field and noise, as ``bids-anomaly demo``):
   ``--n-train`` healthy training participants plus ``--n`` to score (half healthy, half with
   lesions), made in ``--nprocs`` processes;
3. ``bids-anomaly train`` (CLI, in a new process) of a small ``dae`` on the training
   participants: ``--folds 2``, ``--epochs`` epochs, at most ``--train-minutes``: the point
   is scoring throughput, not quality (preprocessing of the training set included);
4. the participant level through the CLI in a new process, as a user runs it:
   ``bids-anomaly BIDS OUT participant --model OUT/models/dae --participant-label ...
   --device cuda --nprocs 16`` with a fresh work dir:
   wall time of the process, participants per minute, the wall time of its phases (read from
   the run's log, ``OUTPUT_DIR/logs/run-*-<pid>.log``: start-up = interpreter, imports, bundle
   check and dataset indexing; preprocessing; scoring = reconstruction, statmap and the
   derivatives; participant reports), and the per-scan stage times each scan's scores record
   keeps (preprocessing: load, brain mask (deepbet), N4, registration, resampling; scoring:
   load, inference, native-space maps and writing);
5. the group level (``bids-anomaly BIDS OUT group``): group table and report.

Each CLI process's output goes to ``gpu_cohort_{train,participant,group}.log`` beside the JSON.

Peak GPU memory and mean utilisation per step are sampled with ``nvidia-smi`` (all
processes), host memory and CPU seconds of the whole process tree from /proc.

``--n-gpu-procs``: nipype's MultiProc runs a node that uses the GPU only in a free "GPU slot"
and by itself gives one slot per visible GPU, so on one GPU the participant level would
preprocess and score one scan at a time. The product sets ``n_gpu_procs`` itself (one slot per
process while the card has 2 GiB for each: ``workflows/base.gpu_slots``); ``--n-gpu-procs K``
passes K through ``--plugin-args`` instead (``--n-gpu-procs 1``: nipype's own default).

Acceptance (the GPU issue): 50 participants scored end to end at >= 60 participants per
minute on 16 cores and one H100/H200; the summary says whether this run met it.

On the GPU machine (Python 3.12 and PyTorch, none of the project's other dependencies, no
network) the packages travel as wheels, 64 MiB at most per call with the working tree.
``benchmarks/gpu_wheels.txt`` lists them and ``benchmarks/gpu_wheels.sh`` downloads exactly
that set into ``.whl/`` (cp312, manylinux x86_64) together with the template cache, and
fails when wheels + template + working tree exceed 64 MiB. Measured for this set (cp312):
26 wheels 55.1 MiB (antspyx 21.4, deepbet 9.8 (its weights), traits 4.9,
connected-components-3d 4.7, nibabel 3.2, nipype 3.1, sqlalchemy 2.0 (its pure-Python
wheel; the compiled one is 4.5), monai 1.6, fill_voids 1.4, prov 1.0, fastremap 0.8, rdflib
0.6, pybids 0.2, bidsschematools 0.2, num2words 0.2, universal_pathlib 0.1, and puremagic,
pydot, bids-validator, pathlib-abc, frozendict, webcolors, acres, looseversion, etelemetry,
ci-info 0.2 together) + the template cache 4.7 MiB (``cache/mni152-nilearn0.14.1-res1.npz``
3.9 and ``-res2.npz`` 0.7, LZMA-compressed npz) = 59.8 MiB, with the working tree (1.6 MiB)
61.5 of the 64 MiB. Two of the product's dependencies stay behind, each replaced for this
environment only:

* SimpleITK (50 MiB): N4 runs through antspyx's ANTs N4 with SimpleITK's settings
  (``BIDS_ANOMALY_N4_BACKEND=antspyx``, set by this script when SimpleITK does not import;
  recorded in every preproc.json and scores record, and part of the preprocessing node's
  hash). On a test volume the two agree to float rounding (relative difference 5e-8);
* nilearn (11 MiB): the template arrays nilearn would give come from a cache written here
  (``--write-template-cache``), read through ``BIDS_ANOMALY_CACHE`` (set by this script to
  ``.whl/cache`` when nilearn does not import).

numpy, scipy and torch never travel (the machine has its own: numpy 2.5, torch 2.11 CUDA).

Once, here, in the root of the checkout the session started in (the device call copies that
checkout's working tree, also when called from another worktree; fetches the 26 wheels,
writes the cache, checks the size, about a minute):

    echo /.whl/ >> .git/info/exclude   # once
    bash benchmarks/gpu_wheels.sh

then ONE device ``run`` call with ``carry: [".whl"]`` and ``timeout_s: 600`` (one line; the
script keeps to ``--time-budget`` seconds, 480 by default, and reports what it measured even
when cut short; estimated 3-5 minutes on 16 cores + H100, not yet run on a GPU):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
    python3 benchmarks/gpu_cohort.py --device cuda --nprocs 16

Dry run on a CPU (the same wheels for the local Python into another folder, a venv that has
only what the GPU machine has; see ``gpu_wheels.sh --help``):
``python benchmarks/gpu_cohort.py --device cpu --n 3 --n-train 3 --nprocs 1 --epochs 1``.

Exit code: 0 every participant scored, 1 a step failed or a scan failed, 2 ``--device cuda``
without CUDA, 3 a missing package, 4 cut short by ``--time-budget``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, uninstalled

from _common import print_table  # noqa: E402

# Everything the participant level imports, as (module, distribution).
PIPELINE_MODULES = (
    ("torch", "torch"), ("numpy", "numpy"), ("scipy", "scipy"), ("pandas", "pandas"),
    ("monai", "monai"), ("nibabel", "nibabel"), ("nipype", "nipype"), ("bids", "pybids"),
    ("sqlalchemy", "sqlalchemy"), ("ants", "antspyx"), ("deepbet.bet", "deepbet"),
    ("cc3d", "connected-components-3d"), ("fill_voids", "fill_voids"), ("click", "click"),
    ("rich", "rich"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"),
    ("PIL", "pillow"), ("safetensors", "safetensors"),
)
OPTIONAL_MODULES = (("SimpleITK", "SimpleITK"), ("nilearn", "nilearn"))
PRE_STAGES = ("load", "brain_mask", "n4", "registration", "resample_normalise")
SCORE_STAGES = ("load", "inference", "native_and_write")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.+?): (started|done)\b")
ACCEPT_N, ACCEPT_PPM = 50, 60.0

# `python -c` launcher of the CLI from this checkout: the top-level cli/ folder installs as
# bids_anomaly.cli; uninstalled (PYTHONPATH at the checkout) it is loaded from there.
LAUNCH = """\
import importlib.util, sys
root = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location(
    "bids_anomaly.cli", root + "/cli/__init__.py", submodule_search_locations=[root + "/cli"])
mod = importlib.util.module_from_spec(spec)
sys.modules["bids_anomaly.cli"] = mod
spec.loader.exec_module(mod)
from bids_anomaly.cli.main import main
sys.argv[0] = "bids-anomaly"
main()
"""


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", LAUNCH, str(ROOT), *map(str, args)]


# -- template cache (prepared where nilearn is installed) ------------------------------------
def write_template_cache(folder: Path) -> list[Path]:
    """The arrays ``core.templates`` reads, for a machine without nilearn."""
    from bids_anomaly.core.templates import export_template_cache

    written = export_template_cache(folder)
    for path in written:
        print(f"{path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return written


# -- environment -----------------------------------------------------------------------------
def prepare_environment(args) -> dict:
    """Versions, the GPU, and the N4 backend and template source this environment allows."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    env: dict = {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": len(os.sched_getaffinity(0)), "packages": {}, "missing": []}
    for mod, dist in PIPELINE_MODULES + OPTIONAL_MODULES:
        try:
            import_module(mod)
            try:
                env["packages"][dist] = version(dist)
            except PackageNotFoundError:
                env["packages"][dist] = "?"
        except Exception as exc:  # noqa: BLE001 - reported, and fatal below unless optional
            env["packages"][dist] = None
            if (mod, dist) in PIPELINE_MODULES:
                env["missing"].append(f"{dist} ({type(exc).__name__}: {exc})")
    import torch

    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                   gpu_mem_gib=round(p.total_memory / 2**30, 1))
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    if env["packages"]["SimpleITK"] is None and not os.environ.get("BIDS_ANOMALY_N4_BACKEND"):
        os.environ["BIDS_ANOMALY_N4_BACKEND"] = "antspyx"
    env["n4_backend"] = os.environ.get("BIDS_ANOMALY_N4_BACKEND") or "simpleitk"
    carried = ROOT / ".whl" / "cache"
    if env["packages"]["nilearn"] is None and not os.environ.get("BIDS_ANOMALY_CACHE") \
            and carried.is_dir():
        os.environ["BIDS_ANOMALY_CACHE"] = str(carried)
    env["template"] = (f"nilearn {env['packages']['nilearn']}" if env["packages"]["nilearn"]
                       else f"cache {os.environ.get('BIDS_ANOMALY_CACHE', '(none)')}")
    env["BIDS_ANOMALY_CACHE"] = os.environ.get("BIDS_ANOMALY_CACHE")
    for k in ("python", "machine", "cpus", "torch_cuda", "cuda_available", "gpu", "gpu_count",
              "gpu_mem_gib", "n4_backend", "template"):
        if k in env:
            print(f"{k:>15}: {env[k]}")
    print(f"{'packages':>15}: " + ", ".join(f"{k} {v or 'MISSING'}"
                                            for k, v in env["packages"].items()))
    return env


# -- sampling --------------------------------------------------------------------------------
class GpuSampler(threading.Thread):
    """Every ``every`` s: GPU memory used and utilisation (nvidia-smi, all processes), and
    the process tree's CPU seconds and summed RSS (scoring.CpuSampler), under a step name."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        from scoring import CpuSampler

        self.every, self.step = every, "start"
        self.cpu = CpuSampler(os.getpid(), every)
        self.smi = shutil.which("nvidia-smi")
        self.stop = threading.Event()
        self.gpu: dict[str, dict] = {}

    def run(self) -> None:
        from bids_anomaly.core.interrupt import descendants

        while not self.stop.is_set():
            try:
                self.cpu.sample(descendants(self.cpu.pid))
            except Exception:  # noqa: BLE001, S110 - a vanished process mid-poll
                pass
            if self.smi:
                self._smi()
            self.stop.wait(self.every)

    def _smi(self) -> None:
        try:
            r = subprocess.run([self.smi, "--query-gpu=memory.used,utilization.gpu",
                                "--format=csv,noheader,nounits"], capture_output=True,
                               text=True, timeout=5)
            mem, util = (float(x) for x in r.stdout.splitlines()[0].split(","))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return
        g = self.gpu.setdefault(self.step, {"peak_mem_mib": 0.0, "util": []})
        g["peak_mem_mib"] = max(g["peak_mem_mib"], mem)
        g["util"].append(util)

    def summary(self, step: str) -> dict:
        g = self.gpu.get(step)
        if not g:
            return {}
        return {"gpu_peak_mem_mib": g["peak_mem_mib"],
                "gpu_util_mean": statistics.fmean(g["util"]) if g["util"] else None}


# -- one CLI process -------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_cli(name: str, argv: list[str], log: Path, timeout: float) -> dict:
    """Run one CLI command in a new process group, its output to ``log`` and, prefixed, to
    stdout; killed (SIGTERM, then SIGKILL) after ``timeout`` s. Wall time, exit code, pid."""
    print(f"\n== {name} ==\n$ bids-anomaly {' '.join(argv[4:])}", flush=True)
    t_wall0 = time.time()
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, cwd=str(ROOT))

        def pump() -> None:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                print(f"  | {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        cut = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            cut = True
            print(f"  !! {name}: time budget reached after {time.perf_counter() - t:.0f} s, "
                  "stopping it", flush=True)
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5)
    wall = time.perf_counter() - t
    print(f"  {name}: exit {proc.returncode}, {wall:.1f} s", flush=True)
    return {"cmd": "bids-anomaly " + " ".join(argv[4:]), "rc": proc.returncode, "wall_s": wall,
            "pid": proc.pid, "started": t_wall0, "cut_short": cut, "log": str(log)}


def phase_times(output_dir: Path, pid: int, started: float) -> dict[str, float]:
    """Wall time of each step of one run, from its log (``logs/run-*-<pid>.log``): step
    title -> seconds from "started" to "done" (to the log's last line when it never ended),
    and ``start-up``: process start to the log's first line."""
    logs = sorted((output_dir / "logs").glob(f"run-*-{pid}.log"))
    if not logs:
        return {}
    first = last = None
    opened: dict[str, datetime] = {}
    out: dict[str, float] = {}
    for line in logs[-1].read_text(errors="replace").splitlines():
        m = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        first, last = first or ts, ts
        step = LOG_LINE.match(line)
        if step and step.group(3) == "started":
            opened[step.group(2)] = ts
        elif step and step.group(2) in opened:
            out[step.group(2)] = (ts - opened.pop(step.group(2))).total_seconds()
    for title, ts in opened.items():  # cut short
        out[f"{title} (unfinished)"] = (last - ts).total_seconds()
    if first is not None:
        out["start-up"] = first.timestamp() - started
    return out


def scan_records(output_dir: Path, labels: list[str]) -> list[dict]:
    recs = []
    for label in labels:
        for path in sorted((output_dir / f"sub-{label}").rglob("*_desc-anomaly_scores.json")):
            recs.append(json.loads(path.read_text()))
    return recs


def stage_rows(recs: list[dict]) -> list[dict]:
    """Per-scan stage times (median, p90 and sum over the scored scans) from their records."""
    import numpy as np

    rows = []
    for group, key, stages in (("preprocessing", "preprocessing", PRE_STAGES),
                               ("scoring", None, SCORE_STAGES)):
        for stage in stages:
            vals = [float((r.get(key, {}) if key else r).get("timings", {}).get(stage, np.nan))
                    for r in recs]
            vals = [v for v in vals if v == v]
            if vals:
                rows.append({"stage": f"{group}: {stage}", "scans": len(vals),
                             "median_s": float(np.median(vals)),
                             "p90_s": float(np.percentile(vals, 90)), "sum_s": float(sum(vals))})
    return rows


def train(args, budget, cohort, root, bids, out, run_opts, step_done, sampler,
          results) -> Path | None:
    """Train the bundle through the CLI; its path, or None when it failed."""
    sampler.step = "train"
    hp = {"epochs": args.epochs, "patience": args.epochs, "max_minutes": args.train_minutes}
    (root / "model_config.json").write_text(json.dumps(hp))
    train_timeout = min(budget.left() - 20, max(90.0, 0.45 * args.time_budget))
    rec = run_cli("train", cli(
        "train", bids, out, "--healthy-filter", "split=train", "--model-type",
        args.model_type, "--model-config", root / "model_config.json", "--folds", 2,
        "-w", root / "work-train", *run_opts,
        "--participant-label", *cohort.train_subjects), root / "train.log", train_timeout)
    rec["phases"] = phase_times(out, rec["pid"], rec["started"])
    bundle = out / "models" / args.model_type
    if (bundle / "model.json").exists():
        card = json.loads((bundle / "model.json").read_text())
        tr = card.get("training", {})
        hist = tr.get("history", [])
        sps = [h.get("samples_per_s") for h in (hist[1:] or hist)  # 1st: warm-up
               if h.get("samples_per_s")]
        rec["fit"] = {"seconds": tr.get("seconds"), "device": tr.get("device"),
                      "models_trained": tr.get("models_trained"),
                      "epochs_final": len(tr.get("history", [])),
                      "train_slices_per_s": statistics.median(sps) if sps else None}
    step_done("train", rec)
    if rec["rc"] != 0 or not (bundle / "model.json").exists():
        print("ERROR: training failed; its log: " + rec["log"])
        results["failed"] = "train"
        return None
    return bundle


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="participants scored (default 50)")
    p.add_argument("--n-train", type=int, default=8,
                   help="healthy training participants (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda[:N]")
    p.add_argument("--nprocs", type=int, default=cores, help=f"CLI --nprocs (default {cores})")
    p.add_argument("--n-gpu-procs", type=int, default=-1,
                   help="nipype GPU slots through --plugin-args n_gpu_procs (default: the "
                        "product's own choice; 1: nipype's default on one GPU)")
    p.add_argument("--omp-nthreads", type=int, default=0, help="CLI --omp-nthreads (0: unset)")
    p.add_argument("--model-type", default="dae", help="model to train and score (default dae)")
    p.add_argument("--bundle", type=Path,
                   help="score with this model bundle and skip training (default: train one)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per model (default 5)")
    p.add_argument("--train-minutes", type=float, default=1.5,
                   help="the model's training budget, all fold models (default 1.5)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds for the whole benchmark; steps past it are stopped or "
                        "skipped and what was measured is reported (default 480)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, help="work here and keep it (default: a temp dir, "
                                             "removed at the end)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or None,
                   help="write gpu_cohort.json here (default: $OUT when set)")
    p.add_argument("--write-template-cache", type=Path, metavar="DIR",
                   help="only write the template cache files into DIR (needs nilearn) and exit")
    args = p.parse_args(argv)
    if args.n < 1 or args.n_train < 2 or args.nprocs < 1 or args.epochs < 1:
        p.error("--n >= 1, --n-train >= 2, --nprocs >= 1 and --epochs >= 1")
    return args


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def main(argv=None) -> int:  # noqa: C901 - one linear script
    args = parse_args(argv)
    if args.write_template_cache:
        write_template_cache(args.write_template_cache)
        return 0
    budget = Budget(args.time_budget)
    print("== environment ==", flush=True)
    env = prepare_environment(args)
    if env["missing"]:
        print("ERROR: missing packages: " + "; ".join(env["missing"]) + "\n(on the GPU machine "
              "install the carried wheels first; see this script's docstring)")
        return 3
    device = args.device
    if device == "auto":
        device = "cuda" if env["cuda_available"] else "cpu"
    if device.startswith("cuda") and not env["cuda_available"]:
        print(f"ERROR: --device {device} but torch sees no CUDA device")
        return 2
    gpu_procs = None if args.n_gpu_procs < 0 else args.n_gpu_procs
    run_opts = ["--device", device, "--nprocs", args.nprocs, "--seed", args.seed]
    if args.omp_nthreads:
        run_opts += ["--omp-nthreads", args.omp_nthreads]
    if device.startswith("cuda") and gpu_procs is not None:
        run_opts += ["--plugin-args", json.dumps({"n_gpu_procs": gpu_procs})]

    root = args.root or Path(tempfile.mkdtemp(prefix="ba-gpu-cohort-"))
    root.mkdir(parents=True, exist_ok=True)
    bids, out = root / "bids", root / "derivatives" / "bids-anomaly"
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(args).items()},
                     "env": env, "device": device,
                     "n_gpu_procs": (("auto" if gpu_procs is None else gpu_procs)
                                     if device.startswith("cuda") else None),
                     "steps": {}, "root": str(root)}
    sampler = GpuSampler()
    sampler.start()

    def save() -> None:
        results["elapsed_s"] = args.time_budget - budget.left()
        if args.out_dir:
            d = Path(args.out_dir)
            d.mkdir(parents=True, exist_ok=True)
            (d / "gpu_cohort.json").write_text(json.dumps(results, indent=2, default=str))

    def step_done(name: str, rec: dict) -> dict:
        rec.update(sampler.summary(name))
        results["steps"][name] = rec
        save()
        return rec

    status = 0
    try:
        # 2. the cohort
        from bids_anomaly.synth.cohort import generate_cohort
        from bids_anomaly.synth.config import SynthConfig

        sampler.step = "synth"
        n_pat = args.n // 2
        t = time.perf_counter()
        n_train = 0 if args.bundle else args.n_train
        cohort = generate_cohort(bids, SynthConfig(
            n_healthy=n_train, n_healthy_test=args.n - n_pat, n_patients=n_pat,
            voxel_size=2.0, with_skull=True, seed=args.seed), workers=args.nprocs)
        test = cohort.test_healthy_subjects + cohort.patient_subjects
        rec = step_done("synth", {"wall_s": time.perf_counter() - t,
                                  "participants": n_train + args.n})
        print(f"\n== cohort: {n_train} training + {len(test)} to score "
              f"({len(cohort.patient_subjects)} with lesions) in {rec['wall_s']:.1f} s ==",
              flush=True)

        # 3. train
        bundle = args.bundle
        if bundle is None:
            bundle = train(args, budget, cohort, root, bids, out, run_opts, step_done,
                           sampler, results)
        if bundle is None:
            status = 4 if results["steps"]["train"]["cut_short"] else 1
            return status
        results["bundle"] = str(bundle)

        # 4. the participant level
        sampler.step = "participant"
        left = budget.left() - 15
        if left < 30:
            results["failed"] = "participant (no time left)"
            status = 4
            return status
        rec = run_cli("participant level", cli(
            bids, out, "participant", "--model", bundle, "-w", root / "work-score",
            *run_opts, "--participant-label", *test), root / "participant.log", left)
        rec["phases"] = phase_times(out, rec["pid"], rec["started"])
        every = scan_records(out, test)
        recs = [r for r in every if r.get("status") == "ok"]
        failed = [r for r in every if r.get("status") != "ok"]
        rec["scans_scored"], rec["scans_failed"] = len(recs), len(failed)
        rec["failures"] = [f"{r.get('scan_id')}: {r.get('error')}" for r in failed]
        rec["scans_preprocessed"] = len(list((root / "work-score").glob(
            "preproc_wf/preproc_*/preproc.json")))
        rec["participants_per_min"] = 60.0 * len(recs) / rec["wall_s"] if rec["wall_s"] else 0
        startup = rec["phases"].get("start-up")
        if startup is not None and rec["wall_s"] > startup:
            rec["participants_per_min_after_startup"] = 60.0 * len(recs) / (
                rec["wall_s"] - startup)
        rec["per_scan"] = stage_rows(recs)
        rec["n4_backends"] = sorted({r.get("preprocessing", {}).get("n4_backend", "?")
                                     for r in recs})
        rec["brain_extraction"] = sorted({r.get("preprocessing", {}).get("brain_extraction",
                                                                         "?") for r in recs})
        rec["flagged"] = sum(bool(r.get("flagged")) for r in recs)
        step_done("participant", rec)
        if rec["cut_short"]:
            status = 4
        elif rec["rc"] != 0 or len(recs) < len(test):
            status = 1
            for msg in rec["failures"][:3]:
                print(f"  failed scan ({len(failed)} in all): {msg[:1500]}")

        # 5. the group level
        sampler.step = "group"
        left = budget.left() - 5
        if left > 20 and rec["scans_scored"]:
            g = run_cli("group level", cli(bids, out, "group"), root / "group.log", left)
            g["phases"] = phase_times(out, g["pid"], g["started"])
            step_done("group", g)
            status = status or (4 if g["cut_short"] else (1 if g["rc"] else 0))
        else:
            results["steps"]["group"] = {"skipped": "no time left" if left <= 20 else
                                         "nothing scored"}
    except BaseException as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
        raise
    finally:
        sampler.stop.set()
        results["host"] = {"tree_peak_rss_mib": sampler.cpu.tree_peak / 1024,
                           "cpu_s": sampler.cpu.cpu_s()}
        results["status"] = status
        save()
        summarise(results, args)
        if args.out_dir:  # each CLI process's output too, for a post-mortem
            for name in ("train", "participant", "group"):
                if (root / f"{name}.log").exists():
                    shutil.copy(root / f"{name}.log",
                                Path(args.out_dir) / f"gpu_cohort_{name}.log")
            print(f"\nwrote {Path(args.out_dir) / 'gpu_cohort.json'} and the CLI logs beside it")
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return status


def summarise(results: dict, args) -> None:
    env, steps = results["env"], results["steps"]
    where = env.get("gpu", "no GPU") if results["device"].startswith("cuda") else "CPU"
    gpu_slots = ("n/a" if results["n_gpu_procs"] is None
                 else results["n_gpu_procs"])
    print(f"\n== summary: {results['device']} ({where}), {env['cpus']} CPUs, --nprocs "
          f"{args.nprocs}, GPU slots {gpu_slots}, N4 "
          f"{env['n4_backend']}, template {env['template']}; "
          f"{results.get('elapsed_s', 0):.0f} s in all ==")
    rows = []

    def add(stage, wall=None, n=None, note="", **extra):
        per = wall / n if wall is not None and n else None
        rows.append({"stage": stage, "wall_s": wall, "scans": n, "s_per_scan": per,
                     "gpu_peak_mib": extra.get("gpu_peak_mem_mib"),
                     "gpu_util_%": extra.get("gpu_util_mean"), "note": note})

    if "synth" in steps:
        s = steps["synth"]
        add("synthetic cohort", s["wall_s"], s["participants"], "generate_cohort, "
            f"{args.nprocs} processes", **s)
    if "train" in steps:
        s = steps["train"]
        ph = s.get("phases", {})
        add("train: process", s["wall_s"], args.n_train, f"exit {s['rc']}"
            + (", CUT SHORT" if s["cut_short"] else ""), **s)
        if "preprocessing" in ph:
            add("  preprocessing", ph["preprocessing"], args.n_train)
        fit = s.get("fit", {})
        for title, secs in ph.items():
            if title.startswith(("training", "calibrating")):
                add(f"  {title}", secs, None,
                    (f"{fit.get('models_trained')} models, {fit['train_slices_per_s']:.0f} "
                     "slices/s" if title.startswith("training") and fit.get(
                         "train_slices_per_s") else ""))
    p = steps.get("participant")
    if p:
        ph, n = p.get("phases", {}), p["scans_scored"]
        add("participant level: process", p["wall_s"], n, f"exit {p['rc']}"
            + (", CUT SHORT" if p["cut_short"] else ""), **p)
        for title in ("start-up", "preprocessing", "scoring", "participant reports"):
            for key in (title, f"{title} (unfinished)"):
                if key in ph:
                    add(f"  {key}", ph[key], None if title == "start-up" else n,
                        {"start-up": "interpreter, imports, bundle check, indexing",
                         "preprocessing": "deepbet, N4, registration, resampling",
                         "scoring": "reconstruct, statmap, derivatives",
                         "participant reports": "HTML per participant"}[title])
    g = steps.get("group")
    if g and "wall_s" in g:
        add("group level: process", g["wall_s"], None, f"exit {g['rc']}", **g)
    print_table([{k: fmt(v) for k, v in r.items()} for r in rows],
                ["stage", "wall_s", "scans", "s_per_scan", "gpu_peak_mib", "gpu_util_%",
                 "note"])
    if p and p.get("per_scan"):
        print("\nper scan, inside the workers (each scan's scores record):")
        print_table([{k: fmt(v) for k, v in r.items()} for r in p["per_scan"]],
                    ["stage", "scans", "median_s", "p90_s", "sum_s"])
    if p:
        ppm = p["participants_per_min"]
        print(f"\nparticipants scored: {p['scans_scored']}/{args.n}, failed "
              f"{p.get('scans_failed', 0)} (preprocessed "
              f"{p['scans_preprocessed']}), flagged {p.get('flagged')}; N4 "
              f"{', '.join(p.get('n4_backends', []))}; brain mask "
              f"{', '.join(p.get('brain_extraction', []))}")
        after = p.get("participants_per_min_after_startup")
        print(f"participants per minute (participant level, process wall): {ppm:.1f}"
              + (f"; after start-up: {after:.1f}" if after else ""))
        if g and g.get("wall_s"):
            print(f"participants per minute with the group level: "
                  f"{60.0 * p['scans_scored'] / (p['wall_s'] + g['wall_s']):.1f}")
        ok = (results["device"].startswith("cuda") and args.n >= ACCEPT_N
              and p["scans_scored"] >= ACCEPT_N and ppm >= ACCEPT_PPM)
        applies = results["device"].startswith("cuda") and args.n >= ACCEPT_N
        print(f"acceptance (>= {ACCEPT_PPM:.0f}/min on {ACCEPT_N} participants, GPU): "
              + (("MET" if ok else "NOT MET") if applies else "not applicable to this run"))
    h = results.get("host", {})
    print(f"host: peak RSS of the process tree {h.get('tree_peak_rss_mib', 0):.0f} MiB, "
          f"CPU {h.get('cpu_s', 0):.0f} s; status {results.get('status')}"
          + (f" (failed: {results['failed']})" if results.get("failed") else ""))


if __name__ == "__main__":
    sys.exit(main())
