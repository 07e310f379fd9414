"""GPU check and timing in one run: train, reconstruct and score on CPU and on CUDA.

    python benchmarks/gpu_check.py [--epochs 5] [--ddpm [--ddpm-epochs 2]] [--repeats 5]
                                   [--require-cuda | --cpu-only] [--data auto|phantom|template]

For a session with a lent GPU (the device machine has PyTorch, numpy, scipy and pandas but
no monai, no network, and runs Python 3.12). Once, here, in the repository root, fetch the
one missing package as a pure-Python wheel (1.7 MB):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: -d .whl monai==1.6.1

then one ``run`` call with ``carry: [".whl"]`` and ``timeout_s: 600`` (expected 3-6 minutes,
most of it ddpm on the CPU side; nothing of the project is installed, ``PYTHONPATH`` points at
the checkout; drop ``--ddpm`` for a 1-2 minute run):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
    python3 benchmarks/gpu_check.py --require-cuda --ddpm

(one line). Adding ``nibabel==5.4.2 nilearn==0.14.1`` to the download lets ``--data auto``
use the real MNI template instead of the numpy phantom (16 MB in all). Dry run without a GPU
(the dae paths, about 1.5 minutes on 2 cores; ``--ddpm --ddpm-epochs 1 --ddpm-steps 2
--n-healthy 4 --repeats 1`` adds ddpm, about 10 minutes there):
``python benchmarks/gpu_check.py --cpu-only --epochs 1 --repeats 2``.

What it does, per model (``dae``; ``ddpm`` too with ``--ddpm``):

1. versions, device name, SM count and memory; exit 2 with ``--require-cuda`` and no CUDA;
2. an in-memory cohort on the 2 mm template grid (99 x 117 x 95, one channel): ``--n-healthy``
   healthy volumes (a quarter held out for validation and calibration) and one volume with a
   synthetic hyper-intense lesion. ``phantom``: a three-tissue ellipsoidal brain with folds,
   ventricles, a smooth bias field and noise, numpy only; ``template``: nilearn's packaged
   template (``bids_anomaly.core.templates.load_template(2)``) with smooth random intensity
   fields, small shifts and noise; ``auto``: template where nibabel and nilearn import;
3. the model's own ``fit`` (TorchTrainer: GPU-resident on CUDA, bf16 autocast) for exactly
   ``--epochs`` epochs (patience and time budget disabled), on CPU (``--threads``, default:
   every core this process may use) and on CUDA, same seed and same initial weights: seconds
   per epoch (the first one apart: it carries warm-up), training slices per second, speed-up,
   peak GPU memory (``torch.cuda.max_memory_allocated``);
4. correctness: the CUDA-trained weights loaded into a CPU model and a CUDA model, the lesion
   volume reconstructed on both (the CUDA side through the code's own autocast path):
   relative error ||cuda - cpu|| / ||cpu|| against ``--tol`` (2e-2), shapes, finite values,
   output actually written inside the brain;
5. ``calibrate`` (held-out volumes, the training volumes as normative scans) once, then
   ``reconstruct`` and ``score_volume`` of the lesion volume on CPU and CUDA (there with the
   post-processing on the GPU, and once more with it on the host, compared): median of
   ``--repeats`` (ddpm on CPU: ``--ddpm-cpu-repeats``, 2) after one warm-up, with
   ``torch.cuda.synchronize`` around each repeat.

6. on CUDA (on the CPU with ``--cpu-only``), a training-throughput sweep of the default dae
   over ``--batch-sizes`` (16 64 256 1024; the training volumes repeated ``--sweep-repeat``
   times so the largest batch still takes several steps): slices/s, peak GPU memory, whether
   ``torch.compile`` ran, and the best batch against the default. Throughput only: the
   learning rate is not rescaled, so it says what the card can be fed, not a training recipe.

A summary table is printed last; ``gpu_check.json`` goes to ``--out-dir`` (default: ``$OUT``
when set). Exit code: 0 all checks passed, 1 a check failed, 2 no CUDA with
``--require-cuda``, 3 a missing package. With ``--cpu-only`` (or no CUDA) the CUDA columns stay
empty and the correctness check compares two CPU models (it proves the load path only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, uninstalled

from _common import print_table  # noqa: E402

SHAPE = (99, 117, 95)  # the 2 mm template grid
AFFINE = np.array([[2.0, 0, 0, -98], [0, 2.0, 0, -134], [0, 0, 2.0, -72], [0, 0, 0, 1]])
LESION_VALUE = 1.3  # hyper-intense (the normalised range is [0, 1.5], brain median ~0.7)


# -- data ------------------------------------------------------------------------------------
def smooth_field(rng: np.random.Generator, shape, coarse=(5, 6, 5)) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: coarse Gaussian noise, cubic upsampling."""
    g = rng.standard_normal(coarse)
    f = ndimage.zoom(g, [s / c for s, c in zip(shape, coarse)], order=3)
    pad = [(0, max(0, s - n)) for s, n in zip(shape, f.shape)]
    return np.pad(f, pad, mode="edge")[: shape[0], : shape[1], : shape[2]]


def _grid(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")


def phantom_brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A three-tissue brain (WM 0.85, GM 0.62, CSF 0.2) with folds and ventricles."""
    x, y, z = _grid(SHAPE)
    centre = np.array([49.0, 58.0, 40.0]) + rng.uniform(-1.5, 1.5, 3)
    radii = np.array([34.0, 43.0, 36.0]) * rng.uniform(0.95, 1.05, 3)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    r *= 1.0 + 0.03 * smooth_field(rng, SHAPE)
    mask = r < 1.0
    ph = rng.uniform(0, 2 * np.pi, 3)
    fold = 0.07 * np.sin(dx / 2.5 + ph[0]) * np.sin(dy / 3.0 + ph[1]) * np.sin(dz / 2.5 + ph[2])
    img = np.where(r < 0.70 + fold, 0.85, np.where(r < 0.96, 0.62, 0.2)).astype(np.float32)
    for side in (-1.0, 1.0):  # lateral ventricles
        v = ((dx - side * 5.0) / 3.0) ** 2 + ((dy - 3.0) / 10.0) ** 2 + ((dz - 5.0) / 4.0) ** 2
        img[v < 1.0] = 0.2
    img = ndimage.gaussian_filter(img, 0.7)
    img *= np.exp(0.08 * smooth_field(rng, SHAPE))
    img += rng.normal(0.0, 0.02, SHAPE).astype(np.float32)
    return (np.clip(img, 0.0, 1.5) * mask).astype(np.float32), mask


def template_brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The packaged template with a smooth intensity field, a shift of up to 2 voxels, noise."""
    from bids_anomaly.core.templates import load_template

    t = load_template(2)
    shift = tuple(int(s) for s in rng.integers(-2, 3, 3))
    mask = np.roll(t.mask, shift, axis=(0, 1, 2))
    img = np.roll(t.t1, shift, axis=(0, 1, 2)) * np.exp(0.1 * smooth_field(rng, t.shape))
    img = img + rng.normal(0.0, 0.02, t.shape)
    return (np.clip(img, 0.0, 1.5) * mask).astype(np.float32), mask


def add_lesion(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged sphere of radius 4-5 voxels at a deep in-brain point, set to 1.3."""
    deep = ndimage.binary_erosion(mask, iterations=10)
    pts = np.argwhere(deep & (img > 0.75))
    if len(pts) == 0:
        pts = np.argwhere(deep)
    c = pts[rng.integers(len(pts))]
    x, y, z = _grid(SHAPE)
    rad = rng.uniform(4.0, 5.0)
    d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / rad
    w = np.clip((1.15 - d) / 0.3, 0.0, 1.0) * mask
    out = img * (1.0 - w) + LESION_VALUE * w
    return out.astype(np.float32), w > 0.5


def make_cohort(kind: str, n_healthy: int, seed: int) -> dict:
    if kind == "auto":
        try:
            from bids_anomaly.core.templates import load_template

            load_template(2)
            kind = "template"
        except Exception as exc:  # nibabel/nilearn absent on the device machine
            print(f"data: template unavailable ({type(exc).__name__}: {exc}); using the phantom")
            kind = "phantom"
    make = template_brain if kind == "template" else phantom_brain
    rng = np.random.default_rng(seed)
    vols, masks = [], []
    for _ in range(n_healthy + 1):
        v, m = make(rng)
        if v.shape != SHAPE:
            raise SystemExit(f"data: unexpected grid {v.shape}, expected {SHAPE}")
        vols.append(v[None])
        masks.append(m)
    les, les_mask = add_lesion(vols[-1][0], masks[-1], rng)
    n_val = max(1, n_healthy // 4)
    return {"kind": kind, "train": vols[: n_healthy - n_val],
            "train_masks": masks[: n_healthy - n_val], "val": vols[n_healthy - n_val: n_healthy],
            "val_masks": masks[n_healthy - n_val: n_healthy], "lesion": les[None],
            "lesion_brain": masks[-1], "lesion_mask": les_mask}


# -- timing ----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_runs(fn, device: str, repeats: int, warmup: int = 1):
    """Median-ready wall times of ``fn()``: warm-up first, device synchronised around each."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times, out


def med(xs):
    return statistics.median(xs) if xs else None


# -- environment -----------------------------------------------------------------------------
def environment(args) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "numpy": np.__version__,
           "cpu_threads": args.threads, "cuda_available": torch.cuda.is_available()}
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        env["monai"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    for k, v in env.items():
        print(f"{k:>15}: {v}")
    return env


# -- one model -------------------------------------------------------------------------------
class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.checks: list[dict] = []

    def row(self, model, metric, cpu=None, cuda=None, ratio=None, note=""):
        self.rows.append({"model": model, "metric": metric, "cpu": cpu, "cuda": cuda,
                          "ratio": ratio, "note": note})

    def check(self, model, name, ok, detail):
        self.checks.append({"model": model, "check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {model}: {name}: {detail}")


def speedup(cpu, cuda):
    return cpu / cuda if cpu and cuda else None


def train(cls, hp, data, device, args) -> tuple[object, dict, float]:
    import torch

    from bids_anomaly.models.base import FitContext

    torch.manual_seed(args.seed)  # the same initial weights on both devices
    model = cls(["T1w"], SHAPE, hp)
    ctx = FitContext(val_volumes=data["val"], val_masks=data["val_masks"], device=device,
                     threads=args.threads, seed=args.seed)
    sync(device)
    t = time.perf_counter()
    hist = model.fit(data["train"], data["train_masks"], ctx)
    sync(device)
    return model, hist, time.perf_counter() - t


def epoch_stats(hist: dict, wall: float) -> dict:
    h = hist["history"]
    steady = h[1:] or h
    return {"epochs": len(h), "first_epoch_s": h[0]["seconds"],
            "epoch_s": med([r["seconds"] for r in steady]),
            "slices_per_s": med([r["samples_per_s"] for r in steady]),
            "final_train_loss": h[-1]["train_loss"], "final_val_loss": h[-1]["val_loss"],
            "fit_wall_s": wall}


def batch_sweep(data: dict, args, device: str, rep: Report) -> list[dict]:
    """Training throughput of the default dae at each ``--batch-sizes`` (throughput only: the
    learning rate is not rescaled, so this says what the device can feed, not what to train
    with). The training volumes are repeated ``--sweep-repeat`` times so that even the largest
    batch takes several steps per epoch; 2 epochs, the second one timed."""
    import torch

    from bids_anomaly.models.registry import get_model_class

    cls = get_model_class("dae")
    big = {**data, "train": data["train"] * args.sweep_repeat,
           "train_masks": data["train_masks"] * args.sweep_repeat}
    out = []
    for bs in args.batch_sizes:
        hp = {"epochs": 2, "patience": 10**6, "max_minutes": 1e6, "batch_size": bs}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            _, hist, wall = train(cls, hp, big, device, args)
        except torch.cuda.OutOfMemoryError as exc:  # report and go on
            out.append({"batch_size": bs, "error": f"out of memory: {exc}"})
            continue
        st = epoch_stats(hist, wall)
        row = {"batch_size": bs, "slices_per_s": st["slices_per_s"], "epoch_s": st["epoch_s"],
               "first_epoch_s": st["first_epoch_s"], "compiled": hist.get("compiled"),
               "peak_gpu_mib": (torch.cuda.max_memory_allocated() / 2**20
                                if device.startswith("cuda") else None)}
        out.append(row)
        print(f"  {device} batch {bs}: {row}")
    ok = [r for r in out if "slices_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["slices_per_s"])
        default = next((r for r in ok if r["batch_size"] == cls.defaults["batch_size"]), None)
        rep.row("dae", f"train slices/s, best batch ({best['batch_size']})",
                best["slices_per_s"] if not device.startswith("cuda") else None,
                best["slices_per_s"] if device.startswith("cuda") else None,
                best["slices_per_s"] / default["slices_per_s"] if default else None,
                "ratio: against the default batch")
    return out


def bench_model(name: str, data: dict, args, cuda: bool, rep: Report) -> dict:
    import torch

    from bids_anomaly.calibration.out_of_fold import calibrate
    from bids_anomaly.calibration.types import ScoringParams
    from bids_anomaly.inference.scoring import score_volume
    from bids_anomaly.models.registry import get_model_class

    cls = get_model_class(name)
    epochs = args.ddpm_epochs if name == "ddpm" else args.epochs
    hp = {"epochs": epochs, "patience": 10**6, "max_minutes": 1e6}
    if name == "ddpm" and args.ddpm_steps:
        hp["steps"] = args.ddpm_steps
    res: dict = {"hparams": hp}
    print(f"\n== {name}: training {epochs} epoch(s) on {len(data['train'])} volumes ==")

    m_cpu, h_cpu, wall = train(cls, hp, data, "cpu", args)
    res["train_cpu"] = s_cpu = epoch_stats(h_cpu, wall)
    print(f"  cpu : {s_cpu}")
    s_gpu: dict = {}
    ref_model = m_cpu
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        m_gpu, h_gpu, wall = train(cls, hp, data, "cuda", args)
        s_gpu = epoch_stats(h_gpu, wall)
        s_gpu["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["train_cuda"] = s_gpu
        print(f"  cuda: {s_gpu}")
        ref_model = m_gpu
    n_slices = round(s_cpu["slices_per_s"] * s_cpu["epoch_s"]) if s_cpu["epoch_s"] else None
    rep.row(name, "first epoch s", s_cpu["first_epoch_s"], s_gpu.get("first_epoch_s"),
            speedup(s_cpu["first_epoch_s"], s_gpu.get("first_epoch_s")), "warm-up included")
    rep.row(name, "epoch s (median)", s_cpu["epoch_s"], s_gpu.get("epoch_s"),
            speedup(s_cpu["epoch_s"], s_gpu.get("epoch_s")),
            f"~{n_slices} train slices + validation")
    rep.row(name, "train slices/s", s_cpu["slices_per_s"], s_gpu.get("slices_per_s"),
            speedup(s_gpu.get("slices_per_s"), s_cpu["slices_per_s"]), "ratio = cuda/cpu")
    rep.row(name, "final val loss", s_cpu["final_val_loss"], s_gpu.get("final_val_loss"),
            None, "same seed and init")
    if cuda:
        rep.row(name, "peak GPU MiB, fit", None, s_gpu["peak_gpu_mib"])
    for s, dev in ((s_cpu, "cpu"), (s_gpu, "cuda")):
        if s:
            ok = all(math.isfinite(s[k]) for k in ("final_train_loss", "final_val_loss"))
            rep.check(name, f"finite losses ({dev})", ok,
                      f"train {s['final_train_loss']:.5g} val {s['final_val_loss']:.5g}")

    # Correctness: the same weights in a CPU model and a device model, the same volume.
    dev = "cuda" if cuda else "cpu"
    state = ref_model.state_dict()
    models = {}
    for d in ("cpu", dev):
        torch.manual_seed(args.seed)
        models[d] = cls(["T1w"], SHAPE, hp)
        models[d].load_state_dict(state)
    if dev == "cpu":
        models["other"] = cls(["T1w"], SHAPE, hp)
        models["other"].load_state_dict(state)
    vol, brain = data["lesion"], data["lesion_brain"]
    ref = models["cpu"].reconstruct(vol, brain, device="cpu")
    out = models["other" if dev == "cpu" else dev].reconstruct(vol, brain, device=dev)
    ok_shape = ref.shape == out.shape == vol.shape
    finite = bool(np.isfinite(ref).all() and np.isfinite(out).all())
    nref = float(np.linalg.norm(ref.astype(np.float64)))
    rel = float(np.linalg.norm(out.astype(np.float64) - ref) / nref) if nref > 0 else math.inf
    written = float((out[0][brain] != 0).mean())
    side = "cuda (autocast) vs cpu float32" if cuda else "cpu vs cpu (load path only)"
    rep.check(name, "reconstruction shape", ok_shape, f"{out.shape} vs volume {vol.shape}")
    rep.check(name, "reconstruction finite, no NaN", finite, f"finite={finite}")
    rep.check(name, "output written in brain", written > 0.5,
              f"{written:.3f} of brain voxels non-zero; ||ref||={nref:.4g}")
    rep.check(name, f"relative error < {args.tol:g}", finite and rel < args.tol,
              f"{rel:.3e} ({side})")
    rep.row(name, "recon rel. error", None, rel if cuda else None, None, side)
    res["correctness"] = {"rel_error": rel, "shape_ok": ok_shape, "finite": finite,
                          "written_fraction": written, "compared": side}

    # Calibration once (on the fastest device), then scoring timed on each device.
    t = time.perf_counter()
    calib = calibrate(models[dev], data["val"], data["val_masks"], ScoringParams(), device=dev,
                      normative_volumes=data["train"], normative_masks=data["train_masks"])
    res["calibrate_s"] = time.perf_counter() - t
    res["calibrate_device"] = dev
    print(f"  calibrate on {dev}: {res['calibrate_s']:.2f} s, thresholds {calib.thresholds}")
    timings: dict = {}
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    for d in devices:
        m = models[d]
        n = args.ddpm_cpu_repeats if name == "ddpm" and d == "cpu" else args.repeats
        if d == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rt, _ = timed_runs(lambda m=m, d=d: m.reconstruct(vol, brain, device=d), d, n)
        st, r = timed_runs(lambda m=m, d=d: score_volume(m, vol, brain, calib, AFFINE, device=d),
                           d, n)
        timings[d] = {"reconstruct_s": rt, "score_s": st, "scan_score": r.score,
                      "percentile": r.percentile, "flagged": r.flagged,
                      "lesion_voxels_found": int((r.mask & data["lesion_mask"]).sum()),
                      "lesion_voxels": int(data["lesion_mask"].sum())}
        if d == "cuda":
            timings[d]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"  {d}: reconstruct {med(rt):.3f} s, score_volume {med(st):.3f} s "
              f"(median of {n}); scan score {r.score:.3f}, percentile "
              f"{r.percentile:.1f}, flagged {r.flagged}, lesion voxels found "
              f"{timings[d]['lesion_voxels_found']}/{timings[d]['lesion_voxels']}")
        rep.check(name, f"scan score finite ({d})", math.isfinite(r.score), f"{r.score:.4g}")
    res["scoring"] = timings
    g = timings.get("cuda", {})
    for key, label in (("reconstruct_s", "reconstruct s (median)"),
                       ("score_s", "score_volume s (median)")):
        c, u = med(timings["cpu"][key]), med(g.get(key, []))
        reps = f"{len(timings['cpu'][key])}/{len(g.get(key, []))}" if g else len(
            timings["cpu"][key])
        rep.row(name, label, c, u, speedup(c, u), f"median of {reps}, 1 warm-up")
    if cuda:
        rep.row(name, "peak GPU MiB, score", None, g["peak_gpu_mib"])
        # The same scoring with the post-processing on the host (scipy), and the two agreeing.
        m = models["cuda"]
        sn, rn = timed_runs(lambda: score_volume(m, vol, brain, calib, AFFINE, device="cuda",
                                                 backend="numpy"), "cuda", args.repeats)
        r_gpu = score_volume(m, vol, brain, calib, AFFINE, device="cuda")
        diff = float(np.abs(r_gpu.statmap - rn.statmap).max())
        rep.row(name, "score_volume s, scipy post", None, med(sn), speedup(med(sn), med(st)),
                "ratio = scipy post / GPU post")
        rep.check(name, "GPU post-processing = scipy", diff < 1e-3, f"max |diff| {diff:.2e}")
        res["scoring"]["cuda_numpy_post_s"] = sn
    return res


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--require-cuda", action="store_true",
                      help="exit 2 when no CUDA device is visible")
    mode.add_argument("--cpu-only", action="store_true",
                      help="dry run: skip every CUDA step even where a GPU is visible")
    p.add_argument("--epochs", type=int, default=5, help="dae epochs (default 5)")
    p.add_argument("--ddpm", action="store_true", help="also train and time the ddpm model")
    p.add_argument("--ddpm-epochs", type=int, default=2)
    p.add_argument("--ddpm-steps", type=int, default=0,
                   help="DDIM steps of ddpm scoring (default: the model's, 10)")
    p.add_argument("--n-healthy", type=int, default=8,
                   help="healthy volumes, a quarter held out (default 8)")
    p.add_argument("--data", choices=("auto", "phantom", "template"), default="auto")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--ddpm-cpu-repeats", type=int, default=2,
                   help="timed repeats of ddpm on CPU (each costs seconds; default 2)")
    p.add_argument("--threads", type=int, default=default_threads,
                   help=f"CPU threads for torch (default {default_threads})")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64, 256, 1024],
                   help="dae training throughput sweep on CUDA (none: skip; with --cpu-only "
                        "it runs on the CPU)")
    p.add_argument("--sweep-repeat", type=int, default=8,
                   help="training volumes repeated this often for the sweep (default 8)")
    p.add_argument("--tol", type=float, default=2e-2, help="relative error bound, cuda vs cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.environ.get("OUT") or None,
                   help="write gpu_check.json here (default: $OUT when set)")
    args = p.parse_args(argv)
    if args.n_healthy < 2:
        p.error("--n-healthy must be at least 2")
    if min(args.epochs, args.ddpm_epochs, args.repeats, args.ddpm_cpu_repeats,
           args.threads) < 1:
        p.error("--epochs, --ddpm-epochs, --repeats, --ddpm-cpu-repeats and --threads must be "
                "at least 1")
    return args


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5) else f"{v:.3f}"
    return str(v)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    print("== environment ==")
    env = environment(args)
    if args.require_cuda and not torch.cuda.is_available():
        print("ERROR: --require-cuda given but torch sees no CUDA device "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return 2
    if env["monai"] is None:
        print("ERROR: monai is not importable (the dae and ddpm networks are MONAI's). On the "
              "device machine carry its wheel; see this script's docstring.")
        return 3
    cuda = torch.cuda.is_available() and not args.cpu_only
    if not cuda:
        print("CUDA steps skipped: " + ("--cpu-only" if args.cpu_only else "no CUDA device"))

    t = time.perf_counter()
    data = make_cohort(args.data, args.n_healthy, args.seed)
    data_s = time.perf_counter() - t
    print(f"\n== data: {data['kind']}, {len(data['train'])} train + {len(data['val'])} held-out "
          f"healthy + 1 lesion volume, grid {SHAPE}, built in {data_s:.1f} s; lesion "
          f"{int(data['lesion_mask'].sum())} voxels ==")

    rep = Report()
    results = {"args": vars(args), "env": env, "data": {"kind": data["kind"], "seconds": data_s},
               "models": {}}
    def save() -> None:  # after every model too: a run cut short still leaves its numbers
        results["rows"], results["checks"] = rep.rows, rep.checks
        results["total_s"] = time.perf_counter() - t_start
        results["passed"] = all(c["ok"] for c in rep.checks)
        if args.out_dir:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))

    for name in ["dae"] + (["ddpm"] if args.ddpm else []):
        try:
            results["models"][name] = bench_model(name, data, args, cuda, rep)
        except Exception as exc:  # report and go on: the table should still come out
            logging.exception("%s failed", name)
            rep.check(name, "ran to the end", False, f"{type(exc).__name__}: {exc}")
        save()
    if args.batch_sizes and (cuda or args.cpu_only):
        print(f"\n== dae batch-size sweep ({'cuda' if cuda else 'cpu'}) ==")
        results["batch_sweep"] = batch_sweep(data, args, "cuda" if cuda else "cpu", rep)
        save()
    failed = [c for c in rep.checks if not c["ok"]]
    if args.out_dir:
        print(f"\nwrote {Path(args.out_dir) / 'gpu_check.json'}")

    where = env.get("device", "no GPU") if cuda else "CUDA skipped"
    print(f"\n== summary: torch {env['torch']}, cpu {args.threads} threads, cuda: {where}; "
          f"data {data['kind']}; total {results['total_s']:.0f} s ==")
    print_table([{k: fmt(v) for k, v in r.items()} for r in rep.rows],
                ["model", "metric", "cpu", "cuda", "ratio", "note"])
    print(f"checks: {len(rep.checks) - len(failed)}/{len(rep.checks)} passed"
          + "".join(f"\n  FAIL {c['model']}: {c['check']}: {c['detail']}" for c in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
